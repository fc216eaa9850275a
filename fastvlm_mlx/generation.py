"""Generation: a multi-turn chat about one image on mlx-lm's KV cache and sampler."""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from PIL import Image

from .defaults import DEFAULT_MAX_PIXELS, DEFAULT_SYSTEM
from .errors import FastVLMError
from .fastv import FastV
from .fastv import prefill as fastv_prefill
from .fastvlm import IMAGE_TOKEN_INDEX, Model
from .processor import first_turn, load_image, next_turn, preprocess, to_rgb


def prefill(model: Model, ids: list[int], features: mx.array | None, cache: list,
            fastv: FastV | None = None) -> mx.array:
    """Run the decoder over `ids` on top of `cache`; the last position's log-probabilities [1, V].

    With FastV, a prefill that holds the image slot prunes the visual tokens.
    """
    embeddings = model.embed(ids, features)
    if fastv and IMAGE_TOKEN_INDEX in ids:
        image = (ids.index(IMAGE_TOKEN_INDEX), features.shape[1])
        h = fastv_prefill(model.language_model, embeddings, cache, fastv, image)
    else:
        h = model.language_model.model(None, cache, input_embeddings=embeddings)
    logits = model.lm_head(h[:, -1])
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@dataclass
class Stats:
    """Where the time of one answer went; TTFT = vision + prefill."""

    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    visual_tokens: int = 0
    prompt_tokens: int = 0  # tokens prefilled for this turn (image features included)
    generation_tokens: int = 0
    visual_kept: int | None = None  # visual tokens left after FastV pruning

    @property
    def ttft_s(self) -> float:
        return self.vision_s + self.prefill_s

    @property
    def decode_tps(self) -> float:
        steps = self.generation_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def footer(self) -> str:
        return (
            f"vision {self.vision_s * 1e3:.0f} ms | prefill {self.prefill_s * 1e3:.0f} ms "
            f"({self.prompt_tokens} tok) | TTFT {self.ttft_s * 1e3:.0f} ms | "
            f"decode {self.decode_tps:.1f} tok/s | {self.visual_tokens} visual tokens"
            + (f" ({self.visual_kept} kept by FastV)" if self.visual_kept is not None else "")
        )


@dataclass
class GenerationResponse:
    text: str  # the new text since the previous response (may be empty)
    token: int
    logprobs: mx.array
    finish_reason: str | None = None  # "stop", "length", or None while generating
    stats: Stats = field(default_factory=Stats)


class ModelMemo:
    """What one model keeps between conversations.

    Image features by content hash, so asking again about a picture skips the
    encoder, and the KV of the constant prompt prefix before the image (system
    turn and template), so a new conversation prefills it only once per model.
    """

    def __init__(self, images: int = 8):
        self.images = images
        self.features: OrderedDict[str, mx.array] = OrderedDict()
        self.prefix: tuple[list[int], list[tuple[mx.array, mx.array]]] | None = None

    @classmethod
    def of(cls, model: Model) -> "ModelMemo":
        memo = getattr(model, "_memo", None)
        if memo is None:
            memo = cls()
            object.__setattr__(model, "_memo", memo)  # a plain attribute, not a parameter
        return memo

    def remember_features(self, key: str, features: mx.array) -> None:
        self.features[key] = features
        while len(self.features) > self.images:
            self.features.popitem(last=False)


def image_digest(image: Image.Image, resolution: int) -> str:
    """Of the RGB pixels the encoder sees (palette indices alone would let two images collide)."""
    digest = hashlib.sha256(image.tobytes())
    digest.update(f"{image.mode}{image.size}{resolution}".encode())
    return digest.hexdigest()


class TextStream:
    """Turns sampled ids into text pieces whose concatenation equals the tokenizer's
    decode of all of them: ids are held back only while they end in an incomplete
    UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def add(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


class Chat:
    """A conversation about one image.

    The image is encoded once; every turn reuses the KV cache of the
    conversation so far and prefills only the tokens the cache does not hold.
    """

    def __init__(self, model: Model, tokenizer, image: str | Path | Image.Image | None = None,
                 system: str = DEFAULT_SYSTEM, resolution: int | None = None,
                 fastv: FastV | str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.model = model
        num_layers = model.args.text_config.num_hidden_layers
        self.fastv = FastV.parse(fastv, num_layers) if isinstance(fastv, str) else fastv
        self.tokenizer = tokenizer
        self.system = system
        self.max_pixels = max_pixels
        vision = model.args.vision_config
        self.resolution = vision.image_size if resolution is None else resolution
        vision.check_resolution(self.resolution)
        self.context = model.args.context_length
        visual = (self.resolution // vision.stride) ** 2
        if visual + len(first_turn(tokenizer, system, "")) > self.context:
            raise FastVLMError(
                f"at resolution {self.resolution} an image takes {visual} tokens and the model's "
                f"context is {self.context}: choose a lower resolution"
            )
        # The embedding table is padded past the tokenizer's ids: never sample those.
        vocab = model.args.text_config.vocab_size
        self.mask = mx.where(mx.arange(vocab) < len(tokenizer), 0.0, -mx.inf) if len(tokenizer) < vocab else None
        self._turn = 0  # bumped by every answer: a superseded stream stops and records nothing
        self.stop_ids = set(tokenizer.eos_token_ids) | {
            tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
        }
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.features: mx.array | None = None
        self.vision_s = 0.0
        self._vision_pending = False
        self.reset()
        if image is not None:
            self.set_image(image)

    def set_image(self, image: str | Path | Image.Image) -> None:
        """Encode a new picture (once) and start a fresh conversation about it."""
        image = to_rgb(image) if isinstance(image, Image.Image) else load_image(image, self.max_pixels)
        memo = ModelMemo.of(self.model)
        key = image_digest(image, self.resolution)
        start = time.perf_counter()
        self.features = memo.features.get(key)
        if self.features is None:
            features = self.model.encode_image(preprocess(image, self.resolution))
            mx.eval(features)  # computed once, reused by every turn
            check_finite(features, "the vision tower's image features")
            self.features = features
            memo.remember_features(key, features)
        else:
            memo.features.move_to_end(key)
        self.vision_s = time.perf_counter() - start
        self.reset()
        self._vision_pending = True  # the next answer's TTFT includes the encoding

    def reset(self) -> None:
        """Forget the conversation; the image stays."""
        self._turn += 1
        self.tokens: list[int] = []  # the conversation's ids, the image slot as one marker
        self.cached: list[int] = []  # the ids whose keys and values the cache holds
        self.cache = make_prompt_cache(self.model.language_model)

    @property
    def visual_tokens(self) -> int:
        return 0 if self.features is None else self.features.shape[1]

    def expanded_length(self, ids: list[int]) -> int:
        """Sequence length once the image slot is expanded to its features."""
        return len(ids) + (self.visual_tokens - 1 if IMAGE_TOKEN_INDEX in ids else 0)

    def prompt_ids(self, question: str) -> list[int]:
        """The whole conversation with the new question, ready for the answer."""
        if self.tokens:
            return self.tokens + next_turn(self.tokenizer, question)
        return first_turn(self.tokenizer, self.system, question, self.features is not None)

    def ask(self, question: str, max_tokens: int = 256, temperature: float = 0.0,
            top_p: float = 1.0) -> Iterator[GenerationResponse]:
        """Stream the answer to one more question; the history is kept even if interrupted.

        Asking again supersedes a stream still open: it yields nothing more and
        leaves the history to the newer answer.
        """
        if max_tokens < 1:
            raise FastVLMError(f"max_tokens must be at least 1, got {max_tokens}")
        self._turn += 1
        turn = self._turn
        full = self.prompt_ids(question)
        length = self.expanded_length(full)
        if length >= self.context:
            raise FastVLMError(
                f"the prompt is {length} tokens but the model's context is {self.context}; "
                "ask a shorter question or /reset the conversation"
            )
        max_tokens = min(max_tokens, self.context - length)
        self._seed_prefix(full)
        keep = self._reuse_cache(full)
        new = full[keep:]
        stats = Stats(visual_tokens=self.visual_tokens, prompt_tokens=self.expanded_length(new))
        if self._vision_pending:
            stats.vision_s = self.vision_s
            self._vision_pending = False
        sampler = make_sampler(temperature, top_p if top_p < 1.0 else 0.0)
        if self.mask is not None:
            sampler = _masked(sampler, self.mask)
        sampled: list[int] = []
        try:
            start = time.perf_counter()
            logprobs = prefill(self.model, new, self.features, self.cache, self.fastv)
            first = sampler(logprobs)
            mx.eval(first, logprobs)
            check_finite(logprobs, "the decoder's logits in the prefill")
            stats.prefill_s = time.perf_counter() - start
            self._remember_prefix(full)
            if self.fastv and IMAGE_TOKEN_INDEX in new:
                stats.visual_kept = self.fastv.kept(self.visual_tokens)
            steps = itertools.chain(
                [(first.item(), logprobs[0])],
                generate_step(first, self.model.language_model, max_tokens=max_tokens - 1,
                              sampler=sampler, prompt_cache=self.cache),
            )
            text = TextStream(self.tokenizer)
            finish, piece = "length", ""
            for token, logprobs in steps:
                sampled.append(token)
                stats.generation_tokens = len(sampled)
                stats.decode_s = time.perf_counter() - start - stats.prefill_s
                done = token in self.stop_ids or len(sampled) == max_tokens
                if done or len(sampled) % FINITE_CHECK_EVERY == 0:
                    check_finite(logprobs, f"the decoder's logits at answer token {len(sampled)}")
                if token in self.stop_ids:
                    finish = "stop"
                    break
                piece = text.add(token)
                if done:
                    break
                yield GenerationResponse(piece, token, logprobs, None, stats)
                if turn != self._turn:  # superseded while suspended: touch nothing more
                    return
                piece = ""
            yield GenerationResponse(piece + text.flush(), token, logprobs, finish, stats)
        finally:
            if turn == self._turn:
                self._record_turn(full, sampled)

    def _seed_prefix(self, full: list[int]) -> None:
        """Start a fresh conversation from the model's cached prompt prefix, if it fits."""
        prefix = ModelMemo.of(self.model).prefix
        if self.cached or prefix is None or full[: len(prefix[0])] != prefix[0]:
            return
        for c, (keys, values) in zip(self.cache, prefix[1]):
            c.keys, c.values, c.offset = keys[...], values[...], keys.shape[2]
        self.cached = list(prefix[0])

    def _remember_prefix(self, full: list[int]) -> None:
        """Keep the KV of the ids before the image slot, the same for every image."""
        if IMAGE_TOKEN_INDEX not in full:
            return
        n = full.index(IMAGE_TOKEN_INDEX)
        memo = ModelMemo.of(self.model)
        if n == 0 or (memo.prefix is not None and memo.prefix[0] == full[:n]):
            return
        layers = [(c.keys[..., :n, :], c.values[..., :n, :]) for c in self.cache]
        memo.prefix = (full[:n], layers)

    def _reuse_cache(self, full: list[int]) -> int:
        """Trim the cache to the longest prefix of `full` it holds; return that length."""
        keep = 0
        for a, b in zip(self.cached, full):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(full) - 1)  # at least one token must be prefilled
        target = self.expanded_length(full[:keep])
        for c in self.cache:
            c.trim(c.offset - target)
        self.cached = full[:keep]
        return keep

    def _record_turn(self, full: list[int], sampled: list[int]) -> None:
        """Close the answer with <|im_end|> and note which ids the cache really holds."""
        answer = sampled[:-1] if sampled and sampled[-1] in self.stop_ids else sampled
        self.tokens = full + answer + [self.im_end]
        fed = full + sampled
        # generate_step feeds each token before yielding it, except at max_tokens, and
        # an interrupt can land between layers: trust the smallest offset.
        offset = min(c.offset for c in self.cache)
        self.cached = fed[: self._ids_within(fed, offset)]

    def _ids_within(self, ids: list[int], offset: int) -> int:
        """How many leading ids are wholly inside the first `offset` positions."""
        if IMAGE_TOKEN_INDEX not in ids:
            return min(offset, len(ids))
        slot = ids.index(IMAGE_TOKEN_INDEX)
        if offset <= slot:
            return offset
        if offset < slot + self.visual_tokens:
            return slot
        return min(offset - self.visual_tokens + 1, len(ids))


# A check waits for the step generate_step has already queued, so decoding checks
# its logits every few tokens and at the end, not at each one.
FINITE_CHECK_EVERY = 16


def check_finite(x: mx.array, what: str) -> None:
    """Refuse values that overflowed (half precision's range is narrow) instead of
    turning them into garbage text."""
    if not mx.isfinite(x).all().item():
        raise FastVLMError(f"{what} came out non-finite (inf or NaN) in {str(x.dtype).rsplit('.', 1)[-1]}: "
                           "half precision overflowed; run in float32 (--dtype float32)")


def _masked(sampler, mask: mx.array):
    """A sampler that never picks the ids `mask` sets to -inf."""
    return lambda logprobs: sampler(logprobs + mask)


def stream_generate(model: Model, tokenizer, image: str | Path | Image.Image, prompt: str,
                    max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                    system: str = DEFAULT_SYSTEM, resolution: int | None = None,
                    fastv: FastV | str | None = None) -> Iterator[GenerationResponse]:
    """Answer one question about one image, streamed; fastv="K:R" prunes visual tokens."""
    chat = Chat(model, tokenizer, image, system=system, resolution=resolution, fastv=fastv)
    yield from chat.ask(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p)


def generate(model: Model, tokenizer, image: str | Path | Image.Image, prompt: str,
             **kwargs) -> str:
    """Answer one question about one image; the whole text at once."""
    return "".join(r.text for r in stream_generate(model, tokenizer, image, prompt, **kwargs))
