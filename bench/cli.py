"""The `fastvlm-mlx bench` command."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from fastvlm_mlx.errors import FastVLMError, exit_codes

# The model stack is imported by the command itself, so that --help stays instant.


def parse_resolutions(resolution: Optional[int], resolutions: Optional[str]) -> Optional[list[int]]:
    if resolution is not None and resolutions is not None:
        raise FastVLMError("give --resolution or --resolutions, not both")
    if resolution is not None:
        return [resolution]
    if resolutions is None:
        return None
    try:
        return [int(r) for r in resolutions.split(",") if r.strip()]
    except ValueError:
        raise FastVLMError(f"--resolutions takes comma-separated integers, got {resolutions!r}") from None


def check_outputs(json_path: Optional[Path], plot_path: Optional[Path]) -> None:
    """Fail now, not after the sweep, on an output that cannot be written."""
    from .report import check_matplotlib

    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        if path is None:
            continue
        if path.is_dir():
            raise FastVLMError(f"{flag} {path} is a directory; give a file name")
        if not path.parent.is_dir():
            raise FastVLMError(f"{flag} {path}: the directory {path.parent} does not exist")
    if plot_path is not None:
        if plot_path.suffix.lower() != ".png":
            raise FastVLMError(f"--plot writes a PNG: give a name ending in .png, got {plot_path}")
        check_matplotlib()


def load_model(model: Optional[str], random_size: Optional[str], dtype):
    """The model to time, its tokenizer (None for random weights), what it is, and its load time."""
    import mlx.core as mx

    from fastvlm_mlx.utils import default_dtype, load

    from .harness import DECODERS, random_config, random_model

    if model is not None and random_size is not None:
        raise FastVLMError("give --model or --random, not both")
    if random_size is not None and random_size not in DECODERS:
        raise FastVLMError(f"--random takes one of {', '.join(DECODERS)}, got {random_size!r}")
    start = time.perf_counter()
    if model is not None:
        vlm, tokenizer = load(model, dtype)
        return vlm, tokenizer, str(model), time.perf_counter() - start
    size = random_size or "0.5b"
    vlm = random_model(random_config(size), dtype or default_dtype(mx.bfloat16))  # as published
    source = (f"random weights in the shapes of apple/FastVLM-{size.upper()}"
              + ("" if random_size else " (the default without --model)") + "; nothing downloaded")
    return vlm, None, source, time.perf_counter() - start


def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory (or hub id) to time; without it, random weights."),
    random_size: Optional[str] = typer.Option(None, "--random", help="Random weights in the published shapes: 0.5b, 1.5b or 7b (the default without --model: 0.5b)."),
    resolution: Optional[int] = typer.Option(None, help="Input side in pixels, a multiple of 64 (default: the model's)."),
    resolutions: Optional[str] = typer.Option(None, help="A sweep, comma-separated, e.g. 256,512,768,1024,1152,1536."),
    prompt_tokens: int = typer.Option(48, min=1, help="Text tokens in the prompt, besides the visual ones."),
    max_tokens: int = typer.Option(32, min=2, help="Tokens to generate per run; decode tokens/s is timed over them."),
    runs: int = typer.Option(5, min=1, help="Counted runs per resolution."),
    warmup: int = typer.Option(1, min=0, help="Uncounted runs first, per resolution."),
    dtype: Optional[str] = typer.Option(None, help="float32, float16 or bfloat16 (default: float32 on CPU, the checkpoint's own on GPU: bfloat16 for the published ones)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every sample, the summary and the environment here."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Draw TTFT per resolution to this PNG (needs matplotlib)."),
    fastv: Optional[str] = typer.Option(None, help="Also time the prefill with FastV pruning K:R (e.g. 2:0.5), side by side."),
) -> None:
    """Time to first token, stage by stage: preprocessing, vision, projector, prefill.

    Every stage is timed on its own, with the model code chat uses, and set
    against its FLOPs and a measured matmul peak. Without --model the weights
    are random in the published shapes: latency does not depend on their values.
    """
    from rich.console import Console

    from fastvlm_mlx.fastv import FastV
    from fastvlm_mlx.utils import keep_freed_buffers, parse_dtype

    from .flops import copy_bandwidth, decode_bytes, matmul_peak
    from .harness import check_request, dtype_name, environment, model_info, prompt_ids
    from .report import Report, plot, render, write_json

    keep_freed_buffers()
    err = Console(stderr=True, soft_wrap=True)
    with exit_codes():
        sweep = parse_resolutions(resolution, resolutions)
        check_outputs(json_path, plot_path)
        vlm, tokenizer, source, load_s = load_model(model, random_size, parse_dtype(dtype))
        mx_dtype = vlm.dtype
        pruning = FastV.parse(fastv, vlm.args.text_config.num_hidden_layers) if fastv else None
        ids = prompt_ids(tokenizer, prompt_tokens, vlm.args.text_config.vocab_size)
        sweep = sweep or [vlm.args.vision_config.image_size]
        check_request(vlm, sweep, ids, max_tokens)
        gflops, n = matmul_peak(mx_dtype)
        memory = {"copy_bytes_per_s": copy_bandwidth(), "decode_bytes": decode_bytes(vlm)}
        report = Report(
            environment=environment(mx_dtype),
            model=model_info(vlm, source, load_s),
            settings={"resolutions": sweep, "prompt_tokens": prompt_tokens,
                      "max_tokens": max_tokens, "runs": runs, "warmup": warmup,
                      "fastv": fastv},
            peak={"gflops": gflops, "size": n, "dtype": dtype_name(mx_dtype)},
            memory=memory,
            results=[],
        )
        if report.blas_warning():
            err.print(f"[yellow]warning: {report.blas_warning()}[/yellow]")
        try:
            _sweep(vlm, ids, sweep, runs, warmup, max_tokens, pruning, report.results, err)
        except KeyboardInterrupt:
            report.complete = False
        report.results = [r for r in report.results if r.runs]
        render(report, Console(width=None if sys.stdout.isatty() else 120))
        if json_path is not None:
            write_json(report, json_path)
            err.print(f"wrote {json_path}")
        if plot_path is not None and report.results:
            plot(report, plot_path)
            err.print(f"wrote {plot_path}")
        if not report.complete:
            raise typer.Exit(130)


def _sweep(model, ids: list[int], sweep: list[int], runs: int, warmup: int, max_tokens: int,
           fastv, results: list, err) -> None:
    """Run the sweep into `results` with a progress bar and a line per run on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .harness import measure
    from .report import ms

    plan = [(r, i) for r in sweep for i in range(warmup + runs)]

    def label(resolution: int, i: int) -> str:
        what = f"warm-up {i + 1}/{warmup}" if i < warmup else f"run {i - warmup + 1}/{runs}"
        return f"{resolution:>5} px  {what}"

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(label(*plan[0]), total=len(plan))
        runs_iter = measure(model, ids, sweep, runs, warmup, max_tokens, fastv)
        for step, (result, i) in enumerate(runs_iter):
            if not results or results[-1] is not result:
                results.append(result)
            kind = result.warmup_samples if i < warmup else result.samples
            s = {k: v[-1] for k, v in kind.items()}
            progress.console.print(
                f"{label(result.resolution, i)}: TTFT {ms(s['ttft_s'])} ms "
                f"(vision {ms(s['vision_s'])}, prefill {ms(s['prefill_s'])}), "
                f"decode {s['decode_tps']:.1f} tok/s"
                + (f", FastV prefill {ms(s['prefill_fastv_s'])}" if fastv else ""),
                highlight=False,
            )
            progress.advance(task)
            if step + 1 < len(plan):
                progress.update(task, description=label(*plan[step + 1]))
