"""`fastvlm-mlx caption`: describe many images, batched, resumable, across machines.

Images are read in sorted order; each batch goes through the vision tower in one
forward pass, then its answers are decoded together (generation.BatchDecoder,
the batched path `serve` uses). Every result is one JSON line appended to --out
with a single write, so a killed run loses only the batch in flight. Under
`mlx.launch` each rank takes paths[rank::size] into a part file beside --out and
rank 0 merges the parts into --out, in input order, once all ranks are done.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from PIL import Image

from .defaults import DEFAULT_MAX_PIXELS, DEFAULT_SYSTEM
from .errors import FastVLMError
from .fastvlm import Model
from .generation import BatchDecoder, Stats, check_finite, make_answer_sampler, stop_ids
from .processor import first_turn, load_image, preprocess
from .prompt_cache import PromptCache, positions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
LIST_SUFFIXES = {".txt", ".lst"}


def collect(inputs: list[str]) -> list[str]:
    """Image paths from directories (recursive, by extension), globs and text files
    listing paths (one a line, relative to the list's directory), sorted, once each."""
    found: set[str] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.update(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            lines = _read_text(path).splitlines()
            found.update(str(path.parent / line.strip()) for line in lines
                         if line.strip() and not line.lstrip().startswith("#"))
        elif path.is_file():
            found.add(item)
        elif any(c in item for c in "*?["):
            found.update(p for p in glob.glob(item, recursive=True)
                         if Path(p).suffix.lower() in IMAGE_SUFFIXES and Path(p).is_file())
        else:
            raise FastVLMError(f"input not found: {item}")
    return sorted(found)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FastVLMError(f"cannot read the list {path}: {e}") from None


def read_done(out: Path) -> dict[str, str]:
    """The lines already in `out`, by path. A torn last line (a run killed mid-write)
    is cut off the file; any other line that is not ours is refused."""
    if not out.exists():
        return {}
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(out, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done = {}
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            done[record["path"]] = line
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FastVLMError(f"{out} line {n} is not a caption line; refusing to append to it") from None
    return done


def append_line(fd: int, record: dict) -> None:
    """One whole line in one write to a file opened O_APPEND."""
    os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())


@dataclass
class Settings:
    prompt: str
    max_tokens: int
    resolution: int
    batch: int
    max_pixels: int = DEFAULT_MAX_PIXELS


def _loader(paths: list[str], max_pixels: int, out: queue.Queue, stop: threading.Event) -> None:
    """Decode images ahead of the model (PIL only: no MLX in this thread)."""
    for path in paths:
        if stop.is_set():
            break
        try:
            out.put((path, load_image(path, max_pixels)))
        except Exception as e:  # the image fails, the run goes on
            out.put((path, e if isinstance(e, FastVLMError) else f"cannot read {path}: {e}"))
    out.put(None)


def caption_batch(model: Model, tokenizer, decoder: BatchDecoder, images: list[Image.Image],
                  settings: Settings) -> list[dict]:
    """Captions of a few images: one tower pass for all, then their answers decoded together."""
    start = time.perf_counter()
    pixels = mx.concatenate([preprocess(image, settings.resolution) for image in images])
    features = model.encode_image(pixels)
    mx.eval(features)
    check_finite(features, "the vision tower's image features")
    vision_s = (time.perf_counter() - start) / len(images)
    prompt = first_turn(tokenizer, DEFAULT_SYSTEM, settings.prompt)
    sampler = make_answer_sampler(tokenizer, model, 0.0, 1.0)
    order, answers = {}, {}
    for i in range(len(images)):
        stats = Stats(visual_tokens=features.shape[1], vision_s=vision_s)
        uid = decoder.add(PromptCache(model, features.shape[1]), prompt, features[i:i + 1], sampler,
                          settings.max_tokens, stats)
        order[uid], answers[uid] = i, []
    while decoder.sequences:
        for uid, response in decoder.step():
            answers[uid].append(response)
    results = [None] * len(images)
    for uid, responses in answers.items():
        stats = responses[-1].stats
        tokens = [r.token for r in responses if r.token not in decoder.stop_ids]
        results[order[uid]] = {
            "text": "".join(r.text for r in responses), "tokens": len(tokens),
            "finish_reason": responses[-1].finish_reason,
            "timings": {"vision_ms": round(stats.vision_s * 1e3, 1), "prefill_ms": round(stats.prefill_s * 1e3, 1),
                        "decode_ms": round(stats.decode_s * 1e3, 1)}}
    return results


def run(model: Model, tokenizer, todo: list[str], out: Path, settings: Settings, progress) -> dict:
    """Caption `todo` into `out`, a line each; counts of done and failed."""
    counts = {"done": 0, "failed": 0}
    decoder = BatchDecoder(model, tokenizer, stop_ids(tokenizer), settings.batch)
    loaded: queue.Queue = queue.Queue(maxsize=2 * settings.batch)
    stop = threading.Event()
    threading.Thread(target=_loader, args=(todo, settings.max_pixels, loaded, stop), daemon=True).start()
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        finished = False
        while not finished:
            batch: list[tuple[str, Image.Image | FastVLMError | str]] = []
            while len(batch) < settings.batch:
                item = loaded.get()
                if item is None:
                    finished = True
                    break
                batch.append(item)
            images = [(p, x) for p, x in batch if isinstance(x, Image.Image)]
            results = dict(zip([p for p, _ in images],
                               caption_batch(model, tokenizer, decoder, [x for _, x in images], settings)
                               if images else []))
            for path, item in batch:
                if path in results:
                    append_line(fd, {"path": path, **results[path]})
                    counts["done"] += 1
                else:
                    append_line(fd, {"path": path, "error": str(item)})
                    counts["failed"] += 1
            if batch:
                progress(counts)
    finally:
        stop.set()
        os.close(fd)
    return counts


def part_file(out: Path, rank: int, size: int) -> Path:
    return out.with_name(f".{out.name}.part-{rank}-of-{size}")


def merge(out: Path, paths: list[str], size: int) -> None:
    """Rank 0's last step: --out and every part file into --out, in input order, each
    path once; written beside it and renamed, then the parts removed."""
    lines = read_done(out)
    parts = [part_file(out, rank, size) for rank in range(size)]
    for part in parts:
        for path, line in read_done(part).items():
            lines.setdefault(path, line)
    index = {p: i for i, p in enumerate(paths)}
    ordered = sorted(lines, key=lambda p: (index.get(p, len(index)), p))
    tmp = out.with_name(f".{out.name}.merging")
    tmp.write_text("".join(lines[p] + "\n" for p in ordered), encoding="utf-8")
    os.replace(tmp, out)
    for part in parts:
        part.unlink(missing_ok=True)


def caption_all(model: Model, tokenizer, paths: list[str], out: Path, settings: Settings) -> dict:
    """One process, or one rank of `mlx.launch`: shard `paths` (collect's), skip what is
    done, caption, wait for the other ranks, merge. Counts of done, skipped and failed."""
    vision, context = model.args.vision_config, model.args.context_length
    visual = (settings.resolution // vision.stride) ** 2
    length = positions(first_turn(tokenizer, DEFAULT_SYSTEM, settings.prompt), visual)
    if length >= context:
        raise FastVLMError(f"the prompt and the image take {length} tokens but the model's context is {context}")
    settings.max_tokens = min(settings.max_tokens, context - length)
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    target = out if size == 1 else part_file(out, rank, size)
    mine = paths[rank::size]
    done = read_done(out) | (read_done(target) if size > 1 else {})
    todo = [p for p in mine if p not in done]
    progress = Progress(len(todo), "caption" if size == 1 else f"caption (rank {rank}/{size})")
    try:
        counts = run(model, tokenizer, todo, target, settings, progress)
    finally:
        progress.close()
    counts["skipped"] = len(mine) - len(todo)
    if size > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # every rank is done
        if rank == 0:
            merge(out, paths, size)
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # the merge is written
    return counts


class Progress:
    """Images/s, ETA and failures on stderr: a rich bar on a terminal, else a plain line
    every `every` seconds and at the end."""

    def __init__(self, total: int, label: str = "caption", every: float = 10.0):
        self.total, self.label, self.every = total, label, every
        self.start = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                           TextColumn("{task.fields[failed]}"), TimeRemainingColumn(),
                           console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task(label, total=total, rate="", failed="")
            self.bar.start()

    def __call__(self, counts: dict) -> None:
        n = counts["done"] + counts["failed"]
        now = time.perf_counter()
        rate = n / (now - self.start) if now > self.start else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=n, rate=f"{rate:.2f} images/s",
                            failed=f"{counts['failed']} failed" if counts["failed"] else "")
        elif now - self.last >= self.every or n == self.total:
            self.last = now
            eta = f", ETA {(self.total - n) / rate:.0f} s" if rate and n < self.total else ""
            print(f"{self.label}: {n}/{self.total}, {counts['failed']} failed, {rate:.2f} images/s{eta}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
