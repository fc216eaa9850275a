"""Published FastVLM checkpoints (HF/LLaVA layout) -> MLX model directories.

Reads safetensors or torch pickles (without torch, without running pickled
code), maps the weights with the runtime's own `Model.sanitize`, optionally
quantizes the decoder, and writes into a temporary directory that is renamed
to --out only once it is complete and loads.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import save_model

from fastvlm_mlx.errors import FastVLMError
from fastvlm_mlx.fastvlm import IMAGE_TOKEN_INDEX
from fastvlm_mlx.hub import fetch
from fastvlm_mlx.utils import (TOKENIZER_FILES, build_model, check_tokenizer, is_hub_id, load,
                               load_config, load_weights, parse_dtype, refuse_coreml_export)

from .torch_pickle import INDEX_NAME, load_torch_checkpoint

MARKER = ".fastvlm-mlx-convert"  # in every directory convert writes: --force replaces only these
GROUP_SIZES = (32, 64, 128)  # what mx.quantize supports


def read_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint directory: safetensors first, else torch pickles."""
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return load_weights(path)
    if (path / INDEX_NAME).is_file():
        return load_torch_checkpoint(path / INDEX_NAME)
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    if not pickles:
        raise FastVLMError(f"{path} holds no weights (*.safetensors, pytorch_model*.bin or *.pt)")
    weights = {}
    for f in pickles:
        weights.update(load_torch_checkpoint(f))
    return weights


def check_source(path: Path) -> None:
    if not path.is_dir():
        raise FastVLMError(f"checkpoint not found: {path}")
    refuse_coreml_export(path)
    if not (path / "config.json").is_file():
        raise FastVLMError(f"{path} has no config.json: not a model checkpoint")
    check_tokenizer(path)


def output_config(config: dict, model: nn.Module, bits: int | None, group_size: int) -> dict:
    """The source config made explicit: decoder args, vision shape, slot, quantization."""
    args = model.args
    # auto_map points at remote code, which nothing here runs: leave it out.
    out = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config", "auto_map")}
    out.update(
        tie_word_embeddings=args.text_config.tie_word_embeddings,
        vision_config=asdict(args.vision_config),
        image_size=args.vision_config.image_size,
        image_token_index=IMAGE_TOKEN_INDEX,
        mm_hidden_size=args.mm_hidden_size,
    )
    if bits:
        out["quantization"] = {"group_size": group_size, "bits": bits}
    elif "quantization" in config:  # a quantized source (mlx-community's -4bit, -8bit) stays so
        out["quantization"] = config["quantization"]
    return out


def preprocessor_config(image_size: int) -> dict:
    """The reference's preprocessing, for readers of the directory (the runtime hard-codes it)."""
    return {
        "image_aspect_ratio": "pad",
        "pad_color": [0, 0, 0],
        "resample": "bicubic",
        "size": {"height": image_size, "width": image_size},
        "rescale_factor": 1 / 255,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "layout": "NHWC",
    }


def verify(path: Path) -> None:
    """Load the result and check one tiny forward pass gives finite numbers."""
    model, _ = load(path)
    side = model.args.vision_config.stride
    features = model.encode_image(mx.full((1, side, side, 3), 0.5))
    logits = model.language_model(None, input_embeddings=model.embed([1, IMAGE_TOKEN_INDEX, 2], features))
    if not (mx.isfinite(features).all() and mx.isfinite(logits).all()).item():
        raise FastVLMError(f"the converted model in {path} computes non-finite values; not written")


def check_output(out: Path, source: Path, force: bool) -> None:
    """Refuse, before any work, an --out that cannot be written or must not be replaced.

    --force replaces only an empty directory or one that convert wrote (it holds
    MARKER), and never the source, the current or home directory, or a parent of one.
    """
    target = out.resolve()
    if out.exists():
        if not force:
            raise FastVLMError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir():
            raise FastVLMError(f"--out {out} is a file; --force replaces only a directory convert wrote")
        for what, path in (("the source checkpoint", source), ("the current directory", Path.cwd()),
                           ("the home directory", Path.home())):
            if path.resolve().is_relative_to(target):
                raise FastVLMError(f"--out {out} holds {what}; --force will not replace it")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise FastVLMError(f"{out} was not written by fastvlm-mlx convert; "
                               "--force replaces only those (remove it yourself, or pick another --out)")
    parent = next(p for p in target.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise FastVLMError(f"cannot write {out}: {parent} is not a writable directory")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's process
    return True


def _mark_ours(staging: Path) -> None:
    """Record this process in `staging`, so a later run can tell when it is stale."""
    (staging / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def remove_stale_staging(parent: Path) -> None:
    """Delete the staging directories of conversions on this host whose process is gone."""
    for staging in parent.glob(".*.partial"):
        try:
            owner = json.loads((staging / MARKER).read_text())
            stale = owner["host"] == socket.gethostname() and not _alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or not readable: leave it
        if stale:
            shutil.rmtree(staging, ignore_errors=True)


def make_staging(out: Path) -> Path:
    """A private directory beside `out`, marked with this process, to write into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    _mark_ours(staging)
    return staging


def replace_with(staging: Path, out: Path) -> None:
    """Move `staging` to `out`; an old `out` is set aside first and deleted only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old.partial")
        out.rename(old)
        _mark_ours(old)  # if killed before it is deleted, the next run removes it
    staging.chmod(0o755)  # mkdtemp made it private
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_quantization(bits: int | None, group_size: int | None) -> int:
    """The group size to quantize with; refuses what mx.quantize would reject."""
    if bits is None:
        if group_size is not None:
            raise FastVLMError("--group-size needs --quantize")
        return GROUP_SIZES[1]
    if bits not in (4, 8):
        raise FastVLMError(f"--quantize must be 4 or 8, got {bits}")
    group_size = GROUP_SIZES[1] if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise FastVLMError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    return group_size


def default_out(source: str, bits: int | None) -> Path:
    return Path(Path(source).name + "-mlx" + (f"-{bits}bit" if bits else ""))


def convert(source: str | Path, out: str | Path | None = None, dtype: str | None = None,
            quantize: int | None = None, group_size: int | None = None, force: bool = False,
            verify_output: bool = True, revision: str | None = None) -> Path:
    """Convert a local checkpoint directory or a hub repo id into an MLX model directory."""
    source = str(source)
    target = parse_dtype(dtype)
    group_size = check_quantization(quantize, group_size)
    out = Path(out).expanduser() if out else default_out(source, quantize)
    path = Path(source).expanduser()
    check_output(out, path, force)
    if not path.exists() and is_hub_id(source):
        path = fetch(source, revision, pickles=True)
    check_source(path)

    config = load_config(path)
    # Without --dtype nothing is cast: tensors keep the checkpoint's type and the
    # BatchNorm folds, new numbers, stay float32, so the conversion is lossless.
    model = build_model(config, read_weights(path), target, path)
    if quantize:
        nn.quantize(model.language_model, group_size=group_size, bits=quantize,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % group_size == 0)
        if not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                   for _, m in model.language_model.named_modules()):
            raise FastVLMError(f"no decoder matrix has rows divisible by --group-size {group_size}; "
                               "nothing would be quantized")

    try:
        staging = make_staging(out)
    except OSError as e:
        raise FastVLMError(f"cannot write {out}: {e}") from None
    try:
        save_model(staging, model)
        (staging / "config.json").write_text(
            json.dumps(output_config(config, model, quantize, group_size), indent=2))
        (staging / "preprocessor_config.json").write_text(
            json.dumps(preprocessor_config(model.args.vision_config.image_size), indent=2))
        for name in TOKENIZER_FILES + ("generation_config.json",):
            if (path / name).is_file():
                shutil.copyfile(path / name, staging / name)
        del model  # verify loads the result: never two models in memory at once
        if verify_output:
            verify(staging)
        (staging / MARKER).write_text(json.dumps({"converted_from": source}))
        replace_with(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise FastVLMError(f"writing {out} failed: {e}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
