"""Checkpoint readers, key mapping and quantization: `fastvlm-mlx convert`."""

from .convert import convert

__all__ = ["convert"]
