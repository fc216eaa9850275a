"""Generation: a multi-turn chat about one image on mlx-lm's KV cache and sampler."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.sample_utils import make_sampler
from PIL import Image

from .defaults import DEFAULT_MAX_PIXELS, DEFAULT_SYSTEM
from .errors import FastVLMError
from .fastv import FastV
from .fastv import prefill as fastv_prefill
from .fastvlm import IMAGE_TOKEN_INDEX, Model
from .processor import first_turn, load_image, next_turn, preprocess, to_rgb
from .prompt_cache import ModelMemo, PromptCache, image_digest


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


def stream_answer(model: Model, tokenizer, cache: PromptCache, prompt: list[int],
                  features: mx.array | None, sampler, max_tokens: int, stop_ids: set[int],
                  stats: Stats, fastv: FastV | None = None) -> Iterator[GenerationResponse]:
    """Prefill what `cache` lacks of `prompt`, then sample up to `max_tokens`, streamed.

    The last response has a finish_reason: "stop" (its token is the stop id, not
    shown as text) or "length".
    """
    new = prompt[cache.reuse(prompt):]
    stats.prompt_tokens = cache.positions(new)
    start = time.perf_counter()
    logprobs = prefill(model, new, features, cache.layers, fastv)
    first = sampler(logprobs)
    mx.eval(first, logprobs)
    check_finite(logprobs, "the decoder's logits in the prefill")
    stats.prefill_s = time.perf_counter() - start
    cache.share_prefix(prompt)
    if fastv and IMAGE_TOKEN_INDEX in new:
        stats.visual_kept = fastv.kept(cache.visual_tokens)
    steps = itertools.chain(
        [(first.item(), logprobs[0])],
        generate_step(first, model.language_model, max_tokens=max_tokens - 1, sampler=sampler,
                      prompt_cache=cache.layers),
    )
    text = TextStream(tokenizer)
    for n, (token, logprobs) in enumerate(steps, 1):
        stats.generation_tokens = n
        stats.decode_s = time.perf_counter() - start - stats.prefill_s
        finish = "stop" if token in stop_ids else "length" if n == max_tokens else None
        yield respond(text, token, logprobs, n, finish, stats)
        if finish:
            return


def respond(text: TextStream, token: int, logprobs: mx.array, n: int, finish: str | None,
            stats: Stats) -> GenerationResponse:
    """The response for answer token `n` (finish: None, "stop" or "length"); a stop
    token is not shown. Logits are checked at the first token, every few and the last."""
    if finish or n == 1 or n % FINITE_CHECK_EVERY == 0:
        check_finite(logprobs, f"the decoder's logits at answer token {n}")
    if finish == "stop":
        return GenerationResponse(text.flush(), token, logprobs, finish, stats)
    piece = text.add(token)
    return GenerationResponse(piece + text.flush() if finish else piece, token, logprobs, finish, stats)


@dataclass
class _Sequence:
    cache: PromptCache
    prompt: list[int]
    stats: Stats
    start: float
    text: TextStream
    sampled: list[int] = field(default_factory=list)


class BatchDecoder:
    """Many answers decoded together on mlx-lm's BatchGenerator (continuous batching):
    the one batched path of `serve` and `caption`.

    Each sequence is prefilled on its own PromptCache as stream_answer does (image
    spliced in, only what the cache lacks) but for its last token, which the
    generator feeds; then it decodes with the others, left-padded to a common
    length. A finished or cancelled sequence leaves its KV in its PromptCache.
    """

    def __init__(self, model: Model, tokenizer, stop_ids: set[int], max_batch: int):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.generator = BatchGenerator(model.language_model, stop_tokens=[[i] for i in sorted(stop_ids)],
                                        completion_batch_size=max_batch, prefill_batch_size=max_batch)
        self.sequences: dict[int, _Sequence] = {}

    def add(self, cache: PromptCache, prompt: list[int], features: mx.array | None, sampler,
            max_tokens: int, stats: Stats) -> int:
        """Prefill one sequence and queue it for decoding; its uid."""
        new = prompt[cache.reuse(prompt):]
        stats.prompt_tokens = cache.positions(new)
        start = time.perf_counter()
        if len(new) > 1:
            check_finite(prefill(self.model, new[:-1], features, cache.layers),
                         "the decoder's logits in the prefill")
        cache.share_prefix(prompt)
        uid = self.generator.insert([[new[-1]]], max_tokens=[max_tokens], caches=[cache.layers],
                                    samplers=[sampler])[0]
        self.sequences[uid] = _Sequence(cache, prompt, stats, start, TextStream(self.tokenizer))
        return uid

    def step(self) -> list[tuple[int, GenerationResponse]]:
        """One token for every sequence in the batch (sequences still being admitted
        may give none)."""
        out = []
        for r in self.generator.next_generated():
            seq = self.sequences[r.uid]
            seq.sampled.append(r.token)
            n = len(seq.sampled)
            now = time.perf_counter() - seq.start
            if n == 1:
                seq.stats.prefill_s = now
            seq.stats.generation_tokens, seq.stats.decode_s = n, now - seq.stats.prefill_s
            finish = r.finish_reason and ("stop" if r.token in self.stop_ids else "length")
            if finish:
                self._settle(r.uid, r.prompt_cache)
            out.append((r.uid, respond(seq.text, r.token, r.logprobs, n, finish, seq.stats)))
        return out

    def cancel(self, uid: int) -> None:
        """Stop a sequence now; its cache keeps what was fed."""
        if uid not in self.sequences:
            return
        layers = self.generator.remove([uid], return_prompt_caches=True).get(uid, (None,))[0]
        self._settle(uid, layers)

    def _settle(self, uid: int, layers: list | None) -> None:
        seq = self.sequences.pop(uid)
        if layers:
            seq.cache.layers = layers
        seq.cache.settle(seq.prompt + seq.sampled)


def stop_ids(tokenizer) -> set[int]:
    """The ids that end an answer: the tokenizer's end of sequence, <|im_end|>, <|endoftext|>."""
    return set(tokenizer.eos_token_ids) | {
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}


def make_answer_sampler(tokenizer, model: Model, temperature: float, top_p: float):
    """mlx-lm's sampler, never picking the ids past the tokenizer's vocabulary that pad
    the embedding table."""
    sampler = make_sampler(temperature, top_p if top_p < 1.0 else 0.0)
    vocab = model.args.text_config.vocab_size
    if len(tokenizer) >= vocab:
        return sampler
    mask = mx.where(mx.arange(vocab) < len(tokenizer), 0.0, -mx.inf)
    return lambda logprobs: sampler(logprobs + mask)


class Chat:
    """A conversation about one image.

    The image is encoded once; every turn reuses the KV cache of the
    conversation so far (a PromptCache) and prefills only the tokens it does
    not hold.
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
        self._turn = 0  # bumped by every answer: a superseded stream stops and records nothing
        self.stop_ids = stop_ids(tokenizer)
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
        start = time.perf_counter()
        self.features = encode(self.model, image, self.resolution)
        self.vision_s = time.perf_counter() - start
        self.reset()
        self._vision_pending = True  # the next answer's TTFT includes the encoding

    def reset(self) -> None:
        """Forget the conversation; the image stays."""
        self._turn += 1
        self.tokens: list[int] = []  # the conversation's ids, the image slot as one marker
        self.cache = PromptCache(self.model, self.visual_tokens)

    @property
    def visual_tokens(self) -> int:
        return 0 if self.features is None else self.features.shape[1]

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
        prompt = self.prompt_ids(question)
        length = self.cache.positions(prompt)
        if length >= self.context:
            raise FastVLMError(
                f"the prompt is {length} tokens but the model's context is {self.context}; "
                "ask a shorter question or /reset the conversation"
            )
        stats = Stats(visual_tokens=self.visual_tokens, vision_s=self.vision_s if self._vision_pending else 0.0)
        self._vision_pending = False
        sampler = make_answer_sampler(self.tokenizer, self.model, temperature, top_p)
        sampled: list[int] = []
        try:
            for response in stream_answer(self.model, self.tokenizer, self.cache, prompt, self.features,
                                          sampler, min(max_tokens, self.context - length), self.stop_ids,
                                          stats, self.fastv):
                sampled.append(response.token)
                yield response
                if turn != self._turn:  # superseded while suspended: touch nothing more
                    return
        finally:
            if turn == self._turn:
                answer = sampled[:-1] if sampled and sampled[-1] in self.stop_ids else sampled
                self.tokens = prompt + answer + [self.im_end]  # closed for the template
                self.cache.settle(prompt + sampled)


def encode(model: Model, image: Image.Image, resolution: int) -> mx.array:
    """The image's features [1, N, d], from the model's memo when the same pixels were
    encoded before; evaluated here, once, for every turn that uses them."""
    memo = ModelMemo.of(model)
    key = image_digest(image, resolution)
    features = memo.features.get(key)
    if features is not None:
        memo.features.move_to_end(key)
        return features
    features = model.encode_image(preprocess(image, resolution))
    mx.eval(features)
    check_finite(features, "the vision tower's image features")
    memo.remember_features(key, features)
    return features


# A check waits for the step generate_step has already queued, so decoding checks
# its logits every few tokens and at the end, not at each one.
FINITE_CHECK_EVERY = 16


def check_finite(x: mx.array, what: str) -> None:
    """Refuse values that overflowed (half precision's range is narrow) instead of
    turning them into garbage text."""
    if not mx.isfinite(x).all().item():
        raise FastVLMError(f"{what} came out non-finite (inf or NaN) in {str(x.dtype).rsplit('.', 1)[-1]}: "
                           "half precision overflowed; run in float32 (--dtype float32)")


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
