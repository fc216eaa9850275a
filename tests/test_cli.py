"""The `fastvlm-mlx chat` command: answers, an interactive session, and bad input."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import CHECKPOINT, IMAGE, QUESTION
from fastvlm_mlx.fastvlm import IMAGE_TOKEN_INDEX
from fastvlm_mlx.defaults import DEFAULT_SYSTEM
from fastvlm_mlx.processor import first_turn, next_turn
from fastvlm_mlx.utils import load_tokenizer

REFERENCE_TEXT = "\t\tlplplplplplp"  # reference.json's generated_text (8 greedy tokens)


def run(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastvlm_mlx", *args],
        input=stdin, capture_output=True, text=True, timeout=300, env=env,
    )


def test_one_shot_answer():
    r = run("chat", str(IMAGE), "--model", str(CHECKPOINT), "--prompt", QUESTION, "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == REFERENCE_TEXT + "\n"
    assert "TTFT" in r.stderr and "16 visual tokens" in r.stderr


def test_interactive_session_through_stdin():
    script = f"{QUESTION}\nAnd then?\n/reset\n{QUESTION}\n"
    r = run("chat", str(IMAGE), "--model", str(CHECKPOINT), "--max-tokens", "8", stdin=script)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.split("\n")
    assert answers[0] == REFERENCE_TEXT
    footers = [line for line in r.stderr.splitlines() if "TTFT" in line]
    assert len(footers) == 3
    # The second turn prefilled only itself (and the closing <|im_end|> of the first
    # answer); after /reset the prompt again, but not the template before the image.
    tokenizer = load_tokenizer(CHECKPOINT)
    opening = first_turn(tokenizer, DEFAULT_SYSTEM, QUESTION)
    second = len(next_turn(tokenizer, "And then?")) + 1
    after_reset = len(opening) - 1 + 16 - opening.index(IMAGE_TOKEN_INDEX)
    assert f"({len(opening) - 1 + 16} tok)" in footers[0]
    assert f"({second} tok)" in footers[1] and f"({after_reset} tok)" in footers[2]
    assert "vision 0 ms" in footers[1] and "vision 0 ms" in footers[2]
    assert "history cleared" in r.stderr
    assert r.stdout.count(REFERENCE_TEXT) == 2


@pytest.fixture
def broken(tmp_path):
    """Files and model directories that are wrong in one way each."""
    (tmp_path / "notes.txt").write_text("not a picture")
    png = IMAGE.read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    for name, drop in [("no-config", "config.json"), ("no-weights", "model.safetensors"),
                       ("no-tokenizer", "tokenizer.json")]:
        shutil.copytree(CHECKPOINT, tmp_path / name)
        (tmp_path / name / drop).unlink()
    return tmp_path


@pytest.mark.parametrize("image, model, extra, message", [
    ("missing.png", None, [], "image not found"),
    ("notes.txt", None, [], "not an image"),
    ("truncated.png", None, [], "truncated or corrupt"),
    (None, "no-config", [], "no config.json"),
    (None, "no-weights", [], "no *.safetensors weights"),
    (None, "no-tokenizer", [], "no tokenizer"),
    (None, None, ["--prompt", "word " * 5000], "context is 4096"),
    (None, None, ["--resolution", "100"], "multiple of 64"),
])
def test_bad_input_is_one_line_and_exit_2(broken, image, model, extra, message):
    image = str(broken / image) if image else str(IMAGE)
    model = str(broken / model) if model else str(CHECKPOINT)
    extra = extra or ["--prompt", QUESTION]
    r = run("chat", image, "--model", model, *extra)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert r.stdout == ""


def test_default_model_comes_from_the_hub(tmp_path):
    """Without --model, apple/FastVLM-0.5B is fetched; offline that fails clearly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = run("chat", str(IMAGE), "--prompt", QUESTION, env=env)
    assert r.returncode == 2
    assert "apple/FastVLM-0.5B" in r.stderr and "--model PATH" in r.stderr
    assert "Traceback" not in r.stderr


def test_fastv_option():
    r = run("chat", str(IMAGE), "--model", str(CHECKPOINT), "--prompt", QUESTION,
            "--max-tokens", "8", "--fastv", "1:0.5")
    assert r.returncode == 0, r.stderr
    assert "(8 kept by FastV)" in r.stderr
    bad = run("chat", str(IMAGE), "--model", str(CHECKPOINT), "--prompt", QUESTION, "--fastv", "5:0.5")
    assert bad.returncode == 2 and "K must be in [1, 2)" in bad.stderr
