"""Images/s of `caption` by batch size, on random weights of the published shapes.

    python -m fastvlm_mlx.bench.caption_speed --random 0.5b --resolutions 512,1024 --batches 1,4,8

Each cell captions the same --images synthetic pictures (greedy, end of answer
ignored, so every caption has --max-tokens tokens) after one warm-up batch, and
splits the time into the tower and the rest (prefill and decode).
"""

from __future__ import annotations

import time

import mlx.core as mx
import typer

from fastvlm_mlx.caption import Settings, caption_batch
from fastvlm_mlx.generation import BatchDecoder
from fastvlm_mlx.utils import keep_freed_buffers, load_tokenizer

from .harness import DECODERS, random_config, random_model, synthetic_image
from .serve_load import FIXTURE_TOKENIZER


def main(
    random: str = typer.Option("0.5b", help=f"Random weights in these published shapes: {', '.join(DECODERS)}."),
    resolutions: str = typer.Option("512,1024", help="Comma-separated input sides."),
    batches: str = typer.Option("1,4,8", help="Comma-separated batch sizes."),
    images: int = typer.Option(8, min=1, help="Images per cell."),
    max_tokens: int = typer.Option(32, min=1, help="Tokens per caption."),
) -> None:
    keep_freed_buffers()
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    model = random_model(random_config(random), dtype)
    tokenizer = load_tokenizer(FIXTURE_TOKENIZER)
    pictures = [synthetic_image(1200 + 16 * i, 900) for i in range(images)]
    print(f"caption speed: random {random} weights, {mx.default_device()}, {dtype}, {images} images a cell, "
          f"{max_tokens} tokens a caption")
    print(f"{'px':>6}{'batch':>7}{'images/s':>10}{'tower s':>10}{'rest s':>9}")
    for side in (int(r) for r in resolutions.split(",")):
        for batch in (int(b) for b in batches.split(",")):
            settings = Settings("Describe the image.", max_tokens, side, batch)
            decoder = BatchDecoder(model, tokenizer, set(), batch)
            caption_batch(model, tokenizer, decoder, pictures[:batch], settings)  # warm-up
            start, tower = time.perf_counter(), 0.0
            for i in range(0, images, batch):
                records = caption_batch(model, tokenizer, decoder, pictures[i:i + batch], settings)
                tower += sum(r["timings"]["vision_ms"] for r in records) / 1e3
            took = time.perf_counter() - start
            print(f"{side:>6}{batch:>7}{images / took:>10.3f}{tower:>10.1f}{took - tower:>9.1f}")


if __name__ == "__main__":
    typer.run(main)
