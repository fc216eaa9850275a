"""`fastvlm-mlx convert`: fidelity, dtypes, quantization, refusals, atomic output, hub cache."""

import importlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from conftest import CHECKPOINT, FIXTURE, IMAGE, QUESTION, rel_err
from fastvlm_mlx import Chat, load
from fastvlm_mlx.cli import app
from fastvlm_mlx.convert import convert
from fastvlm_mlx.convert.convert import MARKER
from fastvlm_mlx.fastvlm import IMAGE_TOKEN_INDEX
from fastvlm_mlx.processor import load_image, preprocess

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args))


def prefill_logits(model, reference):
    features = model.encode_image(preprocess(load_image(IMAGE), 256))
    ids = reference["input_ids"][0].tolist()
    return model.language_model(None, input_embeddings=model.embed(ids, features))[0, -1]


def greedy_tokens(model, tokenizer, n=8):
    chat = Chat(model, tokenizer, IMAGE)
    chat.stop_ids = set()
    return [r.token for r in chat.ask(QUESTION, max_tokens=n)]


def weight_bytes(path: Path, prefix: str = "") -> int:
    weights = {}
    for f in path.glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    return sum(v.nbytes for k, v in weights.items() if k.startswith(prefix))


@pytest.mark.parametrize("source", ["checkpoint", "checkpoint-pytorch"])
def test_conversion_keeps_reference_fidelity(source, reference, tmp_path):
    out = tmp_path / "mlx"
    r = cli("convert", str(FIXTURE / source), "--out", str(out))
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["embed_dims"] == [8, 16, 32, 64, 128]
    assert config["image_token_index"] == -200 and config["image_size"] == 256
    weights = mx.load(str(out / "model.safetensors"))
    assert not any(k.startswith("model.") or "bn." in k or ".head." in k for k in weights)
    assert weights["vision_tower.patch_embed.0.reparam_conv.weight"].shape == (8, 3, 3, 3)  # O,kH,kW,I
    model, tokenizer = load(out, dtype=mx.float32)
    assert rel_err(prefill_logits(model, reference), reference["prefill_logits"]) <= 1e-4
    assert greedy_tokens(model, tokenizer) == reference["generated_ids"].tolist()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_keeps_greedy_tokens(dtype, reference, tmp_path):
    out = convert(CHECKPOINT, tmp_path / dtype, dtype=dtype)
    assert mx.load(str(out / "model.safetensors"))["language_model.model.norm.weight"].dtype == getattr(mx, dtype)
    model, tokenizer = load(out, dtype=getattr(mx, dtype))
    assert greedy_tokens(model, tokenizer) == reference["generated_ids"].tolist()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_decoder_loads_runs_and_shrinks(bits, tmp_path):
    full = convert(CHECKPOINT, tmp_path / "full", dtype="float16")
    quant = convert(CHECKPOINT, tmp_path / f"q{bits}", dtype="float16", quantize=bits)
    config = json.loads((quant / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits}
    # The tower stays float; the decoder's matrices take bits/16 of their size plus
    # one fp16 scale and bias per 64 weights; its norms and biases are not quantized.
    assert weight_bytes(quant, "vision_tower.") == weight_bytes(full, "vision_tower.")
    ratio = weight_bytes(quant, "language_model.") / weight_bytes(full, "language_model.")
    expected = (bits + 0.5) / 16
    assert expected < ratio < expected + 0.05, ratio
    model, tokenizer = load(quant)
    assert "QuantizedLinear" in repr(model.language_model)
    tokens = greedy_tokens(model, tokenizer, n=4)
    assert len(tokens) == 4


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    source = tmp_path / "evil"
    shutil.copytree(FIXTURE / "checkpoint-pytorch", source)
    for f in source.glob("pytorch_model*"):
        f.unlink()
    with zipfile.ZipFile(source / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Exploit()}, protocol=2))
    r = cli("convert", str(source), "--out", str(tmp_path / "out"))
    assert r.exit_code == 2
    assert "system" in r.output and "refused" in r.output
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def broken_copy(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copytree(CHECKPOINT, path)
    return path


def wrong_shape(path: Path):
    weights = mx.load(str(path / "model.safetensors"))
    weights["model.mm_projector.2.weight"] = mx.zeros((64, 32), dtype=mx.bfloat16)
    mx.save_safetensors(str(path / "model.safetensors"), weights)


def truncate(path: Path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def foreign(path: Path):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


@pytest.mark.parametrize("damage, message", [
    (truncate, "truncated or corrupt"),
    (wrong_shape, "mm_projector.linear_2.weight in"),
    (lambda p: (p / "tokenizer.json").unlink(), "no tokenizer"),
    (foreign, "model_type is 'llama'"),
    (lambda p: (p / "fastvithd.mlpackage").mkdir(), "CoreML"),
])
def test_bad_checkpoints_exit_2_and_leave_nothing(damage, message, tmp_path):
    source = broken_copy(tmp_path, "source")
    damage(source)
    out = tmp_path / "out"
    r = cli("convert", str(source), "--out", str(out))
    assert r.exit_code == 2
    assert message in r.output, r.output
    if damage is wrong_shape:
        assert "(64, 32)" in r.output and "(64, 64)" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_interrupted_write_leaves_nothing(monkeypatch, tmp_path):
    real_save = mx.save_safetensors

    def fail_midway(path, weights, metadata=None):
        real_save(path, dict(list(weights.items())[:3]), metadata=metadata)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", fail_midway)
    r = cli("convert", str(CHECKPOINT), "--out", str(tmp_path / "out"))
    assert r.exit_code == 2
    assert "No space left on device" in r.output
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_what_convert_wrote(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli("convert", str(CHECKPOINT), "--out", str(out)).exit_code == 2
    r = cli("convert", str(CHECKPOINT), "--out", str(out), "--force")
    assert r.exit_code == 2 and "not written by fastvlm-mlx convert" in r.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()  # an empty directory may be replaced
    assert cli("convert", str(CHECKPOINT), "--out", str(out), "--force").exit_code == 0
    first = (out / "model.safetensors").stat().st_ino
    assert cli("convert", str(CHECKPOINT), "--out", str(out), "--force", "--dtype", "float16").exit_code == 0
    assert (out / "model.safetensors").stat().st_ino != first  # ours: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing set aside is left


def test_stale_staging_of_a_killed_conversion_is_removed(tmp_path):
    """A SIGKILLed convert leaves its .partial directory; the next one in that place removes
    it if its process is gone, and leaves a live conversion's and anything not ours alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    for name, owner in [(".a.1.partial", {"pid": dead.pid, "host": host}),
                        (".b.2.partial", {"pid": os.getpid(), "host": host}),
                        (".c.3.partial", {"pid": dead.pid, "host": "another-machine"}),
                        (".d.4.partial", None)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
        if owner:
            (tmp_path / name / MARKER).write_text(json.dumps(owner))
    assert cli("convert", str(CHECKPOINT), "--out", str(tmp_path / "out")).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.2.partial", ".c.3.partial", ".d.4.partial", "out"]


def test_unreachable_hub_suggests_a_path(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "fastvlm_mlx", "convert", "apple/FastVLM-0.5B",
                        "--out", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "Hugging Face hub" in r.stderr and "--model PATH" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def tied_copy(tmp_path: Path, head) -> Path:
    """The fixture with tie_word_embeddings set, storing `head(embed_tokens)` as lm_head (None: no head)."""
    path = broken_copy(tmp_path, "tied")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = mx.load(str(path / "model.safetensors"))
    if head is None:
        del weights["lm_head.weight"]
    else:
        weights["lm_head.weight"] = head(weights["model.embed_tokens.weight"])
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


@pytest.mark.parametrize("head, note", [
    (None, False),
    (lambda e: e, False),  # stored and equal to embed_tokens: dropped silently
    (lambda e: e * 2 + 1, True),  # stored and different: dropped, and said once
])
def test_a_tied_config_ties_the_head_as_the_reference_does(head, note, tmp_path, capfd):
    path = tied_copy(tmp_path, head)
    model, tokenizer = load(path, dtype=mx.float32)
    err = capfd.readouterr().err
    assert ("stored lm_head" in err) == note and err.count("note:") == int(note)
    lm = model.language_model
    assert lm.args.tie_word_embeddings and "lm_head" not in lm
    features = model.encode_image(preprocess(load_image(IMAGE), 256))
    ids = [1, 2, IMAGE_TOKEN_INDEX, 3]
    h = lm.model(None, input_embeddings=model.embed(ids, features))[0, -1]
    expected = h @ lm.model.embed_tokens.weight.T
    assert rel_err(lm(None, input_embeddings=model.embed(ids, features))[0, -1], expected) <= 1e-6
    out = convert(path, tmp_path / "mlx")
    assert "language_model.lm_head.weight" not in mx.load(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_an_untied_config_keeps_its_head(tiny):
    model, _ = tiny
    lm = model.language_model
    assert not lm.args.tie_word_embeddings and "lm_head" in lm


def test_unwritable_output_place_is_refused_before_any_work(tmp_path, monkeypatch):
    """As root every directory is writable, so a read-only one is simulated."""
    module = importlib.import_module("fastvlm_mlx.convert.convert")
    read = []
    monkeypatch.setattr(module, "read_weights", lambda path: read.append(path))
    monkeypatch.setattr(module.os, "access", lambda path, mode: False)
    r = cli("convert", str(CHECKPOINT), "--out", str(tmp_path / "sub" / "out"))
    assert r.exit_code == 2 and f"{tmp_path} is not a writable directory" in r.output
    assert read == [] and list(tmp_path.iterdir()) == []
