"""The `fastvlm-mlx` command line."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import typer

from .bench.cli import bench
from .errors import FastVLMError, exit_codes
from .generate import Chat
from .processor import DEFAULT_SYSTEM, load_image
from .utils import DEFAULT_MODEL, keep_freed_buffers, load

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Apple's FastVLM vision-language models, natively on MLX.")

HELP_LINE = "/image PATH changes the picture, /reset clears the history, Ctrl-C stops an answer, Ctrl-D exits."


@app.callback()
def _group() -> None:
    """Apple's FastVLM vision-language models, natively on MLX."""


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _dim(text: str) -> str:
    return f"\033[2m{text}\033[0m" if sys.stderr.isatty() else text


def _answer(chat: Chat, question: str, max_tokens: int, temperature: float, top_p: float) -> None:
    """Stream one answer to stdout, then the timing footer to stderr."""
    stream = chat.ask(question, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    stats = None
    with contextlib.closing(stream):
        for response in stream:
            print(response.text, end="", flush=True)
            stats = response.stats
    print(flush=True)
    if stats is not None:
        print(_dim(stats.footer()), file=sys.stderr, flush=True)


def _interactive(chat: Chat, max_tokens: int, temperature: float, top_p: float) -> None:
    tty = sys.stdin.isatty()
    print(_dim(HELP_LINE), file=sys.stderr)
    while True:
        try:
            line = input(">>> " if tty else "").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not line:
            continue
        try:
            if line == "/reset":
                chat.reset()
                print(_dim("(history cleared)"), file=sys.stderr)
            elif line.split()[0] == "/image":
                chat.set_image(line[len("/image"):].strip())
                print(_dim(f"(new image, {chat.visual_tokens} visual tokens; history cleared)"),
                      file=sys.stderr)
            elif line.startswith("/"):
                _err(f"unknown command {line.split()[0]}; {HELP_LINE}")
            else:
                _answer(chat, line, max_tokens, temperature, top_p)
        except KeyboardInterrupt:
            print(_dim("\n(answer stopped)"), file=sys.stderr)
        except FastVLMError as e:
            _err(str(e))


@app.command()
def chat(
    image: Path = typer.Argument(..., help="The picture to ask about."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this once and exit; without it, chat interactively."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model directory (MLX or published HF layout)."),
    max_tokens: int = typer.Option(256, min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling; 1 disables it."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    resolution: Optional[int] = typer.Option(None, help="Input side in pixels, a multiple of 64 (default: the model's)."),
    system: str = typer.Option(DEFAULT_SYSTEM, help="The system prompt."),
    fastv: Optional[str] = typer.Option(None, help="FastV pruning K:R: drop the fraction R of visual tokens at layer K (e.g. 2:0.5)."),
) -> None:
    """Ask about a picture: one-shot with --prompt, otherwise an interactive chat."""
    with exit_codes():
        picture = load_image(image)  # fail on a bad image before loading a model
        vlm, tokenizer = load(model)
        if seed is not None:
            mx.random.seed(seed)
        session = Chat(vlm, tokenizer, picture, system=system, resolution=resolution, fastv=fastv)
        if prompt is None:
            _interactive(session, max_tokens, temperature, top_p)
        else:
            _answer(session, prompt, max_tokens, temperature, top_p)


@app.command()
def convert(
    source: str = typer.Argument(..., help="A checkpoint directory or a hub id such as apple/FastVLM-0.5B."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: ./<name>-mlx)."),
    dtype: Optional[str] = typer.Option(None, help="float16, bfloat16 or float32 (default: the checkpoint's own, lossless)."),
    quantize: Optional[int] = typer.Option(None, "--quantize", "-q", help="Quantize the decoder to 4 or 8 bits."),
    group_size: int = typer.Option(64, help="Quantization group size."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Load the result and check one forward pass."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
) -> None:
    """Convert a published FastVLM checkpoint (safetensors or PyTorch .bin) to MLX."""
    from fastvlm_mlx.convert import convert as run_convert

    with exit_codes():
        path = run_convert(source, out, dtype=dtype, quantize=quantize, group_size=group_size,
                           force=force, verify_output=verify, revision=revision)
    print(f"Converted {source} -> {path}")


app.command()(bench)


def main() -> None:
    keep_freed_buffers()
    app()
