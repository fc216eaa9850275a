"""FastV visual-token pruning (arXiv 2403.06764) on mlx-lm's Qwen2 layers.

In the prefill that holds the image, layers below K run on the whole sequence.
Layer K-1's attention from the last prompt position, averaged over heads, ranks
the visual tokens; the lowest fraction R is dropped and layers K and up run on
the rest. Kept tokens keep their rotary positions, and every later token gets
the position it would have had without pruning.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from .errors import FastVLMError


@dataclass(frozen=True)
class FastV:
    layer: int  # K: the first layer that sees only the kept visual tokens
    ratio: float  # R: the fraction of visual tokens dropped

    @classmethod
    def parse(cls, spec: str, num_layers: int) -> "FastV":
        """'K:R', e.g. '2:0.5' (the paper's setting)."""
        match = re.fullmatch(r"\s*(\d+)\s*:\s*([0-9.]+)\s*", spec)
        if not match:
            raise FastVLMError(f"--fastv takes K:R, e.g. 2:0.5; got {spec!r}")
        try:
            layer, ratio = int(match.group(1)), float(match.group(2))
        except ValueError:
            raise FastVLMError(f"--fastv takes K:R, e.g. 2:0.5; got {spec!r}") from None
        if not 1 <= layer < num_layers:
            raise FastVLMError(f"--fastv K must be in [1, {num_layers}) for this model, got {layer}")
        if not 0 <= ratio < 1:
            raise FastVLMError(f"--fastv R must be in [0, 1), got {ratio}")
        return cls(layer, ratio)

    def kept(self, visual_tokens: int) -> int:
        return round(visual_tokens * (1 - self.ratio))


class FastVCache(KVCache):
    """Cache of a layer at or above K: it stores only the kept tokens, but its
    `offset`, which mlx-lm's attention takes as the next rotary position, also
    counts the pruned ones."""

    def __init__(self, before: KVCache, pruned: int):
        """Take over `before`, which holds the tokens ahead of the image, unpruned."""
        super().__init__()
        self.keys, self.values = before.keys, before.values
        self.pruned = pruned
        self.offset = before.offset + pruned

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.offset -= self.pruned  # the parent indexes its storage by offset
        try:
            super().update_and_fetch(keys, values)  # its return value is sliced wrongly
        finally:
            self.offset += self.pruned
        return self.keys_and_values()

    def keys_and_values(self):
        stored = self.offset - self.pruned
        return self.keys[..., :stored, :], self.values[..., :stored, :]

    def trim(self, n: int) -> int:
        return super().trim(min(n, self.offset - self.pruned))  # pruned tokens stay pruned


class PositionedRoPE(nn.Module):
    """mlx-lm's RoPE applied at explicit positions instead of a running offset."""

    def __init__(self, rope: nn.RoPE, positions: mx.array):
        super().__init__()
        self.rope = rope
        self.positions = positions

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        # One batch row per token, so each gets its own offset; B is 1 here.
        rotated = mx.fast.rope(
            x.transpose(2, 1, 0, 3), self.rope.dims, traditional=self.rope.traditional,
            base=self.rope.base, scale=self.rope.scale, offset=self.positions,
        )
        return rotated.transpose(2, 1, 0, 3)


@contextmanager
def rotary_positions(layers: list, positions: mx.array):
    """Temporarily make these layers' attention rotate at `positions`."""
    ropes = [layer.self_attn.rope for layer in layers]
    if not all(isinstance(r, nn.RoPE) for r in ropes):
        raise FastVLMError("--fastv supports the plain rotary embedding of Qwen2 only")
    try:
        for layer, rope in zip(layers, ropes):
            layer.self_attn.rope = PositionedRoPE(rope, positions)
        yield
    finally:
        for layer, rope in zip(layers, ropes):
            layer.self_attn.rope = rope


def last_position_attention(layer: nn.Module, x: mx.array, cache: KVCache) -> mx.array:
    """Layer's attention weights from the last position of its input `x`, averaged over heads.

    Only that one query row is recomputed; the keys come from the cache the
    layer has just filled, so the prompt is not passed over a second time.
    """
    attn = layer.self_attn
    q = attn.q_proj(layer.input_layernorm(x[:, -1:]))
    q = q.reshape(1, 1, attn.n_heads, -1).transpose(0, 2, 1, 3)
    q = attn.rope(q, offset=cache.offset - 1)
    keys, _ = cache.keys_and_values()
    keys = mx.repeat(keys, attn.n_heads // attn.n_kv_heads, axis=1)
    scores = (q * attn.scale) @ keys.swapaxes(-1, -2)  # [1, heads, 1, n]
    return mx.softmax(scores.astype(mx.float32), axis=-1).mean(axis=1)[0, 0]


def prefill(language_model: nn.Module, h: mx.array, cache: list, fastv: FastV,
            image: tuple[int, int]) -> mx.array:
    """Run the decoder over embeddings `h` [1, T, d] whose image features sit at
    image = (start, count), pruning them at layer K.

    Returns the final-norm hidden states of the kept tokens (the last is the
    prompt's last position), as mlx-lm's Qwen2Model does for all of them."""
    qwen = language_model.model
    layers = qwen.layers
    start, count = image
    T = h.shape[1]
    base = cache[0].offset
    if any(isinstance(c, FastVCache) for c in cache):
        raise FastVLMError("FastV prunes one image per conversation; /reset before another")
    mask = create_attention_mask(h, cache[0])
    for layer, c in zip(layers[: fastv.layer - 1], cache):
        h = layer(h, mask, c)
    ranker = layers[fastv.layer - 1]
    x = h
    h = ranker(x, mask, cache[fastv.layer - 1])
    received = last_position_attention(ranker, x, cache[fastv.layer - 1])
    visual = received[base + start : base + start + count]
    top = mx.sort(mx.argsort(-visual)[: fastv.kept(count)])
    keep = mx.concatenate([mx.arange(start), start + top, mx.arange(start + count, T)])
    h = h[:, keep]
    pruned = T - keep.shape[0]
    for i in range(fastv.layer, len(layers)):
        cache[i] = FastVCache(cache[i], pruned)
    with rotary_positions(layers[fastv.layer :], base + keep):
        for layer, c in zip(layers[fastv.layer :], cache[fastv.layer :]):
            h = layer(h, create_attention_mask(h, None), c)
    return qwen.norm(h)
