"""Where the vision tower's time goes, by kind of layer, against the matmul peak.

    python -m fastvlm_mlx.bench.tower --resolution 1024

The tower runs once as chat runs it, then again with each kind of layer timed on
its own: evaluation is forced before and after each call, and a call's time and
FLOPs leave out those of the timed layers inside it. Each kind's FLOPs (flops.py's
convention) over the matmul peak give the least time it could take at that peak;
the FLOPs of the whole tower over the peak are the tower's floor. What is left of
the timed run (GELUs outside the ConvFFNs, residual adds, norms) is "rest". The CPU
kernels run a ConvFFN's two 1x1 convs and its GELU fused, band by band, so they are
timed as one; on the portable path its 1x1 convs count as 1x1 convs.

The ConvFFNs' 1x1 convs are then timed alone, as the kernels run the ConvFFN with
its GELU replaced by the identity, on inputs of the shapes the tower gives them:
the speed the BLAS reaches on those products (small K or N keep it under the peak).
With them at that speed, the depthwise convs as timed and every other FLOP at the
peak, the tower could take no less than the last line's floor on this machine.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from unittest import mock

import mlx.core as mx
import numpy as np
import typer

from fastvlm_mlx import kernels
from fastvlm_mlx.errors import exit_codes
from fastvlm_mlx.fastvithd import MHSA, Conv2d, ConvFFN, FastViTHD, VisionConfig
from fastvlm_mlx.kernels import cpu, portable
from fastvlm_mlx.utils import keep_freed_buffers

from .flops import matmul_peak, module_macs, vision_flops
from .harness import random_config, random_model


@dataclass
class Kind:
    """One kind of layer: its calls, FLOPs and seconds in one timed run."""

    calls: int = 0
    flops: int = 0
    seconds: float = 0.0


def conv_kind(conv: Conv2d) -> str:
    """Depthwise, 1x1 or dense, with the kernel size: the kernels compute each differently."""
    _, k, _, in_per_group = conv.weight.shape
    if conv.groups > 1 and in_per_group == 1:
        return f"depthwise conv {k}x{k}"
    return "1x1 conv" if k == 1 else f"dense conv {k}x{k}"


KINDS: dict[type, Callable] = {
    Conv2d: conv_kind,
    ConvFFN: lambda _: "ConvFFN 1x1 convs + GELU",  # its depthwise conv is timed as a conv
    MHSA: lambda _: "attention (MHSA)",
}


@contextlib.contextmanager
def timed_layers(kinds: dict[str, Kind]) -> Iterator[None]:
    """Every call of the classes in KINDS timed into `kinds`, exclusive of timed calls inside it."""
    inner: list[list[float]] = []  # per open call: [seconds, flops] of the timed calls inside it
    originals = {cls: cls.__call__ for cls in KINDS}

    def wrap(cls: type, call: Callable) -> Callable:
        def timed(self, x: mx.array) -> mx.array:
            mx.eval(x)
            inner.append([0.0, 0])
            start = time.perf_counter()
            out = call(self, x)
            mx.eval(out)
            seconds = time.perf_counter() - start
            flops = 2 * module_macs(self, x.shape[1], x.shape[2])[0]
            nested_s, nested_flops = inner.pop()
            kind = kinds.setdefault(KINDS[cls](self), Kind())
            kind.calls += 1
            kind.seconds += seconds - nested_s
            kind.flops += flops - nested_flops
            if inner:
                inner[-1][0] += seconds
                inner[-1][1] += flops
            return out

        return timed

    with contextlib.ExitStack() as stack:
        for cls, call in originals.items():
            stack.enter_context(mock.patch.object(cls, "__call__", wrap(cls, call)))
        yield


def breakdown(tower: FastViTHD, resolution: int, runs: int) -> tuple[list[float], list[float], list[dict[str, Kind]]]:
    """Seconds of each plain run, of each timed run, and the kinds of each timed run, alternating."""
    x = mx.random.uniform(shape=(1, resolution, resolution, 3))
    mx.eval(x, tower(x))  # warm-up: compiled kernels, allocator cache
    plain, timed, kinds = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        mx.eval(tower(x))
        plain.append(time.perf_counter() - start)
        run: dict[str, Kind] = {}
        with timed_layers(run):
            start = time.perf_counter()
            mx.eval(tower(x))
            timed.append(time.perf_counter() - start)
        kinds.append(run)
    return plain, timed, kinds


@contextlib.contextmanager
def identity_gelu() -> Iterator[None]:
    """The ConvFFN's GELU, as either kernel path computes it, replaced by the identity."""
    with mock.patch.object(cpu, "_gelu_rational", lambda h, bias: h), mock.patch.object(portable, "gelu", lambda h: h):
        yield


def convffn_products(tower: FastViTHD, resolution: int, runs: int) -> tuple[list[float], int, int]:
    """Seconds per run of every ConvFFN's two 1x1 convs alone, as the kernels run the
    ConvFFN (band by band on the CPU) with its GELU left out, on random inputs of the
    shapes the tower gives them; and their FLOPs and the number of ConvFFNs."""
    shapes = []
    original = ConvFFN.__call__
    with mock.patch.object(ConvFFN, "__call__", lambda self, x: shapes.append((self, x.shape)) or original(self, x)):
        mx.eval(tower(mx.random.uniform(shape=(1, resolution, resolution, 3))))
    seconds, flops = [0.0] * runs, 0
    with identity_gelu():
        for ffn, shape in shapes:
            flops += 2 * 2 * math.prod(shape) * ffn.fc1.weight.shape[0]  # two products, C x hidden a pixel
            x = mx.random.normal(shape)
            mx.eval(x, kernels.pointwise_ffn(x, ffn.fc1, ffn.fc2))  # warm-up
            for run in range(runs):
                start = time.perf_counter()
                mx.eval(kernels.pointwise_ffn(x, ffn.fc1, ffn.fc2))
                seconds[run] += time.perf_counter() - start
    return seconds, flops, len(shapes)


def main(
    resolution: int = typer.Option(1024, help="Input side in pixels, a multiple of 64."),
    runs: int = typer.Option(3, min=1, help="Plain and timed runs, alternating, after one warm-up."),
) -> None:
    keep_freed_buffers()
    config = VisionConfig()
    with exit_codes():
        config.check_resolution(resolution)
    model = random_model(random_config("0.5b"), mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16)
    dtype = model.vision_tower.patch_embed[0].reparam_conv.weight.dtype
    peak, size = matmul_peak(dtype)
    plain, timed, kinds = breakdown(model.vision_tower, resolution, runs)
    total_flops = vision_flops(config, resolution)
    median = lambda values: float(np.median(values))  # noqa: E731
    print(f"vision tower: FastViTHD at {resolution} px, random weights, {mx.default_device()}, "
          f"{str(dtype).split('.')[-1]}; medians of {runs} runs")
    print(f"matmul peak {peak:,.0f} GFLOP/s ({size}x{size}); the tower's {total_flops / 1e9:.0f} GFLOP "
          f"take {total_flops / peak / 1e9 * 1e3:,.0f} ms at it")
    print(f"tower as chat runs it: {median(plain) * 1e3:,.0f} ms; with every layer timed on its own: "
          f"{median(timed) * 1e3:,.0f} ms")
    print(f"{'kind':<28}{'calls':>6}{'ms':>9}{'share':>8}{'GFLOP':>8}{'GFLOP/s':>9}{'of peak':>9}{'ms at peak':>12}")
    names = sorted(kinds[0], key=lambda k: -kinds[0][k].seconds)
    for name in names:
        k = kinds[0][name]
        seconds = median([run[name].seconds for run in kinds])
        print(f"{name:<28}{k.calls:>6}{seconds * 1e3:>9,.0f}{seconds / median(timed):>8.0%}{k.flops / 1e9:>8.1f}"
              f"{k.flops / seconds / 1e9:>9.1f}{k.flops / seconds / 1e9 / peak:>9.0%}{k.flops / peak / 1e6:>12,.0f}")
    rest = median([t - sum(k.seconds for k in run.values()) for t, run in zip(timed, kinds)])
    rest_flops = total_flops - sum(k.flops for k in kinds[0].values())
    print(f"{'rest':<28}{'':>6}{rest * 1e3:>9,.0f}{rest / median(timed):>8.0%}{rest_flops / 1e9:>8.1f}")
    ffn_seconds, ffn_flops, calls = convffn_products(model.vision_tower, resolution, runs)
    ffn = median(ffn_seconds)
    print(f"{'ConvFFN 1x1 convs alone':<28}{calls:>6}{ffn * 1e3:>9,.0f}{'':>8}{ffn_flops / 1e9:>8.1f}"
          f"{ffn_flops / ffn / 1e9:>9.1f}{ffn_flops / ffn / 1e9 / peak:>9.0%}")
    depthwise = [name for name in kinds[0] if name.startswith("depthwise")]
    depthwise_s = sum(median([run[name].seconds for run in kinds]) for name in depthwise)
    other_flops = total_flops - ffn_flops - sum(kinds[0][name].flops for name in depthwise)
    floor = depthwise_s + ffn + other_flops / peak / 1e9
    print(f"floor: depthwise convs as timed ({depthwise_s * 1e3:,.0f} ms), the ConvFFNs' 1x1 convs alone "
          f"({ffn * 1e3:,.0f} ms), every other FLOP at the peak ({other_flops / peak / 1e6:,.0f} ms): "
          f"{floor * 1e3:,.0f} ms")


if __name__ == "__main__":
    typer.run(main)
