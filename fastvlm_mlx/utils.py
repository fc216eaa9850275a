"""Loading a FastVLM model directory: config, weights (either layout), tokenizer."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import FastVLMError
from .fastvlm import Model, ModelArgs, compute_dtype

DEFAULT_MODEL = "apple/FastVLM-0.5B"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def parse_dtype(name: str | None) -> mx.Dtype | None:
    """A --dtype value; None stays None (each command has its own default)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise FastVLMError(f"--dtype takes one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def default_dtype() -> mx.Dtype:
    """float32 on the CPU backend, where half-precision matmuls bypass BLAS."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.float16


def keep_freed_buffers() -> None:
    """Let MLX's CPU allocator reuse freed buffers instead of mapping new pages.

    Its default cache keeps 32 MB, so every large temporary of the vision tower
    is mapped and page-faulted afresh (1024 px tower, 2-core x86 machine: 6.4-6.7 s
    without, 4.3-4.5 s with). A quarter of physical memory bounds what it keeps.
    """
    if mx.default_device() == mx.cpu:
        mx.set_cache_limit(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)


def is_hub_id(name: str) -> bool:
    """'org/name' that is not a local path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def resolve_model_path(model: str) -> Path:
    """A local directory as is; a hub id is converted once into the cache, then reused."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FastVLMError(f"--model must be a directory, got the file {path}")
    if is_hub_id(model):
        from fastvlm_mlx.convert.convert import cached_conversion

        return cached_conversion(model)
    raise FastVLMError(f"model directory not found: {path}")


def check_model_dir(path: Path) -> None:
    """Name the first missing piece of a model directory before loading anything."""
    if not (path / "config.json").is_file():
        raise FastVLMError(f"{path} has no config.json: not a model directory")
    if not any(path.glob("*.safetensors")):
        raise FastVLMError(
            f"{path} has no *.safetensors weights (PyTorch .bin checkpoints need "
            "`fastvlm-mlx convert` first)"
        )
    check_tokenizer(path)


def check_tokenizer(path: Path) -> None:
    """A Qwen2 tokenizer: tokenizer_config.json with tokenizer.json or vocab.json + merges.txt."""
    has = (path / "tokenizer_config.json").is_file() and (
        (path / "tokenizer.json").is_file()
        or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())
    )
    if not has:
        raise FastVLMError(
            f"{path} has no tokenizer (needs tokenizer_config.json and tokenizer.json "
            "or vocab.json + merges.txt)"
        )


def load_config(path: Path) -> dict:
    config_file = path / "config.json"
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastVLMError(f"{config_file} is not valid JSON: {e}") from None


def load_weights(path: Path) -> dict[str, mx.array]:
    """Every tensor of the directory's safetensors, single or sharded with an index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    weights: dict[str, mx.array] = {}
    for f in files:
        if not f.is_file():
            raise FastVLMError(f"{index} names {f.name}, which is missing")
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises bare RuntimeError/ValueError on corrupt files
            raise FastVLMError(f"cannot read weights {f}: {e} (truncated or corrupt?)") from None
    return weights


def load_model(path: Path, dtype: mx.Dtype | None = None) -> Model:
    """Build the model from config.json and load its weights in either layout."""
    dtype = dtype or default_dtype()
    model = build_model(load_config(path), load_weights(path), dtype, path)
    model.vision_tower.set_dtype(compute_dtype(dtype))
    return model


def build_model(config: dict, weights: dict[str, mx.array], dtype: mx.Dtype | None,
                where: str | Path) -> Model:
    """Map, cast (unless dtype is None) and check `weights`, then load them into a model.

    Shared by the loader and the converter, so both accept and refuse the same things.
    """
    # Published configs sometimes get tie_word_embeddings wrong: trust the weights.
    config = {**config, "tie_word_embeddings": not any(k.endswith("lm_head.weight") for k in weights)}
    model = Model(ModelArgs.from_dict(config))
    try:
        weights = model.sanitize(weights)
    except ValueError as e:  # e.g. a BatchNorm whose shape does not fit its conv
        raise FastVLMError(f"weights in {where} do not fit the config: {e}") from None
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    if quantization := config.get("quantization"):
        nn.quantize(model, quantization["group_size"], quantization["bits"],
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise FastVLMError(
            f"weights in {where} do not fit the config: {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise FastVLMError(
                f"weight {k} in {where} has shape {tuple(v.shape)} but the config needs "
                f"{tuple(expected[k].shape)}"
            )
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    model.eval()
    return model


def load_tokenizer(path: Path):
    """mlx-lm's tokenizer wrapper (it carries the streaming detokenizer)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer

    try:
        return load_mlx_lm_tokenizer(path)
    except Exception as e:  # transformers raises many types on a broken tokenizer
        raise FastVLMError(f"cannot load the tokenizer in {path}: {e}") from None


def load(model: str | Path = DEFAULT_MODEL, dtype: mx.Dtype | None = None) -> tuple[Model, object]:
    """Load a FastVLM model and its tokenizer from a directory (MLX or published layout)."""
    path = resolve_model_path(str(model))
    check_model_dir(path)
    tokenizer = load_tokenizer(path)
    return load_model(path, dtype), tokenizer

