"""Load on `fastvlm-mlx serve`: N clients, each a conversation of several turns about
its own picture, through the official openai client, streamed.

    python -m fastvlm_mlx.bench.serve_load --random 0.5b --clients 4 --turns 3

Starts the server in this process on 127.0.0.1 (random weights of the published
shapes, the fixture's Qwen2 tokenizer, end of answer ignored so that every answer
has --max-tokens tokens; --max-concurrency as the server's), then prints requests/s and TTFT (time to the first
streamed text) p50/p99, for opening turns (vision + whole prefill) and follow-ups
(features and the conversation's KV reused) apart. Needs the dev extra (openai).
"""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import typer

from fastvlm_mlx.utils import keep_freed_buffers, load_tokenizer

from .harness import DECODERS, random_config, random_model, synthetic_image

FIXTURE_TOKENIZER = Path(__file__).parent.parent / "tests" / "fixtures" / "fastvlm-tiny" / "checkpoint"


def _data_url(seed: int) -> str:
    image = synthetic_image(1200 + 40 * seed, 900)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _conversation(client, seed: int, turns: int, max_tokens: int) -> list[tuple[int, float, float]]:
    """(turn, TTFT seen by the client, the server's own vision + prefill) in s, for
    each turn of one client's conversation."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(seed)}},
                                             {"type": "text", "text": "Describe this picture."}]}]
    times = []
    for turn in range(turns):
        start, first, text, server = time.perf_counter(), None, "", float("nan")
        for chunk in client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece or ""
            if not chunk.choices:
                server = chunk.model_extra["timings"]["ttft_ms"] / 1e3
        times.append((turn, first if first is not None else time.perf_counter() - start, server))
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": f"Tell me more, part {turn + 2}."}]
    return times


def main(
    random: str = typer.Option("0.5b", help=f"Random weights in these published shapes: {', '.join(DECODERS)}."),
    tokenizer: Path = typer.Option(FIXTURE_TOKENIZER, help="A directory with a Qwen2 tokenizer."),
    clients: int = typer.Option(4, min=1, help="Concurrent clients."),
    turns: int = typer.Option(3, min=1, help="Turns in each client's conversation."),
    max_tokens: int = typer.Option(16, min=1, help="Tokens per answer."),
    resolution: int = typer.Option(1024, min=64, help="Input side in pixels."),
    max_concurrency: int = typer.Option(4, min=1, help="The server's --max-concurrency."),
) -> None:
    import openai
    import uvicorn

    from fastvlm_mlx.generation import BatchDecoder
    from fastvlm_mlx.server import Engine, make_app

    keep_freed_buffers()
    model = random_model(random_config(random), mx.float16 if mx.default_device() != mx.cpu else mx.float32)
    words = load_tokenizer(tokenizer)
    engine = Engine(model, words, f"random-{random}", 4 * 2**30, resolution, max_concurrency)
    engine.decoder = BatchDecoder(model, words, set(), max_concurrency)  # every answer max_tokens long
    server = uvicorn.Server(uvicorn.Config(make_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(600):  # bounded: 60 s
        if server.started:
            break
        time.sleep(0.1)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [t for times in pool.map(lambda i: _conversation(client, i, turns, max_tokens), range(clients))
                   for t in times]
    wall = time.perf_counter() - start
    server.should_exit = True
    thread.join(timeout=10)
    print(f"serve load: random {random} weights, {mx.default_device()}, {resolution} px, {clients} clients x "
          f"{turns} turns, {max_tokens} tokens an answer, --max-concurrency {max_concurrency}")
    print(f"{len(results)} requests in {wall:.1f} s: {len(results) / wall:.2f} requests/s")
    print(f"{'':18}{'client TTFT (queueing included)':>34}{'server TTFT (vision + prefill)':>34}")
    print(f"{'':18}{'p50':>17}{'p99':>17}{'p50':>17}{'p99':>17}")
    for name, rows in (("opening turns", [r for r in results if r[0] == 0]),
                       ("follow-up turns", [r for r in results if r[0] > 0])):
        if rows:
            columns = [f(v) for v in ([r[1] for r in rows], [r[2] for r in rows])
                       for f in (lambda v: percentile(v, 50), lambda v: percentile(v, 99))]
            print(f"  {name:16}" + "".join(f"{c * 1e3:14.0f} ms" for c in columns) + f"   ({len(rows)} requests)")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


if __name__ == "__main__":
    typer.run(main)
