"""Every layout a user may have loads directly and answers like the reference, or is refused clearly.

Each fixture is built here by re-keying the reference checkpoint the way the
publishing tool does it, written from that tool's own rules (mlx-vlm's sanitize
and mlx-lm's quantize; transformers' convert_fastvlm_weights_to_hf.py; Apple's
export for the FastVLM app), not from our sanitize.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import CHECKPOINT, IMAGE, QUESTION, rel_err
from fastvlm_mlx import Chat, load
from fastvlm_mlx.errors import FastVLMError
from fastvlm_mlx.processor import load_image, preprocess

TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Files the published repos carry that would run code if anything trusted them.
REMOTE_CODE = ("llava_qwen.py", "processing_fastvlm.py")


def published() -> tuple[dict, dict]:
    return mx.load(str(CHECKPOINT / "model.safetensors")), json.loads((CHECKPOINT / "config.json").read_text())


def write_checkpoint(out: Path, weights: dict, config: dict, extra: dict | None = None) -> Path:
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER:
        shutil.copyfile(CHECKPOINT / name, out / name)
    for name, text in (extra or {}).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return out


def trap(out: Path) -> dict:
    """Python files that leave a mark if run: nothing may run them."""
    code = f"open({str(out / 'RAN')!r}, 'w').write('remote code ran')\n"
    return {name: code for name in REMOTE_CODE}


# --- mlx-community/FastVLM-* (mlx-vlm's converter, mlx-lm's quantization) ---

def mlx_vlm_key(key: str) -> str:
    """mlx-vlm's fastvlm Model.sanitize."""
    if "vision_tower" in key:
        key = key.replace("model.vision_tower.vision_tower.model", "vision_tower.vision_model")
        return key.replace("patch_embed", "patch_embed.blocks")
    if "mm_projector" in key:
        return key.replace("model.", "")
    return "language_model." + key


def mlx_community(out: Path, bits: int | None = None, group_size: int = 64, dequantized: bool = False) -> Path:
    """mlx-community/FastVLM-*; `dequantized` stores the quantized values back as floats."""
    weights, config = published()
    converted = {}
    for key, value in weights.items():
        key = mlx_vlm_key(key)
        if "num_batches_tracked" in key:
            continue
        if value.ndim == 4:  # VisionModel.sanitize: PyTorch convs -> [O, kH, kW, I]
            value = value.transpose(0, 2, 3, 1)
        elif "layer_scale" in key:  # [C, 1, 1] -> [1, 1, C]
            value = value.transpose(1, 2, 0)
        converted[key] = value
    if bits:  # mlx-lm's quantize_model, the vision tower skipped
        for key in [k for k in converted if k.endswith(".weight")]:
            module = key[: -len(".weight")]
            quantizable = key.startswith(("language_model.", "mm_projector.")) and converted[key].ndim == 2
            if quantizable and "norm" not in key and converted[key].shape[-1] % group_size == 0:
                q, scales, biases = mx.quantize(converted[key], group_size, bits)
                if dequantized:
                    f32 = mx.float32  # as the CPU backend computes with them
                    converted[key] = mx.dequantize(q, scales.astype(f32), biases.astype(f32), group_size, bits)
                else:
                    converted.update({key: q, f"{module}.scales": scales, f"{module}.biases": biases})
        if not dequantized:
            config["quantization"] = config["quantization_config"] = {
                "group_size": group_size, "bits": bits, "mode": "affine"}
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "torch_dtype")}
    side = config["vision_config"]["image_size"]
    extra = {
        **trap(out),
        "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "processor_config.json": json.dumps({"auto_map": {"AutoProcessor": "processing_fastvlm.FastVLMProcessor"},
                                             "processor_class": "FastVLMProcessor"}),
        "preprocessor_config.json": json.dumps({
            "auto_map": {"AutoImageProcessor": "processing_fastvlm.FastVLMImageProcessor"},
            "crop_size": {"height": side, "width": side}, "do_center_crop": True, "do_normalize": True,
            "do_rescale": True, "image_mean": [0, 0, 0], "image_std": [1, 1, 1],
            "image_processor_type": "FastVLMImageProcessor", "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": side}}),
    }
    return write_checkpoint(out, converted, config, extra)


# --- transformers' port, model_type fast_vlm (convert_fastvlm_weights_to_hf.py) ---

PORT_RENAMES = {
    "model.vision_tower.vision_tower.model": "model.vision_tower.timm_model",
    "patch_embed": "stem", "layers": "language_model.layers", "embed_tokens": "language_model.embed_tokens",
    "layer_scale_1": "layer_scale_1.gamma", "layer_scale_2": "layer_scale_2.gamma",
    "mm_projector.0": "multi_modal_projector.linear_1", "mm_projector.2": "multi_modal_projector.linear_2",
    "conv_exp": "final_conv", "se.reduce": "se.fc1", "se.expand": "se.fc2", "convffn": "mlp",
    "lkb_reparam": "reparam_conv",
}


def map_to_stage(i: int) -> int:
    return 0 if i == 0 else 1 if i <= 2 else 2 if i <= 4 else 3 if i <= 7 else 4


def port_key(key: str) -> str:
    if key.endswith("layer_scale"):
        key += ".gamma"
    if key.startswith("model.norm"):
        key = key.replace("model.norm", "model.language_model.norm", 1)
    if "token_mixer" not in key:
        key = key.replace(".proj.", ".downsample.proj.")
    key = re.sub(r"network\.(\d{1,2})\.(\d{1,2})", lambda m: f"stages.{map_to_stage(int(m[1]))}.blocks.{m[2]}", key)
    key = re.sub(r"network\.(\d{1,2})", lambda m: f"stages.{map_to_stage(int(m[1]))}", key)
    key = re.sub(r"stages\.(\d{1,2})\.reparam_conv", r"stages.\1.pos_emb.reparam_conv", key)
    for old, new in PORT_RENAMES.items():
        key = key.replace(old, new)
    return key


def transformers_port(out: Path) -> Path:
    weights, config = published()
    vocab = config["vocab_size"]
    padded = (vocab + 1 + 63) // 64 * 64  # the converter adds <image> and pads to a multiple of 64
    rng = np.random.default_rng(0)
    converted = {}
    for key, value in weights.items():
        if key.endswith("head.proj"):
            continue  # the converter deletes the CLIP head
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = rng.normal(0, 0.02, (padded - vocab, value.shape[1]))
            value = mx.concatenate([value, mx.array(rows, dtype=value.dtype)])
        converted[port_key(key)] = value
        if key.endswith(".bn.running_var"):
            converted[port_key(key.replace("running_var", "num_batches_tracked"))] = mx.array(1000)
    text_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "num_hidden_layers", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id")
    port = {
        "architectures": ["FastVlmForConditionalGeneration"], "model_type": "fast_vlm",
        "image_token_id": vocab, "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        "text_config": {"model_type": "qwen2", **{k: config[k] for k in text_keys}, "vocab_size": padded},
        # The published port's tower is timm's fastvit_mci3; this small one restates its shape.
        "vision_config": {"model_type": "timm_wrapper", "architecture": "fastvit_mci3",
                          "num_features": config["mm_hidden_size"], "model_args": {"inference_mode": True},
                          **config["vision_config"]},
    }
    return write_checkpoint(out, converted, port)


# --- Apple's MLX export for the FastVLM app (CoreML vision tower) ---

def app_export(out: Path) -> Path:
    weights, config = published()
    kept = {}
    for key, value in weights.items():
        if "vision_tower" in key:
            continue
        if "mm_projector" in key:
            kept[key.replace("model.mm_projector.", "multi_modal_projector.linear_")] = value
        else:
            kept["language_model." + key] = value
    extra = {"fastvithd.mlpackage/Manifest.json": "{}",
             "fastvithd.mlpackage/Data/com.apple.CoreML/model.mlmodel": "coreml",
             "processor_config.json": json.dumps({"image_token": "<image>", "processor_class": "LlavaProcessor"})}
    return write_checkpoint(out, kept, {**config, "image_token_index": config["vocab_size"]}, extra)


def parity(model, tokenizer, reference) -> tuple[float, float, list[int]]:
    """Image features' and prefill logits' relative error against the reference, and greedy tokens."""
    features = model.encode_image(preprocess(load_image(IMAGE), 256))
    ids = reference["input_ids"][0].tolist()
    logits = model.lm_head(model.language_model.model(None, input_embeddings=model.embed(ids, features)))
    vocab = reference["prefill_logits"].shape[-1]
    chat = Chat(model, tokenizer, IMAGE)
    chat.stop_ids = set()  # the reference disabled end-of-sequence
    tokens = [r.token for r in chat.ask(QUESTION, max_tokens=8)]
    return (rel_err(features, reference["image_features"]),
            rel_err(logits[0, -1, :vocab], reference["prefill_logits"]), tokens)


@pytest.mark.parametrize("build", [lambda p: mlx_community(p), transformers_port], ids=["mlx-vlm", "fast_vlm"])
def test_layout_loads_directly_and_matches_the_reference(build, reference, tmp_path, capfd):
    path = build(tmp_path / "ckpt")
    model, tokenizer = load(path, dtype=mx.float32)
    features, logits, tokens = parity(model, tokenizer, reference)
    assert features <= 1e-4 and logits <= 1e-4  # the published layout's own tolerances
    assert tokens == reference["generated_ids"].tolist()
    assert not (path / "RAN").exists()
    assert capfd.readouterr().err == ""  # quietly


# Measured on the fixture (random weights, a 64-wide decoder, so coarse): 8-bit features
# 1.1e-2, logits 2.3e-2, greedy tokens identical; 4-bit features 8.7e-2, logits 2.6e-1.
QUANTIZED_BOUNDS = {8: (2e-2, 4e-2), 4: (1.5e-1, 4e-1)}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_mlx_community_checkpoints_load_directly(bits, reference, tmp_path):
    path = mlx_community(tmp_path / "ckpt", bits=bits)
    model, tokenizer = load(path)
    assert model.mm_projector.linear_1.bits == bits  # mlx-vlm quantizes the projector too
    features, logits, tokens = parity(model, tokenizer, reference)
    assert features <= QUANTIZED_BOUNDS[bits][0] and logits <= QUANTIZED_BOUNDS[bits][1]
    if bits == 8:
        assert tokens == reference["generated_ids"].tolist()
    # Exactly what the quantized numbers say: the same values stored as floats give the same outputs.
    plain, _ = load(mlx_community(tmp_path / "plain", bits=bits, dequantized=True))
    pixels = preprocess(load_image(IMAGE), 256)
    assert rel_err(model.encode_image(pixels), plain.encode_image(pixels)) <= 1e-5
    ids = [1, 2, 3]
    assert rel_err(model.lm_head(model.language_model.model(mx.array([ids]))),
                   plain.lm_head(plain.language_model.model(mx.array([ids])))) <= 1e-5


@pytest.mark.parametrize("build, bits", [(lambda p: mlx_community(p, bits=8), 8), (transformers_port, None)],
                         ids=["mlx-vlm-8bit", "fast_vlm"])
def test_layouts_convert_too(build, bits, reference, tmp_path):
    """A quantized source stays quantized; the result answers like the reference."""
    from fastvlm_mlx.convert import convert

    out = convert(build(tmp_path / "ckpt"), tmp_path / "ours")
    config = json.loads((out / "config.json").read_text())
    assert config.get("quantization", {}).get("bits") == bits
    model, tokenizer = load(out)
    assert parity(model, tokenizer, reference)[2] == reference["generated_ids"].tolist()


def test_published_vision_configs_describe_the_published_tower():
    """mlx-vlm's vision_config (or the empty one its quantizer adds) and transformers'
    timm_wrapper one restate FastViTHD: they build the same tower as none at all."""
    from fastvlm_mlx.bench.harness import random_config
    from fastvlm_mlx.fastvithd import VisionConfig
    from fastvlm_mlx.fastvlm import ModelArgs, flat_config

    published = random_config("0.5b")
    mlx_vlm = {"model_type": "llava_qwen2", "hidden_size": 1024, "intermediate_size": 3072,
               "image_size": 1024, "patch_size": 64, "projection_dim": 768}
    timm = {"model_type": "timm_wrapper", "architecture": "fastvit_mci3", "hidden_size": 3072,
            "num_features": 3072, "model_args": {"inference_mode": True}}
    text = {k: v for k, v in published.items() if not k.startswith("mm_")}
    port = {"model_type": "fast_vlm", "text_config": {**text, "model_type": "qwen2"}, "vision_config": timm}
    for config in ({**published, "vision_config": mlx_vlm}, {**published, "vision_config": {}}, flat_config(port)):
        args = ModelArgs.from_dict(config)
        assert args.vision_config == VisionConfig() and args.mm_hidden_size == 3072
        assert args.text_config.hidden_size == 896 and args.text_config.tie_word_embeddings


def test_app_export_is_refused_like_convert_refuses_it(tmp_path):
    from fastvlm_mlx.convert import convert

    path = app_export(tmp_path / "export")
    message = "vision tower is a CoreML model"
    with pytest.raises(FastVLMError, match=message):
        load(path)
    with pytest.raises(FastVLMError, match=message):
        convert(path, tmp_path / "out")
    shutil.rmtree(path / "fastvithd.mlpackage")  # its weights alone say so too
    with pytest.raises(FastVLMError, match=message):
        load(path)
    assert not (tmp_path / "out").exists()


def test_app_export_on_the_hub_is_refused_from_its_file_list(monkeypatch):
    import huggingface_hub

    from fastvlm_mlx import hub

    files = ["config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer_config.json",
             "fastvithd.mlpackage/Manifest.json", "fastvithd.mlpackage/Data/com.apple.CoreML/weights/weight.bin"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision=None: files)

    def download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    with pytest.raises(FastVLMError, match="apple/FastVLM-0.5B-fp16: .*CoreML"):
        hub.fetch("apple/FastVLM-0.5B-fp16")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo, revision=None: ["config.json", "pytorch_model.bin"])
    with pytest.raises(FastVLMError, match="PyTorch weights only: convert it first"):
        hub.fetch("someone/FastVLM-pickles")


def fake_hub(root: Path, repo: str, checkpoint: Path) -> dict:
    """An HF cache holding `checkpoint` as `repo`; the hub itself is offline."""
    commit = "0" * 40
    cached = root / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(checkpoint, cached / "snapshots" / commit)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(commit)
    return {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1",
            "XDG_CACHE_HOME": str(root / "cache")}


@pytest.mark.parametrize("repo, build", [
    ("mlx-community/FastVLM-tiny-4bit", lambda p: mlx_community(p, bits=4)),
    ("apple/FastVLM-tiny", lambda p: shutil.copytree(CHECKPOINT, p)),
], ids=["mlx-community", "apple"])
def test_hub_id_loads_from_its_snapshot_with_nothing_converted(repo, build, tmp_path):
    build(tmp_path / "ckpt")
    env = fake_hub(tmp_path, repo, tmp_path / "ckpt")
    r = subprocess.run([sys.executable, "-m", "fastvlm_mlx", "chat", str(IMAGE), "--model", repo,
                        "--prompt", QUESTION, "--max-tokens", "8"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "TTFT" in r.stderr and len(r.stdout.strip()) > 0
    assert not (tmp_path / "cache").exists()  # loaded in place: no conversion, no second copy
