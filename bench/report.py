"""What a bench run leaves behind: the terminal tables, the JSON, the plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fastvlm_mlx.errors import FastVLMError
from fastvlm_mlx.utils import BLAS_HINT

from .flops import CONVENTION
from .harness import STAGES, Result

@dataclass
class Report:
    environment: dict
    model: dict
    settings: dict
    peak: dict  # the matmul peak: gflops, size, dtype
    memory: dict  # the memory bound: copy_bytes_per_s (a streaming copy), decode_bytes (read a step)
    results: list[Result]
    complete: bool = True

    def to_dict(self) -> dict:
        return {
            "complete": self.complete,
            "environment": self.environment,
            "model": self.model,
            "settings": self.settings,
            "matmul_peak": self.peak,
            "memory_bound": self.memory,
            "flop_convention": CONVENTION,
            "results": [{**r.to_dict(self.peak["gflops"]), "decode_memory": self.decode_memory(r)}
                        for r in self.results],
        }

    def decode_memory(self, result: Result) -> dict[str, float]:
        """Bytes/s a decode step reads at the median tokens/s, and that as a fraction of the copy bound."""
        rate = result.summary()["decode_tps"]["median"] * self.memory["decode_bytes"]
        return {"bytes_per_s": rate, "fraction_of_bound": rate / self.memory["copy_bytes_per_s"]}

    def blas_warning(self) -> str | None:
        blas = self.environment["blas"]
        return BLAS_HINT if blas and blas["reference"] else None


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")


def ms(seconds: float) -> str:
    """Milliseconds, to 0.1 below 100 ms."""
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def render(report: Report, console: Console) -> None:
    """The header, a latency table and a roofline table, one row per resolution."""
    env, model, peak = report.environment, report.model, report.peak
    blas = env["blas"]
    console.print(f"[bold]FastVLM TTFT[/bold]  {escape(model['source'])}")
    console.print(
        f"{env['device']} ({env['device_info'].get('device_name', '?')}), {env['dtype']}, "
        f"mlx {env['mlx']}" + (f", BLAS {blas['name']}" if blas else "")
    )
    console.print(
        f"weights {_bytes(model['weights_bytes'])} in memory ({env['dtype']}), loaded in {model['load_s']:.2f} s; "
        f"matmul peak {peak['gflops']:,.0f} GFLOP/s ({peak['size']}x{peak['size']} {peak['dtype']}); "
        f"memory bound {report.memory['copy_bytes_per_s'] / 1e9:.1f} GB/s (streaming copy, read + written), "
        f"a decode step reads {_bytes(report.memory['decode_bytes'])}"
    )
    if report.blas_warning():
        console.print(f"[yellow]warning: {report.blas_warning()}[/yellow]")
    if not report.results:
        console.print("no run completed")
        return
    s = report.settings
    latency = Table(box=box.SIMPLE_HEAD, title=(
        f"Latency in ms, median of {s['runs']} run(s) after {s['warmup']} warm-up; "
        f"decode over {s['max_tokens']} tokens"
    ))
    for name in ("px", "visual\ntokens", "prefill\ntokens", *STAGES, "TTFT", "TTFT\np10–p90",
                 "decode\ntok/s", "peak\nmemory"):
        latency.add_column(name, justify="right", no_wrap=True)
    roofline = Table(box=box.SIMPLE_HEAD, title=(
        f"Achieved GFLOP/s at the median (% of the {peak['gflops']:,.0f} GFLOP/s matmul peak); "
        f"decode's GB/s of weights read (% of the memory bound)"
    ))
    for name in ("px", "vision\nGFLOP", "vision\nGFLOP/s", "projector\nGFLOP/s",
                 "prefill\nGFLOP", "prefill\nGFLOP/s", "TTFT\nGFLOP/s", "decode\nGFLOP/s", "decode\nGB/s"):
        roofline.add_column(name, justify="right", no_wrap=True)
    for r in report.results:
        summary = r.summary()
        achieved = r.achieved(peak["gflops"])
        memory = report.decode_memory(r)
        ttft = summary["ttft_s"]
        latency.add_row(
            str(r.resolution), str(r.visual_tokens), str(r.prefill_tokens),
            *(ms(summary[f"{stage}_s"]["median"]) for stage in STAGES),
            f"[bold]{ms(ttft['median'])}[/bold]", f"{ms(ttft['p10'])}–{ms(ttft['p90'])}",
            f"{summary['decode_tps']['median']:.1f}", _bytes(r.peak_memory),
        )
        cell = {k: f"{v['gflops']:.1f} ({v['fraction_of_peak']:.0%})" for k, v in achieved.items()}
        roofline.add_row(
            str(r.resolution), f"{r.flops['vision'] / 1e9:.1f}", cell["vision"],
            cell["projector"], f"{r.flops['prefill'] / 1e9:.1f}", cell["prefill"],
            cell["ttft"], cell["decode"], f"{memory['bytes_per_s'] / 1e9:.1f} ({memory['fraction_of_bound']:.0%})",
        )
    console.print(latency)
    console.print(roofline)
    if s.get("fastv"):
        console.print(fastv_table(report))
    if not report.complete:
        done = ", ".join(f"{r.resolution} px ({r.runs} runs)" for r in report.results)
        console.print(f"[yellow]interrupted: measured {done} of {s['resolutions']}[/yellow]")


def fastv_table(report: Report) -> Table:
    """Prefill and TTFT with and without FastV pruning, on the same features."""
    table = Table(box=box.SIMPLE_HEAD, title=(
        f"FastV {report.settings['fastv']}: medians in ms, the same requests pruned and not"
    ))
    for name in ("px", "visual\ntokens", "kept", "prefill", "prefill\nFastV", "speed-up",
                 "TTFT", "TTFT\nFastV"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in report.results:
        m = {k: v["median"] for k, v in r.summary().items()}
        table.add_row(
            str(r.resolution), str(r.visual_tokens), str(r.visual_kept), ms(m["prefill_s"]),
            ms(m["prefill_fastv_s"]), f"{m['prefill_s'] / m['prefill_fastv_s']:.2f}x",
            ms(m["ttft_s"]), f"[bold]{ms(m['ttft_fastv_s'])}[/bold]",
        )
    return table


def check_matplotlib() -> None:
    """Fail before a long sweep, not after it, when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FastVLMError("--plot needs matplotlib: pip install 'fastvlm-mlx[plot]'") from None


def plot(report: Report, path: Path) -> None:
    """TTFT per resolution as stacked stage bars, visual tokens on a second axis."""
    check_matplotlib()
    from matplotlib.figure import Figure

    results = report.results
    x = np.arange(len(results))
    fig = Figure(figsize=(max(6.0, 1.1 * len(results) + 3), 4.5))
    ax = fig.subplots()
    bottom = np.zeros(len(results))
    for stage in STAGES:
        ms = np.array([r.summary()[f"{stage}_s"]["median"] * 1e3 for r in results])
        ax.bar(x, ms, 0.6, bottom=bottom, label=stage)
        bottom += ms
    for xi, r in zip(x, results):
        ttft = r.summary()["ttft_s"]["median"] * 1e3
        ax.annotate(f"{ttft:,.0f}", (xi, bottom[xi]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [str(r.resolution) for r in results])
    ax.set_xlabel("resolution (px)")
    ax.set_ylabel("TTFT, median (ms)")
    ax.set_ylim(0, bottom.max() * 1.12)
    tokens = ax.twinx()  # scaled so its points sit below the bar-top labels
    counts = [r.visual_tokens for r in results]
    tokens.plot(x, counts, "o--", color="black", label="visual tokens")
    for xi, n in zip(x, counts):
        tokens.annotate(str(n), (xi, n), xytext=(7, -10), textcoords="offset points", fontsize=8)
    tokens.set_ylabel("visual tokens")
    tokens.set_ylim(0, max(counts) * 1.45)
    handles = ax.get_legend_handles_labels()[0] + tokens.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    env = report.environment
    ax.set_title(f"{report.model['source']}\n"
                 f"{env['device']} ({env['device_info'].get('device_name', '?')}), {env['dtype']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
