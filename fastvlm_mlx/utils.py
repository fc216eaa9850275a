"""Loading a FastVLM model directory: config, weights (either layout), tokenizer."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import kernels
from .defaults import DEFAULT_MODEL
from .errors import FastVLMError
from .fastvlm import COREML_EXPORT, Model, ModelArgs, flat_config, quantize
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


def default_dtype(stored: mx.Dtype) -> mx.Dtype:
    """float32 on the CPU backend, where half-precision matmuls bypass BLAS; elsewhere
    the checkpoint's own dtype (bfloat16 for the published ones): float16's range is
    narrower, and late tower activations on real images come near it."""
    return mx.float32 if mx.default_device() == mx.cpu else stored


def stored_dtype(weights: dict[str, mx.array]) -> mx.Dtype:
    """The floating dtype that holds most of a checkpoint's numbers."""
    sizes: dict[mx.Dtype, int] = {}
    for v in weights.values():
        if mx.issubdtype(v.dtype, mx.floating):
            sizes[v.dtype] = sizes.get(v.dtype, 0) + v.size
    return max(sizes, key=sizes.get) if sizes else mx.float32


def keep_freed_buffers() -> None:
    """Let MLX's CPU allocator reuse freed buffers instead of mapping new pages.

    Its default cache keeps 32 MB, so every large temporary of the vision tower
    is mapped and page-faulted afresh (1024 px tower, 2-core x86 machine: 6.4-6.7 s
    without, 4.3-4.5 s with). A quarter of physical memory bounds what it keeps.
    """
    if mx.default_device() == mx.cpu:
        mx.set_cache_limit(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)


BLAS_LIBRARIES = {"openblas": "OpenBLAS", "mkl": "Intel MKL", "blis": "BLIS",
                  "flexiblas": "FlexiBLAS", "armpl": "Arm Performance Libraries"}


def blas_library() -> dict | None:
    """Which BLAS MLX's CPU matmuls reach (Linux), from the libraries mapped in this process.

    The mlx wheel links a reference (netlib) BLAS; an optimized one mapped
    here got in by LD_PRELOAD or a system link, and its symbols win. numpy's
    private scipy_openblas is skipped: its symbols are renamed.
    """
    if sys.platform != "linux":
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = sorted({p[5] for p in (line.split(maxsplit=5) for line in maps.splitlines())
                    if len(p) == 6 and ".so" in p[5]})
    for path in paths:
        if "scipy_openblas" in path:
            continue
        for key, name in BLAS_LIBRARIES.items():
            if key in path.lower():
                return {"name": name, "path": path, "reference": False}
    for path in paths:
        if Path(path).name.startswith("libblas"):
            return {"name": "reference BLAS (netlib)", "path": path, "reference": True}
    return {"name": "unknown", "path": None, "reference": False}


BLAS_HINT = (
    "the mlx wheel's reference BLAS is in use: CPU matmuls run ~40x slower than they can; "
    "preload an optimized one, e.g. LD_PRELOAD=/lib/x86_64-linux-gnu/libopenblas.so.0 "
    "(Debian/Ubuntu: apt install libopenblas0-pthread; the path: ldconfig -p | grep openblas)"
)


def reference_blas_warning() -> str | None:
    """BLAS_HINT when MLX runs on the CPU with the reference BLAS, unless
    FASTVLM_MLX_NO_BLAS_WARNING is set."""
    if os.environ.get("FASTVLM_MLX_NO_BLAS_WARNING") or mx.default_device() != mx.cpu:
        return None
    blas = blas_library()
    return BLAS_HINT + " (FASTVLM_MLX_NO_BLAS_WARNING=1 hides this)" if blas and blas["reference"] else None


def is_hub_id(name: str) -> bool:
    """'org/name' that is not a local path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def resolve_model_path(model: str) -> Path:
    """A local directory as is; a hub id as its snapshot in the Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FastVLMError(f"--model must be a directory, got the file {path}")
    if is_hub_id(model):
        from .hub import fetch

        return fetch(model)
    raise FastVLMError(f"model directory not found: {path}")


def refuse_coreml_export(path: Path) -> None:
    """Apple's MLX exports for the FastVLM app keep the vision tower as a CoreML model
    (fastvithd.mlpackage, beside the config)."""
    if any(path.glob("*.mlpackage")):
        raise FastVLMError(f"{path}: {COREML_EXPORT}")


def check_model_dir(path: Path) -> None:
    """Name the first missing piece of a model directory before loading anything."""
    refuse_coreml_export(path)
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


def read_json(file: Path) -> dict:
    """A JSON object from a checkpoint file, or one clear error."""
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FastVLMError(f"{file} is not valid JSON: {e}") from None
    except OSError as e:
        raise FastVLMError(f"cannot read {file}: {e.strerror}") from None
    if not isinstance(value, dict):
        raise FastVLMError(f"{file} must hold a JSON object, not {type(value).__name__}")
    return value


def read_weight_map(index: Path) -> dict[str, Path]:
    """A shard index's tensor -> shard file map; shards must lie in the index's own directory."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise FastVLMError(f"{index} has no weight_map of tensor names to file names")
    for f in weight_map.values():
        if Path(f).name != f or f in (".", ".."):
            raise FastVLMError(f"{index} names the shard {f!r}, which is not a file beside it")
    return {name: index.parent / f for name, f in weight_map.items()}


def load_config(path: Path) -> dict:
    return flat_config(read_json(path / "config.json"))


def load_weights(path: Path) -> dict[str, mx.array]:
    """Every tensor of the directory's safetensors, single or sharded with an index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_weight_map(index).values()))
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


def load_model(path: Path, dtype: mx.Dtype | None = None, keep_buffers: bool = True) -> Model:
    """Build the model from config.json and load its weights in either layout.

    On the CPU backend this also calls keep_freed_buffers(), which the vision tower
    needs for its speed; keep_buffers=False leaves MLX's allocator cache as it is.
    """
    if keep_buffers:
        keep_freed_buffers()
    weights = load_weights(path)
    dtype = dtype or default_dtype(stored_dtype(weights))
    model = build_model(load_config(path), weights, dtype, path)
    model.vision_tower.set_dtype(kernels.compute_dtype(dtype))
    return model


def follow_tied_head(config: dict, weights: dict[str, mx.array], where: str | Path) -> tuple[dict, dict]:
    """Take the language-model head from the config, as the reference (transformers) does.

    apple/FastVLM-0.5B and -1.5B say tie_word_embeddings: true yet store an
    lm_head.weight: the reference computes logits with embed_tokens, so the stored
    head is dropped (silently if it equals embed_tokens). Without the key, Qwen2's
    default applies: untied, unless no head is stored.
    """
    heads = [k for k in weights if k.endswith("lm_head.weight")]
    tied = config.get("tie_word_embeddings", not heads)
    if tied and heads:
        prefix = heads[0][: -len("weight")]
        head = {k[len(prefix):]: weights[k] for k in weights if k.startswith(prefix)}
        weights = {k: v for k, v in weights.items() if not k.startswith(prefix)}
        embed = {k.rsplit("embed_tokens.", 1)[1]: v for k, v in weights.items() if "embed_tokens." in k}
        if head.keys() != embed.keys() or not all(mx.array_equal(v, embed[k]).item() for k, v in head.items()):
            print(f"note: {where} sets tie_word_embeddings, so its stored lm_head, which differs from "
                  "embed_tokens, is not used (as in the reference)", file=sys.stderr)
    return {**config, "tie_word_embeddings": tied}, weights


def cast_in_place(weights: dict[str, mx.array], dtype: mx.Dtype, keep: tuple[str, ...] = ()) -> None:
    """Cast the floating tensors of `weights` (but those whose key holds a `keep` part)
    one at a time, so each stored copy is freed as its cast is made: loading a bfloat16
    checkpoint in float32 then peaks near the float32 model, not 1.5 times it."""
    for key, value in weights.items():
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != dtype and not any(k in key for k in keep):
            weights[key] = value.astype(dtype)
            mx.eval(weights[key])


def build_model(config: dict, weights: dict[str, mx.array], dtype: mx.Dtype | None,
                where: str | Path) -> Model:
    """Map, cast (unless dtype is None) and check `weights`, then load them into a model.

    Shared by the loader and the converter, so both accept and refuse the same things.
    The caller's dict is cast in place: its stored tensors are not kept alive beside the cast ones.
    """
    if dtype is not None:
        cast_in_place(weights, dtype, keep=(".bn.", "layer_scale"))  # folded below, from the stored values
    config, weights = follow_tied_head(config, weights, where)
    model = Model(ModelArgs.from_dict(config))
    try:
        weights = model.sanitize(weights)
    except ValueError as e:  # e.g. a BatchNorm whose shape does not fit its conv
        raise FastVLMError(f"weights in {where} do not fit the config: {e}") from None
    if dtype is not None:
        cast_in_place(weights, dtype)
    if quantization := config.get("quantization"):
        if (not isinstance(quantization, dict) or quantization.get("bits") not in (2, 3, 4, 5, 6, 8)
                or quantization.get("group_size") not in (32, 64, 128)
                or quantization.get("mode", "affine") != "affine"):
            raise FastVLMError(f"config.json: quantization {quantization!r} is not affine, bits 2-8, "
                               "group_size 32, 64 or 128")
        quantize(model, quantization["group_size"], quantization["bits"],
                 lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights)
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


def _sides(value) -> set:
    """The pixel sides a preprocessor's size or crop_size entry names."""
    if isinstance(value, dict):
        return {v for k, v in value.items() if k in ("height", "width", "shortest_edge")}
    return {value} if value is not None else set()


def check_preprocessor(path: Path, image_size: int) -> None:
    """Hold a checkpoint's preprocessor_config.json to what FastVLM's towers were trained on.

    FastVLM's pixels are only scaled to [0, 1] (mean 0, std 1, the padding black);
    a file that normalizes otherwise describes a different model, so it is refused.
    A size other than the tower's, or a resampling other than bicubic, gets a note.
    """
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return
    pre = read_json(file)
    for key, fastvlm in (("image_mean", 0.0), ("image_std", 1.0)):
        value = pre.get(key)
        if value is None or pre.get("do_normalize") is False:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and abs(v - fastvlm) <= 1e-6 for v in values):
            raise FastVLMError(f"{file} sets {key} {value!r}, but FastVLM's towers take pixels in [0, 1] "
                               f"as they are ({key} {fastvlm:g}): not a FastVLM preprocessor")
    rescale = pre.get("rescale_factor")
    if rescale is not None and pre.get("do_rescale") is not False and (
            not isinstance(rescale, (int, float)) or abs(rescale * 255 - 1) > 1e-6):
        raise FastVLMError(f"{file} sets rescale_factor {rescale!r}; FastVLM scales pixels by 1/255")
    sides = _sides(pre.get("crop_size")) | _sides(pre.get("size"))
    if sides - {image_size}:
        print(f"note: {file} names {'/'.join(map(str, sorted(sides)))} px, the tower's config "
              f"{image_size} px; images are encoded at {image_size} (--resolution picks another)",
              file=sys.stderr)
    if pre.get("resample", 3) not in (3, "bicubic"):
        print(f"note: {file} asks for resample {pre['resample']!r}; FastVLM's reference "
              "preprocessing, used here, is bicubic", file=sys.stderr)


def load_tokenizer(path: Path):
    """mlx-lm's tokenizer wrapper (it carries the streaming detokenizer)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer

    try:
        # Published configs carry auto_map (remote code). Never run it, and never let
        # transformers ask about it on stdin, where the user's questions are.
        return load_mlx_lm_tokenizer(path, tokenizer_config_extra={"trust_remote_code": False})
    except Exception as e:  # transformers raises many types on a broken tokenizer
        raise FastVLMError(f"cannot load the tokenizer in {path}: {e}") from None


def load(model: str | Path = DEFAULT_MODEL, dtype: mx.Dtype | None = None,
         keep_buffers: bool = True) -> tuple[Model, object]:
    """Load a FastVLM model and its tokenizer from a directory (MLX or published layout).

    keep_buffers: see load_model (on the CPU backend, MLX's allocator is set to keep
    freed buffers for reuse, worth 1.5x on the tower; False leaves it as it is).
    """
    path = resolve_model_path(str(model))
    check_model_dir(path)
    # A broken config or preprocessor is named before the tokenizer trips on it.
    args = ModelArgs.from_dict(load_config(path))
    check_preprocessor(path, args.vision_config.image_size)
    tokenizer = load_tokenizer(path)
    return load_model(path, dtype, keep_buffers), tokenizer

