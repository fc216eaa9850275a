"""Parity with what Apple's reference PyTorch code computed on the fixture."""

import numpy as np
import mlx.core as mx
from mlx.utils import tree_flatten

from conftest import CHECKPOINT, IMAGE, QUESTION, rel_err
from fastvlm_mlx import Chat, load
from fastvlm_mlx.fastvlm import HF_LAYOUT
from fastvlm_mlx.defaults import DEFAULT_SYSTEM
from fastvlm_mlx.processor import first_turn, load_image, preprocess


def test_preprocessing_matches_pixel_values(reference):
    pixels = preprocess(load_image(IMAGE), 256)
    assert pixels.shape == (1, 256, 256, 3)
    expected = np.asarray(reference["pixel_values"]).transpose(0, 2, 3, 1)
    assert np.abs(np.asarray(pixels) - expected).max() <= 1e-5


def test_prompt_ids_match_input_ids(tiny, reference):
    _, tokenizer = tiny
    ids = first_turn(tokenizer, DEFAULT_SYSTEM, QUESTION)
    assert ids == reference["input_ids"][0].tolist()


def test_image_embeddings_and_features(tiny, reference):
    model, _ = tiny
    pixels = mx.array(np.asarray(reference["pixel_values"]).transpose(0, 2, 3, 1))
    embeddings = model.vision_tower(pixels)  # NHWC
    assert rel_err(embeddings.transpose(0, 3, 1, 2), reference["image_embeddings"]) <= 1e-4
    assert rel_err(model.encode_image(pixels), reference["image_features"]) <= 1e-4


def test_prefill_logits(tiny, reference):
    model, _ = tiny
    ids = reference["input_ids"][0].tolist()
    features = model.encode_image(preprocess(load_image(IMAGE), 256))
    logits = model.language_model(None, input_embeddings=model.embed(ids, features))
    assert rel_err(logits[0, -1], reference["prefill_logits"]) <= 1e-4


def test_greedy_decoding_reproduces_generated_ids(tiny, reference):
    model, tokenizer = tiny
    chat = Chat(model, tokenizer, IMAGE)
    chat.stop_ids = set()  # the reference disabled end-of-sequence
    tokens = [r.token for r in chat.ask(QUESTION, max_tokens=8)]
    assert tokens == reference["generated_ids"].tolist()


def test_mlx_layout_roundtrip(tiny, reference, tmp_path):
    """Weights saved in our layout (NHWC convs, folded BN) load back to the same logits."""
    model, _ = tiny
    for f in CHECKPOINT.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    again, _ = load(tmp_path, dtype=mx.float32)
    ids = reference["input_ids"][0].tolist()
    features = again.encode_image(preprocess(load_image(IMAGE), 256))
    logits = again.language_model(None, input_embeddings=again.embed(ids, features))
    assert rel_err(logits[0, -1], reference["prefill_logits"]) <= 1e-4


def test_mlx_layout_with_layer_scales_still_loads(tiny, reference, tmp_path):
    """Directories converted before layer scales were folded keep them as weights:
    the loader folds them, and the features still match the reference."""
    for f in CHECKPOINT.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = HF_LAYOUT.sanitize(mx.load(str(CHECKPOINT / "model.safetensors")), tiny[0].vision_tower)
    assert any(k.endswith(".layer_scale_1") for k in weights)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    model, _ = load(tmp_path, dtype=mx.float32)
    pixels = mx.array(np.asarray(reference["pixel_values"]).transpose(0, 2, 3, 1))
    assert rel_err(model.encode_image(pixels), reference["image_features"]) <= 1e-4


def test_portable_path_agrees_with_the_cpu_path(tiny, reference, monkeypatch):
    """The tower on MLX's own ops (what Metal runs) gives the CPU kernels' result."""
    model, _ = tiny
    pixels = mx.array(np.asarray(reference["pixel_values"]).transpose(0, 2, 3, 1))
    monkeypatch.setenv("FASTVLM_MLX_KERNELS", "cpu")
    cpu = model.vision_tower(pixels)
    monkeypatch.setenv("FASTVLM_MLX_KERNELS", "portable")
    portable = model.vision_tower(pixels)
    assert rel_err(portable, cpu) <= 1e-5
    assert rel_err(portable.transpose(0, 3, 1, 2), reference["image_embeddings"]) <= 1e-4
