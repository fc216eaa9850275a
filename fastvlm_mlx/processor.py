"""Image preprocessing and prompt building, exactly as the reference does them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .defaults import DEFAULT_MAX_PIXELS
from .errors import FastVLMError
from .fastvlm import IMAGE_TOKEN_INDEX
_PIL_LIMIT = threading.Lock()  # guards PIL's process-wide decompression-bomb limit


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file as RGB, upright as its EXIF orientation says.

    Every failure becomes one clear error; an image of more than `max_pixels`
    pixels is refused before it is decoded.
    """
    path = Path(path)
    if path.is_dir():
        raise FastVLMError(f"{path} is a directory, not an image")
    if not path.exists():
        raise FastVLMError(f"image not found: {path}")
    if not path.is_file():
        raise FastVLMError(f"{path} is not a regular file, not an image")
    try:
        return open_image(path, str(path), max_pixels)
    except PermissionError:
        raise FastVLMError(f"cannot read {path}: permission denied") from None


def open_image(source: Path | BinaryIO, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file or an in-memory image as load_image does; `name` is for errors."""
    try:
        with _PIL_LIMIT:
            bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours applies
            try:
                img = Image.open(source)
            finally:
                Image.MAX_IMAGE_PIXELS = bomb_limit
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise FastVLMError(
                    f"{name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                    "--max-pixels raises it (decoding takes 3 bytes a pixel)"
                )
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except UnidentifiedImageError:
        raise FastVLMError(f"not an image: {name} (PIL cannot identify its format)") from None
    except PermissionError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise FastVLMError(f"cannot decode image {name}: {e} (truncated or corrupt file?)") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Images of 16-bit or 32-bit samples are scaled down, not clipped at 255."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255 if values.size and np.nanmax(values) <= 1 else 1  # [0, 1] floats or 8-bit levels
        image = Image.fromarray(np.clip(np.nan_to_num(np.rint(values * scale)), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess(image: Image.Image, resolution: int) -> mx.array:
    """The reference's pad to a centred black square, bicubic resize, scale to [0, 1].

    Returns [1, R, R, 3]. PIL resizes in two passes, horizontal then vertical,
    each rounded to 8 bits; the pass along the padded side runs on the picture's
    rows or columns alone (`_padded_pass`), so the square is never built and
    memory stays near R x R plus the picture, whatever its aspect ratio. The
    result equals PIL's on the padded square bit for bit.
    """
    image = to_rgb(image)
    w, h = image.size
    side, r = max(w, h), resolution
    bicubic = Image.Resampling.BICUBIC
    out = np.zeros((r, r, 3), np.uint8)
    if w == h:
        out[:] = np.asarray(image.resize((r, r), bicubic))
    elif w > h:  # padded rows: the horizontal pass is PIL's on the picture alone
        rows = np.asarray(image.resize((r, h), bicubic))
        first, band = _padded_pass(rows, side, (side - h) // 2, r)
        out[first : first + len(band)] = band
    elif h <= 8 * w:  # padded columns, moderate aspect: PIL on row bands padded to full width
        left, step = (side - w) // 2, max(1, r * r // side)
        rows = np.empty((h, r, 3), np.uint8)
        for y in range(0, h, step):
            strip = Image.new("RGB", (side, min(step, h - y)))
            strip.paste(image.crop((0, y, w, y + strip.height)), (left, 0))
            rows[y : y + strip.height] = np.asarray(strip.resize((r, strip.height), bicubic))
        out[:] = np.asarray(Image.fromarray(rows).resize((r, r), bicubic))
    else:  # very tall: only the few output columns the picture reaches are computed
        first, band = _padded_pass(np.asarray(image).transpose(1, 0, 2), side, (side - w) // 2, r)
        columns = Image.fromarray(np.ascontiguousarray(band.transpose(1, 0, 2)))
        out[:, first : first + len(band)] = np.asarray(columns.resize((len(band), r), bicubic))
    return mx.array(out.astype(np.float32) / 255.0)[None]


_PRECISION_BITS = 22  # PIL's fixed-point coefficients for 8-bit images


def _bicubic_coefficients(size: int, out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's bicubic (a = -0.5) resampling coefficients from `size` to `out` samples,
    computed in the same order of float64 operations: first tap, tap count, and
    the fixed-point weights [out, taps]."""
    scale = size / out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps = np.arange(int(np.ceil(support)) * 2 + 1)
    center = (np.arange(out) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5), size).astype(np.int64) - first
    x = np.abs(((taps[None] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(x < 1.0, ((1.5 * x - 2.5) * x) * x + 1, np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0))
    w = np.where(taps[None] < count[:, None], w, 0.0)
    total = np.zeros(out)
    for t in taps:  # summed in PIL's order, not numpy's pairwise order
        total = total + w[:, t]
    w = w / np.where(total == 0.0, 1.0, total)[:, None]
    fixed = np.trunc(w * (1 << _PRECISION_BITS) + np.where(w < 0, -0.5, 0.5)).astype(np.int32)
    return first, count, fixed


def _padded_pass(lines: np.ndarray, side: int, offset: int, out: int) -> tuple[int, np.ndarray]:
    """PIL's 8-bit bicubic pass along axis 0 of an axis of `side` samples that is
    black but for `lines` at `offset`. Returns the first output sample the lines
    reach and those outputs; all others are 0 (black stays black)."""
    n = len(lines)
    first, count, k = _bicubic_coefficients(side, out)
    reached = np.flatnonzero((first < offset + n) & (first + count > offset))
    lo, hi = reached[0], reached[-1] + 1
    taps = np.arange(k.shape[1])
    src = first[lo:hi, None] + taps[None] - offset
    k = np.where((taps[None] < count[lo:hi, None]) & (src >= 0) & (src < n), k[lo:hi], 0)
    src = np.clip(src, 0, n - 1)
    flat = lines.reshape(n, -1)
    band = np.empty((hi - lo, flat.shape[1]), np.uint8)
    for c in range(0, flat.shape[1], 4096):  # column blocks that stay in cache
        block = flat[:, c : c + 4096].astype(np.int32)
        acc = np.full((hi - lo, block.shape[1]), 1 << (_PRECISION_BITS - 1), np.int32)
        for t in np.flatnonzero(k.any(axis=0)):
            acc += k[:, t, None] * block[src[:, t]]
        band[:, c : c + 4096] = np.clip(acc >> _PRECISION_BITS, 0, 255)
    return int(lo), band.reshape((hi - lo,) + lines.shape[1:])


def check_text(text: str, what: str = "the prompt") -> str:
    """Text that came from argv or stdin can hold bytes that are not UTF-8 (as lone
    surrogates); the tokenizer cannot take them, so say so in one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise FastVLMError(
            f"{what} is not valid UTF-8 (byte 0x{bad.hex()} at character {e.start}); "
            "save or type it as UTF-8"
        ) from None
    return text


def _template(tokenizer, text: str) -> list[int]:
    """Our own template text: its control tokens (<|im_start|>, <|im_end|>) are real."""
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _literal(tokenizer, text: str) -> list[int]:
    """User text is text: a typed <|im_start|> or <image> is tokenized as characters."""
    text = check_text(text)
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []


def first_turn(tokenizer, system: str, question: str, with_image: bool = True) -> list[int]:
    """Ids of the qwen_2 template for the opening user turn, the image slot first.

    The reference tokenizes the text on each side of its <image> marker on its
    own and the control tokens split the rest, so these ids are the reference's
    for any text that does not spell a control token.
    """
    ids = _template(tokenizer, "<|im_start|>") + _literal(tokenizer, f"system\n{system}")
    return ids + _template(tokenizer, "<|im_end|>\n<|im_start|>") + _user(tokenizer, question, with_image)


def next_turn(tokenizer, question: str, with_image: bool = False) -> list[int]:
    """Ids of a follow-up user turn; the previous answer's <|im_end|> is already in the history."""
    return _template(tokenizer, "\n<|im_start|>") + _user(tokenizer, question, with_image)


def _user(tokenizer, question: str, with_image: bool) -> list[int]:
    """The user's turn after its <|im_start|>, the image slot first, through the
    assistant's opening."""
    if with_image:
        ids = _literal(tokenizer, "user\n") + [IMAGE_TOKEN_INDEX] + _literal(tokenizer, f"\n{question}")
    else:
        ids = _literal(tokenizer, f"user\n{question}")
    return ids + _template(tokenizer, "<|im_end|>\n<|im_start|>assistant\n")


def assistant_turn(tokenizer, answer: str) -> list[int]:
    """Ids of an answer given back in the history, as text (its <|im_end|> follows)."""
    return _literal(tokenizer, answer)
