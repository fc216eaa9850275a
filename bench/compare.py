"""TTFT side by side with mlx-vlm, the other pure-MLX FastVLM, in one process.

    python -m fastvlm_mlx.bench.compare --resolutions 1024,1152 --dtype float32

One random checkpoint in the published shapes and HF/LLaVA layout is written,
converted by each tool's own converter and loaded by each tool's own loader.
Then, per resolution, the two models run alternately on the same pixels and
prompt ids (ours, theirs, ours, ...), each through its own code path: vision
(tower + projector) and prefill up to the first greedy token, with evaluation
forced at the boundary. Preprocessing is left out: both get the same pixels.
mlx-vlm is an optional extra (`pip install -e '.[compare]'`), never a
dependency of the runtime.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import typer
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from rich import box
from rich.console import Console
from rich.table import Table

from fastvlm_mlx.convert import convert
from fastvlm_mlx.errors import FastVLMError, exit_codes
from fastvlm_mlx.fastvithd import AttentionBlock, RepMixerBlock, VisionConfig
from fastvlm_mlx.fastvlm import BN_EPS, HF_TOWER_PREFIX, Model
from fastvlm_mlx.generation import prefill
from fastvlm_mlx.kernels import cpu
from fastvlm_mlx.processor import preprocess
from fastvlm_mlx.utils import BLAS_HINT, keep_freed_buffers, load_model, parse_dtype

from .cli import parse_resolutions
from .harness import dtype_name, environment, prompt_ids, random_config, random_model, synthetic_image
from .report import ms

MISSING = "the mlx-vlm comparison needs mlx-vlm: pip install -e '.[compare]'"
SAMPLES = ("vision_s", "prefill_s", "ttft_s")
HEAD_DIM = 768  # mobileclip_l's CLIP head (head.proj [3072, 768]): unused, but published
LAYER_SCALES = {RepMixerBlock: ["layer_scale"], AttentionBlock: ["layer_scale_1", "layer_scale_2"]}


def require_mlx_vlm() -> None:
    """Fail in one line, before minutes of setup, when the optional extra is missing."""
    try:
        import mlx_vlm  # noqa: F401
    except ImportError:
        raise FastVLMError(MISSING) from None


def hf_weights(model: Model) -> dict[str, mx.array]:
    """Our parameters in the published HF/LLaVA layout: the inverse of HF_LAYOUT.sanitize.

    The folded ConvFFN conv is stored as the conv plus an identity BatchNorm
    (1 - eps + eps is exactly 1 in float32), so folding it again is exact.
    """
    out: dict[str, mx.array] = {}
    for key, value in tree_flatten(model.parameters()):
        group, name = key.split(".", 1)
        if group == "language_model":  # model.* and, when untied, lm_head.weight
            out[name] = value
        elif group == "mm_projector":  # linear_1 / linear_2 -> Sequential indices 0 / 2
            layer, leaf = name.split(".", 1)
            out[f"model.mm_projector.{2 * int(layer[-1]) - 2}.{leaf}"] = value
        elif ".convffn.conv." in name:
            prefix = HF_TOWER_PREFIX + name.rsplit(".", 1)[0]
            if name.endswith(".weight"):
                out[f"{prefix}.conv.weight"] = value.transpose(0, 3, 1, 2)
            else:
                ones = mx.ones_like(value)
                out.update({f"{prefix}.bn.weight": ones, f"{prefix}.bn.bias": value,
                            f"{prefix}.bn.running_mean": mx.zeros_like(value),
                            f"{prefix}.bn.running_var": ones - BN_EPS})
        elif value.ndim == 4:  # [O, kH, kW, I/g] -> [O, I/g, kH, kW]
            out[HF_TOWER_PREFIX + name] = value.transpose(0, 3, 1, 2)
        else:
            out[HF_TOWER_PREFIX + name] = value
    for name, block in model.vision_tower.named_modules():  # layer scales are folded: identity
        for leaf in LAYER_SCALES.get(type(block), []):
            fc2 = block.convffn.fc2.weight
            out[f"{HF_TOWER_PREFIX}{name}.{leaf}"] = mx.ones((fc2.shape[0], 1, 1), dtype=fc2.dtype)
    head = (model.args.vision_config.hidden_size, HEAD_DIM)
    out[HF_TOWER_PREFIX + "head.proj"] = mx.zeros(head, dtype=model.mm_projector.linear_1.weight.dtype)
    return out


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE without merges and with Qwen2's special tokens.

    Both converters insist on a tokenizer; neither decodes anything here, so
    its vocabulary need not match the model's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "model_max_length": 32768,
    }, indent=2))


def write_hf_checkpoint(model: Model, config: dict, path: Path) -> Path:
    """config.json, model.safetensors and a tokenizer, laid out like apple/FastVLM-*."""
    path.mkdir(parents=True, exist_ok=True)
    weights = hf_weights(model)
    dtype = dtype_name(next(iter(weights.values())).dtype)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    hf_config = {"architectures": ["LlavaQwen2ForCausalLM"], **config, "torch_dtype": dtype}
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_tokenizer(path)
    return path


def time_ours(model: Model, pixels: mx.array, ids: list[int]) -> tuple[dict[str, float], mx.array]:
    """Vision (tower + projector) and prefill to the first greedy token, as chat runs them."""
    cache = make_prompt_cache(model.language_model)
    sampler = make_sampler(0.0)
    t0 = time.perf_counter()
    features = model.encode_image(pixels)
    mx.eval(features)
    t1 = time.perf_counter()
    mx.eval(sampler(prefill(model, ids, features, cache)))
    t2 = time.perf_counter()
    return {"vision_s": t1 - t0, "prefill_s": t2 - t1, "ttft_s": t2 - t0}, features


def time_theirs(model: nn.Module, pixel_values: mx.array,
                ids: list[int]) -> tuple[dict[str, float], mx.array]:
    """Vision as mlx-vlm's FastVLM `get_input_embeddings` computes it, then its own
    `generate_step` up to the first greedy token, given those features.

    generate_step queues the second token before handing out the first; that
    step is drained after the clock stops.
    """
    from mlx_vlm.generate import generate_step, generation_stream

    input_ids = mx.array([ids])
    t0 = time.perf_counter()
    dtype = model.vision_tower.vision_model.patch_embed.blocks[0].reparam_conv.weight.dtype
    pixel_values = pixel_values.astype(dtype)
    _, embeddings, _ = model.vision_tower(pixel_values.transpose(0, 2, 3, 1))
    B, H, W, C = embeddings.shape
    features = model.mm_projector(embeddings.reshape(B, H * W, C))
    mx.eval(features)
    t1 = time.perf_counter()
    steps = generate_step(input_ids, model, pixel_values, None, max_tokens=1, temperature=0.0,
                          cached_image_features=features)
    next(steps)
    t2 = time.perf_counter()
    steps.close()
    mx.synchronize(generation_stream)
    return {"vision_s": t1 - t0, "prefill_s": t2 - t1, "ttft_s": t2 - t0}, features


@dataclass
class Comparison:
    """Every pair of runs at one resolution; pair i is (ours[i], mlx_vlm[i])."""

    resolution: int
    visual_tokens: int
    prefill_tokens: int
    feature_error: float  # max |ours - theirs| / max |theirs| over the image features
    feature_dtypes: dict[str, str]  # what each tower and projector computed in
    ours: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SAMPLES})
    mlx_vlm: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SAMPLES})

    def summary(self) -> dict[str, dict[str, float]]:
        """Medians of each tool, and the median, min and max of the per-pair ratios."""
        out = {}
        for k in SAMPLES:
            ratio = np.asarray(self.ours[k]) / np.asarray(self.mlx_vlm[k])
            out[k] = {"ours": float(np.median(self.ours[k])),
                      "mlx_vlm": float(np.median(self.mlx_vlm[k])),
                      "ratio": float(np.median(ratio)),
                      "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max())}
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "runs": len(self.ours["ttft_s"]), "summary": self.summary()}


def load_both(workdir: Path, dtype: str, err: Console) -> tuple[Model, nn.Module]:
    """Write the random checkpoint, convert and load it with each tool's own code."""
    from mlx_vlm.convert import convert as mlx_vlm_convert
    from mlx_vlm.utils import load_model as mlx_vlm_load

    err.print("writing a random apple/FastVLM-0.5B checkpoint (HF layout, float32)")
    config = random_config("0.5b")
    hf = write_hf_checkpoint(random_model(config, mx.float32), config, workdir / "hf")
    mx.clear_cache()
    err.print(f"converting to {dtype} with fastvlm-mlx")
    ours = load_model(convert(hf, workdir / "fastvlm-mlx", dtype=dtype), parse_dtype(dtype))
    err.print(f"converting to {dtype} with mlx-vlm {version('mlx-vlm')}")
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not our output
        mlx_vlm_convert(str(hf), str(workdir / "mlx-vlm"), dtype=dtype)
    theirs = mlx_vlm_load(workdir / "mlx-vlm")
    return ours, theirs


def run(ours: Model, theirs: nn.Module, resolutions: list[int],
        ids: list[int], runs: int, warmup: int, err: Console) -> list[Comparison]:
    """Warm-up and counted runs per resolution, the two tools alternating."""
    image = synthetic_image()
    results = []
    for resolution in resolutions:
        pixels = preprocess(image, resolution)
        pixel_values = mx.contiguous(pixels.transpose(0, 3, 1, 2))  # NCHW, as its processor gives
        mx.eval(pixel_values)
        result = None
        for i in range(warmup + runs):
            a, features = time_ours(ours, pixels, ids)
            with cpu.blas_threads():  # its own BLAS threads, as in a process of its own
                b, their_features = time_theirs(theirs, pixel_values, ids)
            if result is None:  # the same model in both tools, or the timings mean nothing
                x, y = features.astype(mx.float32), their_features.astype(mx.float32)
                error = (mx.abs(x - y).max() / mx.abs(y).max()).item()
                dtypes = {"ours": dtype_name(features.dtype), "mlx_vlm": dtype_name(their_features.dtype)}
                n = features.shape[1]
                result = Comparison(resolution, n, len(ids) - 1 + n, error, dtypes)
            what = f"warm-up {i + 1}/{warmup}" if i < warmup else f"run {i - warmup + 1}/{runs}"
            err.print(f"{resolution:>5} px  {what}: TTFT ours {ms(a['ttft_s'])} ms "
                      f"(vision {ms(a['vision_s'])}, prefill {ms(a['prefill_s'])}), mlx-vlm "
                      f"{ms(b['ttft_s'])} ms (vision {ms(b['vision_s'])}, prefill {ms(b['prefill_s'])})",
                      highlight=False)
            if i >= warmup:
                for k in SAMPLES:
                    result.ours[k].append(a[k])
                    result.mlx_vlm[k].append(b[k])
        results.append(result)
    return results


def render(results: list[Comparison], env: dict, runs: int, warmup: int, console: Console) -> None:
    blas = env["blas"]
    console.print("[bold]FastVLM TTFT: fastvlm-mlx vs mlx-vlm[/bold]  random weights in the shapes "
                  "of apple/FastVLM-0.5B, each converted and loaded by its own tool")
    console.print(f"{env['device']}, {env['dtype']}, mlx {env['mlx']}, fastvlm-mlx "
                  f"{env['fastvlm_mlx']}, mlx-vlm {env['mlx_vlm']}"
                  + (f", BLAS {blas['name']}" if blas else ""))
    table = Table(box=box.SIMPLE_HEAD, title=(
        f"Medians in ms of {runs} alternating run(s) after {warmup} warm-up; "
        "ratio = ours / mlx-vlm per pair, median (min–max)"))
    for name in ("px", "prefill\ntokens", "vision\nours", "vision\nmlx-vlm", "vision\nratio",
                 "prefill\nours", "prefill\nmlx-vlm", "prefill\nratio", "TTFT\nours",
                 "TTFT\nmlx-vlm", "TTFT\nratio", "features\nrel. diff"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in results:
        s = r.summary()
        cells = []
        for k in SAMPLES:
            v = s[k]
            ratio = f"{v['ratio']:.2f} ({v['ratio_min']:.2f}–{v['ratio_max']:.2f})"
            cells += [ms(v["ours"]), ms(v["mlx_vlm"]), f"[bold]{ratio}[/bold]" if k == "ttft_s" else ratio]
        table.add_row(str(r.resolution), str(r.prefill_tokens), *cells, f"{r.feature_error:.1e}")
    console.print(table)
    for tool, dtype in results[0].feature_dtypes.items():
        if dtype != env["dtype"]:
            name = "fastvlm-mlx" if tool == "ours" else "mlx-vlm"
            console.print(f"[yellow]note: {name} computed the image features in {dtype}, "
                          f"not {env['dtype']}[/yellow]")


def compare(resolutions: list[int], dtype: str = "float32", runs: int = 5, warmup: int = 1,
            prompt_tokens: int = 48, err: Console | None = None) -> tuple[list[Comparison], dict]:
    """Time both tools on one random 0.5B checkpoint; the results and the environment."""
    require_mlx_vlm()
    err = err or Console(stderr=True, soft_wrap=True)
    mx_dtype = parse_dtype(dtype)
    if not resolutions:
        raise FastVLMError("give at least one resolution")
    for r in resolutions:
        VisionConfig().check_resolution(r)
    env = {**environment(mx_dtype), "mlx_vlm": version("mlx-vlm")}
    if env["blas"] and env["blas"]["reference"]:
        err.print(f"[yellow]warning: {BLAS_HINT}[/yellow]")
    with tempfile.TemporaryDirectory(prefix="fastvlm-compare-") as workdir:
        ours, theirs = load_both(Path(workdir), dtype, err)
    ids = prompt_ids(None, prompt_tokens, ours.args.text_config.vocab_size)
    return run(ours, theirs, resolutions, ids, runs, warmup, err), env


def main(
    resolutions: str = typer.Option("1024,1152", help="Comma-separated input sides in pixels, multiples of 64."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16, for both tools."),
    runs: int = typer.Option(5, min=1, help="Counted pairs of runs per resolution."),
    warmup: int = typer.Option(1, min=0, help="Uncounted pairs first, per resolution."),
    prompt_tokens: int = typer.Option(48, min=1, help="Text tokens in the prompt, besides the visual ones."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every sample, the summary and the environment here."),
) -> None:
    """Time vision, prefill and TTFT of fastvlm-mlx and mlx-vlm alternately, in one process.

    Writes about 7.5 GB of checkpoints to a temporary directory (TMPDIR) and
    removes them once both models are loaded.
    """
    with exit_codes():
        sweep = parse_resolutions(None, resolutions)
        if json_path is not None and not json_path.parent.is_dir():
            raise FastVLMError(f"--json {json_path}: the directory {json_path.parent} does not exist")
        results, env = compare(sweep, dtype, runs, warmup, prompt_tokens)
        render(results, env, runs, warmup, Console(width=None if sys.stdout.isatty() else 160))
        if json_path is not None:
            settings = {"resolutions": sweep, "dtype": dtype, "runs": runs, "warmup": warmup,
                        "prompt_tokens": prompt_tokens}
            report = {"environment": env, "settings": settings,
                      "results": [r.to_dict() for r in results]}
            json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"wrote {json_path}", file=sys.stderr)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(main)

if __name__ == "__main__":
    keep_freed_buffers()  # as the fastvlm-mlx command does; both tools gain from it
    app()
