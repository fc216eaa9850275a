"""FastVLM on MLX: `from fastvlm_mlx import load, generate, stream_generate`."""

from .errors import FastVLMError

__all__ = ["Chat", "FastVLMError", "GenerationResponse", "Stats", "generate", "load", "stream_generate"]


def __getattr__(name: str):
    """The model stack is imported on first use, so the CLI's --help need not load MLX."""
    if name in ("Chat", "GenerationResponse", "Stats", "generate", "stream_generate"):
        from . import generation as module
    elif name == "load":
        from . import utils as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)
