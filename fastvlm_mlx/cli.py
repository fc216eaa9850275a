"""The `fastvlm-mlx` command line.

Only typer is imported up front: each command imports the model stack itself,
so `--help` and `--version` answer at once.
"""

from __future__ import annotations

import contextlib
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import typer

try:  # typer vendors click since 0.2x; older releases use click itself
    from typer._click import exceptions as click_exceptions
except ImportError:
    from click import exceptions as click_exceptions

from .bench.cli import bench
from .defaults import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DEFAULT_SYSTEM
from .errors import FastVLMError, exit_codes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Apple's FastVLM vision-language models, natively on MLX.")

HELP_LINE = "/image PATH changes the picture, /reset clears the history, Ctrl-C stops an answer, Ctrl-D exits."
MODEL_HELP = "A hub id (e.g. apple/FastVLM-1.5B, mlx-community/FastVLM-0.5B-4bit) or a model directory, in any published layout or ours."


def _version(value: bool) -> None:
    if value:
        print(f"fastvlm-mlx {version('fastvlm-mlx')}")
        raise typer.Exit()


@app.callback()
def _group(
    show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit."),
) -> None:
    """Apple's FastVLM vision-language models, natively on MLX."""


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _dim(text: str) -> str:
    return f"\033[2m{text}\033[0m" if sys.stderr.isatty() else text


def _answer(chat, question: str, max_tokens: int, temperature: float, top_p: float) -> None:
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


def _command(chat, line: str) -> None:
    """One interactive line that starts with '/'."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name == "/reset":
        if arg:
            raise FastVLMError("/reset takes no argument")
        chat.reset()
        print(_dim("(history cleared)"), file=sys.stderr)
    elif name == "/image":
        if not arg:
            raise FastVLMError("/image needs a path: /image PATH")
        chat.set_image(arg)
        print(_dim(f"(new image, {chat.visual_tokens} visual tokens; history cleared)"), file=sys.stderr)
    else:
        raise FastVLMError(f"unknown command {name}; {HELP_LINE}")


def _interactive(chat, max_tokens: int, temperature: float, top_p: float) -> None:
    # Bytes that are not UTF-8 reach Chat as lone surrogates, which it refuses in one line.
    sys.stdin.reconfigure(errors="surrogateescape")
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
            if line.startswith("/"):
                _command(chat, line)
            else:
                _answer(chat, line, max_tokens, temperature, top_p)
        except KeyboardInterrupt:
            print(_dim("\n(answer stopped)"), file=sys.stderr)
        except FastVLMError as e:
            _err(str(e))


@app.command(help=f"""Ask about a picture: one-shot with --prompt, otherwise an interactive chat.

In the interactive chat: {HELP_LINE}""")
def chat(
    image: Path = typer.Argument(..., help="The picture to ask about."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this once and exit; without it, chat interactively."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    max_tokens: int = typer.Option(256, min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling; 1 disables it."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    resolution: Optional[int] = typer.Option(None, help="Input side in pixels, a positive multiple of 64 (default: the model's)."),
    system: str = typer.Option(DEFAULT_SYSTEM, help="The system prompt."),
    fastv: Optional[str] = typer.Option(None, help="FastV pruning K:R: drop the fraction R of visual tokens at layer K (e.g. 2:0.5)."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, min=1, help="Refuse larger images before decoding them."),
    dtype: Optional[str] = typer.Option(None, help="float32, float16 or bfloat16 weights (default: float32 on CPU, the checkpoint's own elsewhere)."),
) -> None:
    with exit_codes():
        import mlx.core as mx

        from .generation import Chat
        from .processor import check_text, load_image
        from .utils import load, parse_dtype, reference_blas_warning

        if prompt is not None:
            check_text(prompt)
        check_text(system, "the system prompt")
        if resolution is not None and resolution <= 0:
            raise FastVLMError(f"--resolution must be a positive multiple of 64, got {resolution}")
        weights_dtype = parse_dtype(dtype)
        picture = load_image(image, max_pixels)  # fail on a bad image before loading a model
        vlm, tokenizer = load(model, weights_dtype)
        if warning := reference_blas_warning():
            print(_dim(f"warning: {warning}"), file=sys.stderr)
        if seed is not None:
            mx.random.seed(seed)
        session = Chat(vlm, tokenizer, system=system, resolution=resolution, fastv=fastv,
                       max_pixels=max_pixels)
        session.set_image(picture)
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
    group_size: Optional[int] = typer.Option(None, help="Quantization group size: 32, 64 (default) or 128."),
    force: bool = typer.Option(False, "--force", help="Replace an --out that an earlier convert wrote."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Load the result and check one forward pass."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
) -> None:
    """Convert a published FastVLM checkpoint (safetensors or PyTorch .bin) to MLX."""
    with exit_codes():
        from .convert import convert as run_convert

        path = run_convert(source, out, dtype=dtype, quantize=quantize, group_size=group_size,
                           force=force, verify_output=verify, revision=revision)
    print(f"Converted {source} -> {path}")


app.command()(bench)


@app.command()
def caption(
    inputs: list[str] = typer.Argument(..., help="Image directories (recursive), globs, or text files listing image paths."),
    out: Path = typer.Option(..., "--out", "-o", help="JSON lines, one an image; appended to, images already in it skipped."),
    prompt: str = typer.Option(DEFAULT_CAPTION_PROMPT, "--prompt", "-p", help="What to ask about each image."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    max_tokens: int = typer.Option(128, min=1, help="Most tokens per caption."),
    resolution: Optional[int] = typer.Option(None, help="Input side in pixels, a positive multiple of 64 (default: the model's)."),
    batch: int = typer.Option(4, min=1, help="Images through the tower in one pass, and answers decoded together."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, min=1, help="Images larger than this are failures, not decoded."),
    dtype: Optional[str] = typer.Option(None, help="float32, float16 or bfloat16 weights (default: float32 on CPU, the checkpoint's own elsewhere)."),
) -> None:
    """Caption many images into JSON lines: greedy, batched, resumable; under mlx.launch, sharded by rank."""
    with exit_codes():
        import time

        from .caption import Settings, caption_all, collect
        from .processor import check_text
        from .utils import load, parse_dtype

        check_text(prompt)
        if out.is_dir():
            raise FastVLMError(f"--out {out} is a directory; give a file name such as captions.jsonl")
        if not out.parent.is_dir():
            raise FastVLMError(f"--out: the directory {out.parent} does not exist")
        paths = collect(inputs)
        if not paths:
            raise FastVLMError("no images found in " + ", ".join(inputs))
        vlm, tokenizer = load(model, parse_dtype(dtype))
        vision = vlm.args.vision_config
        side = vision.image_size if resolution is None else resolution
        vision.check_resolution(side)
        start = time.perf_counter()
        counts = caption_all(vlm, tokenizer, paths, out, Settings(prompt, max_tokens, side, batch, max_pixels))
        took = time.perf_counter() - start
        rate = (counts["done"] + counts["failed"]) / took if took > 0 else 0.0
        print(f"caption: {counts['done']} done, {counts['skipped']} skipped (already in {out.name}), "
              f"{counts['failed']} failed, {took:.1f} s, {rate:.2f} images/s", file=sys.stderr)


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise FastVLMError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


@app.command()
def serve(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8080, min=1, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, help="Require Authorization: Bearer KEY on /v1/ requests."),
    allow_local_images: Optional[Path] = typer.Option(None, help="Let requests name image files under this directory."),
    cache_mb: int = typer.Option(2048, min=1, help="Memory for image features and the KV of recent conversations, in MB."),
    max_concurrency: int = typer.Option(4, min=1, help="Requests decoded together; later ones wait their turn."),
    resolution: Optional[int] = typer.Option(None, help="Input side in pixels, a positive multiple of 64 (default: the model's)."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, min=1, help="Refuse larger images before decoding them."),
    dtype: Optional[str] = typer.Option(None, help="float32, float16 or bfloat16 weights (default: float32 on CPU, the checkpoint's own elsewhere)."),
) -> None:
    """Serve the OpenAI chat completions API (POST /v1/chat/completions, GET /v1/models, GET /health)."""
    with exit_codes():
        try:
            import uvicorn

            from .server import Engine, make_app
        except ImportError as e:
            raise FastVLMError(f"serve needs the serve extra: pip install 'fastvlm-mlx[serve]' ({e.name} is missing)") from None
        from .utils import load, parse_dtype

        if allow_local_images is not None and not allow_local_images.is_dir():
            raise FastVLMError(f"--allow-local-images: {allow_local_images} is not a directory")
        _check_port(host, port)  # before minutes of loading
        vlm, tokenizer = load(model, parse_dtype(dtype))
        engine = Engine(vlm, tokenizer, model, cache_mb * 2**20, resolution, max_concurrency)
        app_ = make_app(engine, api_key, allow_local_images, max_pixels)
        print(f"Serving {model} on http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr)
        uvicorn.run(app_, host=host, port=port, log_level="warning")


def main() -> None:
    """The console script: usage errors are one `error:` line and exit 2, like every other."""
    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as e:
        print(e.ctx.get_help())
        code = 2
    except click_exceptions.ClickException as e:  # usage errors: bad option, missing argument
        _err(" ".join(e.format_message().split()))
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print(file=sys.stderr)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
