"""Image preprocessing and prompt building, exactly as the reference does them."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import FastVLMError
from .fastvlm import IMAGE_TOKEN_INDEX

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_MARKER = "<image>"


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, turning every failure into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FastVLMError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise FastVLMError(f"not an image: {path} (PIL cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise FastVLMError(f"cannot decode image {path}: {e} (truncated or corrupt file?)") from None


def preprocess(image: Image.Image, resolution: int) -> mx.array:
    """Pad to a centred black square, bicubic-resize, scale to [0, 1]: [1, R, R, 3]."""
    w, h = image.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (0, 0, 0))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    square = square.resize((resolution, resolution), Image.Resampling.BICUBIC)
    pixels = np.asarray(square, dtype=np.float32) / 255.0
    return mx.array(pixels)[None]


def first_turn(system: str, question: str, with_image: bool = True) -> str:
    """The qwen_2 template for the opening user turn, image marker first."""
    image = IMAGE_MARKER + "\n" if with_image else ""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def next_turn(question: str) -> str:
    """A follow-up user turn; the previous answer's <|im_end|> is already in the history."""
    return f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def tokenize(tokenizer, text: str) -> list[int]:
    """Tokenize each chunk around <image> on its own; the slot becomes IMAGE_TOKEN_INDEX."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_MARKER)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
    return ids
