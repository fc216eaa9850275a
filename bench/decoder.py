"""Prefill and decode of the decoder in float and quantized, against the memory bound.

    python -m fastvlm_mlx.bench.decoder --random 0.5b --bits 0,8,4

A decode step reads every weight of the decoder once (the tied head reads the
whole embedding), so tokens/s can be no more than the machine's memory bandwidth
divided by those bytes. The bandwidth is measured first, as a streaming copy
(every byte read once and written once, on every core), and each decode is
printed as a fraction of that bound. A second bound is the product itself: the
LM head (the largest matrix) times one row, as decode computes it, read at its
own bytes/s; decode can go no faster than that rate over all weights. The
variants run alternately in one process, round after round, so the ratios
compare like with like. Last, the first variant's prefill products are timed
alone, the least its prefill could take with everything between them free, and
its decode step with every product trivial, what a step costs besides them, set
against the time MLX takes to evaluate one small op.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from unittest import mock

import mlx.core as mx
import numpy as np
import typer
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from fastvlm_mlx.fastvlm import Model, quantize
from fastvlm_mlx.generation import prefill
from fastvlm_mlx.kernels import cpu, portable
from fastvlm_mlx.utils import keep_freed_buffers

from .flops import copy_bandwidth, decode_bytes, fastest
from .harness import DECODERS, random_config, random_model


def head_rate(model: Model, repeats: int = 5) -> float:
    """Bytes/s at which the LM head's one-row product (decode's kernel) reads its weights."""
    lm = model.language_model
    head = lm.model.embed_tokens if lm.args.tie_word_embeddings else lm.lm_head
    h = mx.random.normal((1, 1, lm.args.hidden_size))
    return sum(v.nbytes for _, v in tree_flatten(head.parameters())) / fastest(lambda: model.lm_head(h), repeats)


@contextlib.contextmanager
def identity_swiglu() -> Iterator[None]:
    """The MLP's silu(gate) * up, as either kernel path computes it, replaced by gate
    (with up still computed)."""
    def gate_only(gate: mx.array, up: mx.array) -> mx.array:
        return mx.depends(gate, up)

    with mock.patch.object(cpu, "_swiglu", gate_only), mock.patch.object(portable, "swiglu", gate_only):
        yield


def prefill_products(model: Model, positions: int, repeats: int = 3) -> float:
    """Seconds of a prefill's products alone, on `positions` random rows as the kernels
    compute them: each layer's q, k, v and o projections, and its MLP with the silu
    left out; the head on the last position (the fastest of `repeats` each). The
    least a prefill could take if everything between the products cost nothing."""
    lm = model.language_model
    seconds = fastest(lambda: model.lm_head(mx.random.normal((1, 1, lm.args.hidden_size))), repeats)
    x = mx.random.normal((1, positions, lm.args.hidden_size))
    with identity_swiglu():
        for layer in lm.model.layers:
            attn = layer.self_attn
            heads = mx.random.normal((1, positions, attn.o_proj.weight.shape[1]))
            mx.eval(x, heads)
            seconds += fastest(lambda: [p(x) for p in (attn.q_proj, attn.k_proj, attn.v_proj)], repeats)  # noqa: B023
            seconds += fastest(lambda: attn.o_proj(heads), repeats)  # noqa: B023
            seconds += fastest(lambda: layer.mlp(x), repeats)  # noqa: B023
    return seconds


@contextlib.contextmanager
def trivial_products() -> Iterator[None]:
    """Every float product of the decoder, on either kernel path, replaced by a view of
    its input in the product's shape: no arithmetic, only views."""
    def trivial(x: mx.array, weight: mx.array, *_) -> mx.array:
        return mx.broadcast_to(x[..., :1], (*x.shape[:-1], weight.shape[0]))

    with mock.patch.object(cpu, "_cut_product", trivial), mock.patch.object(portable, "linear", trivial):
        yield


def decode_steps(model: Model, ids: list[int], rounds: int = 9) -> tuple[float, float]:
    """Median seconds of one decode step after a prefill of `ids`, as it is and with
    trivial_products(), taken alternately; the cache is trimmed back after each step."""
    lm = model.language_model
    cache = make_prompt_cache(lm)
    mx.eval(prefill(model, ids, None, cache))
    token = mx.array([[0]])

    def step() -> float:
        start = time.perf_counter()
        mx.eval(lm(token, cache=cache))
        trim_prompt_cache(cache, 1)
        return time.perf_counter() - start

    def trivial_step() -> float:
        with trivial_products():
            return step()

    times = np.array([(step(), trivial_step()) for _ in range(rounds + 1)][1:])
    return tuple(np.median(times, axis=0))


def op_seconds(ops: int = 1000) -> float:
    """Seconds MLX takes to evaluate one small op: a chain of `ops` multiplies of one row."""
    x = mx.random.normal((1, 1024))
    mx.eval(x)

    def chain() -> mx.array:
        y = x
        for _ in range(ops):
            y = y * 1.0
        return y

    return fastest(chain) / ops


def time_once(model: Model, ids: list[int], tokens: int) -> tuple[float, float]:
    """Seconds of the prefill (to the first token) and decode tokens/s after it."""
    cache = make_prompt_cache(model.language_model)
    sampler = make_sampler(0.0)
    start = time.perf_counter()
    first = sampler(prefill(model, ids, None, cache))
    mx.eval(first)
    prefilled = time.perf_counter()
    for _ in generate_step(first, model.language_model, max_tokens=tokens, sampler=sampler, prompt_cache=cache):
        pass
    mx.synchronize(generation_stream)
    return prefilled - start, tokens / (time.perf_counter() - prefilled)


def main(
    random: str = typer.Option("0.5b", help=f"Random weights in these published shapes: {', '.join(DECODERS)}."),
    bits: str = typer.Option("0,8,4", help="Comma-separated: 0 for the float weights, 4 or 8 for quantized."),
    prompt_tokens: int = typer.Option(304, min=1, help="Positions prefilled (256 visual + 48 text at 1024 px)."),
    tokens: int = typer.Option(32, min=1, help="Tokens decoded after the first."),
    runs: int = typer.Option(3, min=1, help="Alternating rounds counted, after one warm-up round."),
    group_size: int = typer.Option(64, help="Quantization group size."),
) -> None:
    keep_freed_buffers()
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    config = random_config(random)
    variants = {}
    for b in (int(b) for b in bits.split(",")):
        model = random_model(config, dtype)
        if b:
            quantize(model.language_model, group_size, b, lambda _, m: hasattr(m, "to_quantized"))
            mx.eval(model.parameters())
        variants[f"{b}-bit" if b else str(dtype).split(".")[-1]] = model
    bandwidth = copy_bandwidth()
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], prompt_tokens).tolist()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for round_ in range(runs + 1):
        for name, model in variants.items():
            sample = time_once(model, ids, tokens)
            if round_:
                samples[name].append(sample)
    print(f"decoder: random {random} weights, {mx.default_device()}, {prompt_tokens}-position prefill, "
          f"{tokens} tokens decoded; medians of {runs} alternating rounds, x first: median of the rounds' ratios")
    print(f"memory bound: streaming copy {bandwidth / 1e9:.1f} GB/s (read + written)")
    print(f"{'':>9}{'':>12}{'':>12}{'':>9}{'':>14}{'':>9}{'':>7}{'copy bound':>23}{'product bound':>29}")
    print(f"{'weights':>9}{'read/token':>12}{'prefill ms':>12}{'x first':>9}{'decode tok/s':>14}"
          f"{'x first':>9}{'GB/s':>7}{'tok/s':>13}{'of it':>10}{'GB/s':>10}{'tok/s':>9}{'of it':>10}")
    first = np.array(samples[next(iter(variants))])
    for name, model in variants.items():
        sample = np.array(samples[name])
        prefill_s, tps = np.median(sample, axis=0)
        prefill_x, tps_x = np.median(sample / first, axis=0)  # each round against the first variant's
        read, rate = decode_bytes(model), head_rate(model)
        print(f"{name:>9}{read / 1e9:>10.2f}GB{prefill_s * 1e3:>12.0f}{prefill_x:>9.2f}{tps:>14.2f}"
              f"{tps_x:>9.2f}{tps * read / 1e9:>7.1f}{bandwidth / read:>13.2f}{tps * read / bandwidth:>10.0%}"
              f"{rate / 1e9:>10.1f}{rate / read:>9.2f}{tps * read / rate:>10.0%}")
    name, model = next(iter(variants.items()))
    products = prefill_products(model, prompt_tokens)
    print(f"{name} prefill's products alone (projections and MLPs on {prompt_tokens} positions, the head on one): "
          f"{products * 1e3:,.0f} ms, {products / np.median(first[:, 0]):.0%} of its prefill")
    whole, rest = decode_steps(model, ids)
    print(f"{name} decode step: {whole * 1e3:,.0f} ms, {rest * 1e3:,.0f} ms ({rest / whole:.0%}) of it with every "
          f"product trivial; MLX evaluates one small op in {op_seconds() * 1e6:.1f} us")


if __name__ == "__main__":
    typer.run(main)
