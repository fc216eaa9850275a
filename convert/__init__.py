"""Checkpoint readers, key mapping and quantization: `fastvlm-mlx convert`."""

from .convert import cached_conversion, convert

__all__ = ["cached_conversion", "convert"]
