"""`fastvlm-mlx caption`: a folder made at test time, resume after a kill, batch sizes, two ranks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from conftest import CHECKPOINT, IMAGE, QUESTION, rel_err
from fastvlm_mlx import generate
from fastvlm_mlx.caption import Settings, caption_all, collect
from fastvlm_mlx.processor import load_image, preprocess

ROOT = Path(__file__).parent.parent


@pytest.fixture
def folder(tmp_path):
    """Seven images (one nested two deep), a corrupt PNG and a file that is no image."""
    root = tmp_path / "photos"
    (root / "trip" / "day2").mkdir(parents=True)
    shutil.copy(IMAGE, root / "fixture.png")
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 256, (50 + 9 * i, 70, 3), dtype=np.uint8)
        where = root / "trip" / ("day2" if i % 3 == 0 else "")
        Image.fromarray(pixels).save(where / f"img{i}.{'jpg' if i % 2 else 'PNG'}")
    (root / "trip" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt.md").write_text("not an image")
    return root


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastvlm_mlx", "caption", *map(str, args), "--model",
                           str(CHECKPOINT), "--max-tokens", "6", "--prompt", QUESTION],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in rec.items() if k != "timings"} for rec in records]


def test_a_folder_is_captioned_in_order_and_failures_are_lines(folder, tmp_path, tiny):
    out = tmp_path / "captions.jsonl"
    r = cli(folder, "--out", out, "--batch", "3")
    assert r.returncode == 0, r.stderr
    records = lines(out)
    paths = [rec["path"] for rec in records]
    assert paths == sorted(paths) and len(paths) == 8 and paths == collect([str(folder)])
    broken = next(rec for rec in records if rec["path"].endswith("broken.png"))
    assert "not an image" in broken["error"] and "text" not in broken
    model, tokenizer = tiny
    for rec in records:
        if "text" in rec:  # what chat answers, one image at a time
            assert rec["text"] == generate(model, tokenizer, rec["path"], QUESTION, max_tokens=6)
            assert rec["tokens"] >= 1 and set(rec["timings"]) == {"vision_ms", "prefill_ms", "decode_ms"}
    assert "7 done, 0 skipped" in r.stderr and "1 failed" in r.stderr


def test_a_killed_run_resumes_without_loss_or_duplicates(folder, tmp_path):
    out = tmp_path / "captions.jsonl"
    assert cli(folder, "--out", out).returncode == 0
    whole = lines(out)
    kept = out.read_text().splitlines(keepends=True)[:3]
    out.write_text("".join(kept) + kept[-1][:17])  # SIGKILL in the middle of the fourth line
    r = cli(folder, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "3 skipped" in r.stderr
    assert without_timings(lines(out)) == without_timings(whole)  # in order, each once
    again = cli(folder, "--out", out)
    assert "0 done, 8 skipped" in again.stderr and out.read_text().count("\n") == 8


def test_ctrl_c_stops_after_whole_lines_with_exit_130(folder, tmp_path):
    for i in range(40):
        shutil.copy(IMAGE, folder / f"copy{i:02}.png")
    out = tmp_path / "captions.jsonl"
    run = subprocess.Popen([sys.executable, "-m", "fastvlm_mlx", "caption", str(folder), "--out", str(out),
                            "--model", str(CHECKPOINT), "--max-tokens", "6", "--batch", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # bounded: 60 s
        if out.exists() and out.read_text().count("\n") >= 2:
            break
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "Traceback" not in err
    written = out.read_text()
    assert written.endswith("\n") and 2 <= written.count("\n") < 48
    assert all(json.loads(line)["path"] for line in written.splitlines())


def test_batch_sizes_give_the_same_captions(folder, tmp_path, tiny):
    model, tokenizer = tiny
    texts = {}
    for batch in (1, 4, 8):
        out = tmp_path / f"b{batch}.jsonl"
        counts = caption_all(model, tokenizer, collect([str(folder)]), out, Settings(QUESTION, 6, 256, batch))
        assert counts == {"done": 7, "failed": 1, "skipped": 0}
        texts[batch] = lines(out)
    assert without_timings(texts[1]) == without_timings(texts[4]) == without_timings(texts[8])
    # The tower's batched pass is the single passes' (features to 1e-5).
    images = [load_image(p) for p in collect([str(folder)]) if not p.endswith("broken.png")][:4]
    pixels = mx.concatenate([preprocess(im, 256) for im in images])
    together = model.encode_image(pixels)
    for i in range(4):
        assert rel_err(together[i:i + 1], model.encode_image(pixels[i:i + 1])) <= 1e-5


def test_inputs_as_globs_and_lists(folder, tmp_path):
    listing = tmp_path / "list.txt"  # paths relative to the list's own directory
    listing.write_text("# two of them\nphotos/fixture.png\n\nphotos/trip/img1.jpg\n")
    got = collect([str(listing), str(folder / "trip" / "**" / "*.PNG")])
    assert got == sorted(str(folder / p) for p in ("fixture.png", "trip/img1.jpg", "trip/day2/img0.PNG",
                                                   "trip/img2.PNG", "trip/img4.PNG"))


@pytest.mark.parametrize("setup, args, message", [
    (lambda d: None, ["nowhere", "--out", "x.jsonl"], "input not found: nowhere"),
    (lambda d: (d / "empty").mkdir(), ["empty", "--out", "x.jsonl"], "no images found"),
    (lambda d: (d / "x.jsonl").write_text("hello\n"), ["photos", "--out", "x.jsonl"], "line 1 is not a caption line"),
    (lambda d: (d / "dir.jsonl").mkdir(), ["photos", "--out", "dir.jsonl"], "is a directory"),
    (lambda d: None, ["photos", "--out", "missing/x.jsonl"], "does not exist"),
    (lambda d: None, ["photos", "--out", "x.jsonl", "--batch", "0"], "Invalid value for '--batch'"),
    (lambda d: None, ["photos", "--out", "x.jsonl", "--resolution", "100"], "multiple of 64"),
    (lambda d: None, ["photos", "--out", "x.jsonl", "--resolution", "4096"], "model's context is 4096"),
])
def test_bad_input_is_one_error_line(folder, tmp_path, setup, args, message):
    setup(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_two_ranks_under_mlx_launch_merge_to_the_single_process_output(folder, tmp_path):
    single, merged = tmp_path / "single.jsonl", tmp_path / "merged.jsonl"
    assert cli(folder, "--out", single).returncode == 0
    launch = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or "mlx.launch"
    r = subprocess.run([launch, "--backend", "ring", "-n", "2", "--", sys.executable, "-m", "fastvlm_mlx",
                        "caption", str(folder), "--out", str(merged), "--model", str(CHECKPOINT),
                        "--max-tokens", "6", "--prompt", QUESTION],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert without_timings(lines(merged)) == without_timings(lines(single))
    assert not [p for p in tmp_path.iterdir() if ".part-" in p.name]  # the parts were merged away
    assert "rank 0/2" in r.stderr and "rank 1/2" in r.stderr
