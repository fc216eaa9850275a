"""The portable kernels (what Metal and CUDA run) under the same parity suite as the CPU kernels."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import CHECKPOINT, IMAGE, QUESTION, rel_err
from fastvlm_mlx import Chat, load

ROOT = Path(__file__).parent.parent
# Everything that compares with the reference or relies on the model's numbers.
PARITY_SUITE = ["test_parity.py", "test_chat.py", "test_fastv.py", "test_layouts.py", "test_convert.py",
                "test_checkpoints.py"]


def test_parity_suite_passes_on_the_portable_path():
    env = {**os.environ, "FASTVLM_MLX_KERNELS": "portable"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *[f"tests/{name}" for name in PARITY_SUITE]],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1] and "failed" not in r.stdout.splitlines()[-1]


# One path's run of the published FastViTHD's shapes (random weights, seeded) at 1024 px.
TOWER_AT_1024 = """
import sys
import mlx.core as mx
import numpy as np
from fastvlm_mlx.bench.harness import fold_skips
from fastvlm_mlx.fastvithd import FastViTHD, VisionConfig

mx.random.seed(0)
tower = FastViTHD(VisionConfig())
fold_skips(tower)
pixels = mx.random.uniform(shape=(1, 1024, 1024, 3), key=mx.random.key(1))
np.save(sys.argv[1], np.asarray(tower(pixels)))
"""


def test_full_size_tower_agrees_across_paths_at_1024_px(tmp_path):
    """Both paths at once, a process each: with the mlx wheel's reference BLAS each
    runs mostly on one core, ~150 s here (5.8 s and 28 s with OpenBLAS)."""
    runs = {path: subprocess.Popen([sys.executable, "-c", TOWER_AT_1024, str(tmp_path / f"{path}.npy")],
                                   env={**os.environ, "FASTVLM_MLX_KERNELS": path},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for path in ("cpu", "portable")}
    for path, run in runs.items():
        out, _ = run.communicate(timeout=1500)
        assert run.returncode == 0, f"{path}: {out[-3000:]}"
    cpu, portable = (np.load(tmp_path / f"{path}.npy") for path in ("cpu", "portable"))
    assert cpu.shape == (1, 16, 16, 3072) and np.isfinite(cpu).all() and cpu.std() > 1e-3
    assert rel_err(portable, cpu) <= 1e-5


# Unit roundoff of each half type; errors of a few of them are half precision's own.
ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


@pytest.mark.parametrize("dtype", ROUNDOFF)
def test_half_precision_keeps_the_reference_answer(dtype, reference, monkeypatch):
    """What a GPU runs by default: the portable path with activations in half precision.
    The features and logits stay within a few roundoffs, and the top-1 token agrees
    with the reference at every step, teacher-forced and in a greedy chat."""
    monkeypatch.setenv("FASTVLM_MLX_KERNELS", "portable")
    model, tokenizer = load(CHECKPOINT, dtype=getattr(mx, dtype))
    pixels = mx.array(np.asarray(reference["pixel_values"]).transpose(0, 2, 3, 1))
    features = model.encode_image(pixels.astype(model.dtype))
    assert features.dtype == getattr(mx, dtype)  # computed in half, not upcast
    assert rel_err(features.astype(mx.float32), reference["image_features"]) <= 8 * ROUNDOFF[dtype]
    ids, answer = reference["input_ids"][0].tolist(), reference["generated_ids"].tolist()
    for step, expected in enumerate(answer):
        embeddings = model.embed(ids + answer[:step], features)
        logits = model.language_model(None, input_embeddings=embeddings)[0, -1].astype(mx.float32)
        if step == 0:
            assert rel_err(logits, reference["prefill_logits"]) <= 8 * ROUNDOFF[dtype]
        assert mx.argmax(logits).item() == expected, step
    chat = Chat(model, tokenizer, IMAGE)
    chat.stop_ids = set()  # the reference disabled end-of-sequence
    assert [r.token for r in chat.ask(QUESTION, max_tokens=len(answer))] == answer
