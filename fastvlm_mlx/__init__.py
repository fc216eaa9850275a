"""FastVLM on MLX: `from fastvlm_mlx import load, generate, stream_generate`."""

from .errors import FastVLMError
from .generate import Chat, GenerationResponse, Stats, generate, stream_generate
from .utils import load

__all__ = ["Chat", "FastVLMError", "GenerationResponse", "Stats", "generate", "load", "stream_generate"]
