"""FastV pruning: R=0 is exact, the fast path matches a slow explicit one, positions continue."""

import json
import re

import mlx.core as mx
import pytest

from conftest import CHECKPOINT, IMAGE, QUESTION, rel_err
from fastvlm_mlx import Chat, FastVLMError
from fastvlm_mlx.fastv import FastV, FastVCache
from fastvlm_mlx.fastvlm import IMAGE_TOKEN_INDEX, Model, ModelArgs


@pytest.fixture(scope="module")
def deep(tiny):
    """The fixture's tower and projector under a random 4-layer decoder, so K can be 2."""
    model, tokenizer = tiny
    config = json.loads((CHECKPOINT / "config.json").read_text())
    mx.random.seed(0)
    deeper = Model(ModelArgs.from_dict({**config, "num_hidden_layers": 4}))
    deeper.vision_tower = model.vision_tower
    deeper.mm_projector = model.mm_projector
    deeper.language_model.model.embed_tokens = model.language_model.model.embed_tokens
    mx.eval(deeper.parameters())
    return deeper, tokenizer


def rope(x, positions, dims, base):
    """Rotary embedding written out (half-split, as Qwen2 uses it) at explicit positions."""
    half = dims // 2
    angles = positions[:, None].astype(mx.float32) * base ** (-mx.arange(half) * 2 / dims)[None]
    cos, sin = mx.cos(angles), mx.sin(angles)
    x1, x2 = x[..., :half], x[..., half:dims]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., dims:]], axis=-1)


def explicit_layer(layer, h, positions):
    """One Qwen2 block with causal attention over `h` at explicit rotary positions, no cache.

    Returns the block output and the attention weights [heads, L, L]."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    L = h.shape[1]
    q = attn.q_proj(x).reshape(1, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = attn.k_proj(x).reshape(1, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = attn.v_proj(x).reshape(1, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    q = rope(q, positions, attn.rope.dims, attn.rope.base)
    k = rope(k, positions, attn.rope.dims, attn.rope.base)
    rep = attn.n_heads // attn.n_kv_heads
    k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
    scores = (q @ k.swapaxes(-1, -2)) * attn.scale
    scores = mx.where(mx.tril(mx.ones((L, L), dtype=mx.bool_)), scores, -mx.inf)
    weights = mx.softmax(scores, axis=-1)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(1, L, -1)
    h = h + attn.o_proj(out)
    return h + layer.mlp(layer.post_attention_layernorm(h)), weights[0]


def slow_logits(model, ids, features, fastv, keep=None):
    """Layers < K on everything, rank, then layers >= K on the kept tokens at their
    original positions. `keep` fixes the kept indices (decode reuses the prefill's)."""
    qwen = model.language_model.model
    h = model.embed(ids, features)
    T = h.shape[1]
    positions = mx.arange(T)
    for layer in qwen.layers[: fastv.layer]:
        h, weights = explicit_layer(layer, h, positions)
    if keep is None:
        start, n = ids.index(IMAGE_TOKEN_INDEX), features.shape[1]
        received = weights[:, -1, start : start + n].mean(axis=0)
        ranked = sorted(range(n), key=lambda i: -received[i].item())[: fastv.kept(n)]
        keep = list(range(start)) + [start + i for i in sorted(ranked)] + list(range(start + n, T))
    kept = keep + list(range(max(keep) + 1, T))  # tokens decoded since are always kept
    idx = mx.array(kept)
    h = h[:, idx]
    for layer in qwen.layers[fastv.layer :]:
        h, _ = explicit_layer(layer, h, idx)
    return model.lm_head(qwen.norm(h)[:, -1]), keep


def test_ratio_zero_is_the_unpruned_model(tiny):
    model, tokenizer = tiny
    plain = Chat(model, tokenizer, IMAGE)
    pruned = Chat(model, tokenizer, IMAGE, fastv="1:0")
    a = list(plain.ask(QUESTION, max_tokens=8))
    b = list(pruned.ask(QUESTION, max_tokens=8))
    assert [r.token for r in a] == [r.token for r in b]
    for x, y in zip(a, b):
        assert mx.abs(x.logprobs - y.logprobs).max().item() <= 1e-5


@pytest.mark.parametrize("spec", ["2:0.5", "1:0.75", "3:0.25"])
def test_fast_path_matches_the_slow_reference(deep, spec):
    model, tokenizer = deep
    fastv = FastV.parse(spec, 4)
    chat = Chat(model, tokenizer, IMAGE, fastv=fastv)
    chat.stop_ids = set()
    responses = list(chat.ask(QUESTION, max_tokens=8))
    tokens = [r.token for r in responses]
    ids = chat.tokens[:-1 - len(tokens)]  # the prompt, before the answer and closing <|im_end|>
    keep = None
    for step, response in enumerate(responses):
        logits, keep = slow_logits(model, ids + tokens[:step], chat.features, fastv, keep)
        slow = logits[0] - mx.logsumexp(logits[0])
        assert rel_err(response.logprobs, slow) <= 1e-4, step
        assert tokens[step] == int(mx.argmax(slow[: len(tokenizer)]).item())  # padded ids are never sampled
    assert responses[0].stats.visual_kept == fastv.kept(16)


def test_decode_positions_continue_from_the_unpruned_length(deep):
    model, tokenizer = deep
    chat = Chat(model, tokenizer, IMAGE, fastv="2:0.5")
    chat.stop_ids = set()
    stream = chat.ask(QUESTION, max_tokens=6)
    next(stream)
    T = chat.cache.layers[0].offset  # the unpruned prompt length, plus the first answer token
    layers = chat.cache.layers
    assert all(isinstance(c, FastVCache) for c in layers[2:])
    assert not any(isinstance(c, FastVCache) for c in layers[:2])
    for c in layers[2:]:
        assert c.pruned == 8  # half of the 16 visual tokens
        assert c.offset == layers[0].offset  # the rotary position of the next token
        keys, _ = c.keys_and_values()
        assert keys.shape[2] == c.offset - 8  # only the kept tokens are stored
    list(stream)
    assert {c.offset for c in layers} == {layers[0].offset}
    assert layers[0].offset > T


def test_follow_up_turn_after_pruning_matches_a_full_recompute(deep):
    """The second turn prefills on top of the pruned cache at the right positions."""
    model, tokenizer = deep
    fastv = FastV.parse("2:0.5", 4)
    chat = Chat(model, tokenizer, IMAGE, fastv=fastv)
    prompt = chat.prompt_ids(QUESTION)
    list(chat.ask(QUESTION, max_tokens=4))
    reply = list(chat.ask("And then?", max_tokens=1))
    ids = chat.tokens[:-2]  # the whole conversation before the new answer
    _, keep = slow_logits(model, prompt, chat.features, fastv)
    logits, _ = slow_logits(model, ids, chat.features, fastv, keep)
    assert rel_err(reply[0].logprobs, logits[0] - mx.logsumexp(logits[0])) <= 1e-4


@pytest.mark.parametrize("spec, message", [
    ("2", "takes K:R"), ("0:0.5", "K must be in [1, 2)"), ("2:0.5", "K must be in [1, 2)"),
    ("1:1", "R must be in [0, 1)"), ("1:x", "takes K:R"),
])
def test_bad_specs_are_refused(tiny, spec, message):
    model, tokenizer = tiny
    with pytest.raises(FastVLMError, match=re.escape(message)):
        Chat(model, tokenizer, IMAGE, fastv=spec)
