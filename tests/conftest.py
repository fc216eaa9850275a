import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from fastvlm_mlx import load

# This machine's mlx wheel runs the reference BLAS; the commands' warning about it is
# tested on its own (test_bad_input.py), and kept out of every other command's output.
os.environ.setdefault("FASTVLM_MLX_NO_BLAS_WARNING", "1")

FIXTURE = Path(__file__).parent / "fixtures" / "fastvlm-tiny"
CHECKPOINT = FIXTURE / "checkpoint"
IMAGE = FIXTURE / "image.png"
QUESTION = "Describe the image."


def rel_err(a, b) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="session")
def reference() -> dict:
    return mx.load(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="session")
def tiny():
    """The fixture model in float32, loaded from its published (HF/LLaVA) layout."""
    return load(CHECKPOINT, dtype=mx.float32)
