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
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import typer

from fastvlm_mlx.errors import exit_codes
from fastvlm_mlx.fastvithd import MHSA, Conv2d, ConvFFN, FastViTHD, VisionConfig
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

    try:
        for cls, call in originals.items():
            cls.__call__ = wrap(cls, call)
        yield
    finally:
        for cls, call in originals.items():
            cls.__call__ = call


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


if __name__ == "__main__":
    typer.run(main)
