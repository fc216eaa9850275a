"""The mlx-vlm comparison's parts that need no mlx-vlm: the HF-layout writer, the refusal."""

import json
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from conftest import CHECKPOINT
from fastvlm_mlx import load
from fastvlm_mlx.bench import compare
from fastvlm_mlx.bench.harness import random_model
from fastvlm_mlx.convert import convert
from fastvlm_mlx.errors import FastVLMError

TINY_CONFIG = json.loads((CHECKPOINT / "config.json").read_text())


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY_CONFIG, mx.float32)


def test_writer_uses_the_published_layout(tiny):
    """Same keys and shapes as the fixture, which Apple's code wrote (the unused head aside)."""
    published = mx.load(str(CHECKPOINT / "model.safetensors"))
    written = compare.hf_weights(tiny)
    assert set(written) == set(published)
    head = compare.HF_TOWER_PREFIX + "head.proj"
    assert {k: v.shape for k, v in written.items() if k != head} == \
        {k: v.shape for k, v in published.items() if k != head}


def assert_identical(a, b):
    ours, theirs = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert set(ours) == set(theirs)
    for k in ours:
        assert mx.array_equal(ours[k], theirs[k]).item(), k
    pixels = mx.random.uniform(shape=(1, 256, 256, 3), key=mx.random.key(0))
    ids = [5, 6, -200, 7]
    fa, fb = a.encode_image(pixels), b.encode_image(pixels)
    assert mx.array_equal(fa, fb).item()
    la = a.language_model(None, input_embeddings=a.embed(ids, fa))
    lb = b.language_model(None, input_embeddings=b.embed(ids, fb))
    assert mx.array_equal(la, lb).item()


def test_writer_round_trips_through_the_loader(tiny, tmp_path):
    """Written in HF layout, loaded back: every weight and output bit-identical (exact BN fold)."""
    path = compare.write_hf_checkpoint(tiny, TINY_CONFIG, tmp_path / "hf")
    model, _ = load(path, dtype=mx.float32)
    assert_identical(tiny, model)


def test_writer_round_trips_through_the_converter(tiny, tmp_path):
    path = compare.write_hf_checkpoint(tiny, TINY_CONFIG, tmp_path / "hf")
    model, _ = load(convert(path, tmp_path / "mlx"), dtype=mx.float32)
    assert_identical(tiny, model)


def test_missing_mlx_vlm_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_vlm", None)  # import mlx_vlm now raises ImportError
    with pytest.raises(FastVLMError, match=r"pip install -e '\.\[compare\]'"):
        compare.compare([256])
    r = CliRunner().invoke(compare.app, ["--resolutions", "256"])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {compare.MISSING}"
