"""Ops whose fast form differs by backend, and the one place that chooses between them.

    FASTVLM_MLX_KERNELS=auto|portable|cpu

`portable` is MLX's own ops (mx.conv2d, nn.gelu, mx.fast.scaled_dot_product_attention,
mlx-lm's MLP, activations in the weights' dtype): what Metal and CUDA run. `cpu` is
the hand-written kernels of kernels/cpu.py, for MLX's CPU backend only. `auto`, the
default, takes `cpu` on the CPU backend and `portable` elsewhere. Setting `portable`
on a CPU runs, slowly, exactly the path a Mac runs.

The model calls `kernels.<op>` at each use (compute_dtype, gelu, conv2d,
pointwise_ffn, attention, linear, rms_norm, mlp, attention_inputs, decoder_attention,
quantized_matmul); the choice is made here, per call.
"""

from __future__ import annotations

import os
from types import ModuleType

import mlx.core as mx

from ..errors import FastVLMError
from . import cpu, portable

PATHS = {"portable": portable, "cpu": cpu}


def selected() -> ModuleType:
    """The kernel module FASTVLM_MLX_KERNELS and the default device choose."""
    choice = os.environ.get("FASTVLM_MLX_KERNELS", "auto") or "auto"
    on_cpu = mx.default_device() == mx.cpu
    if choice == "auto":
        return cpu if on_cpu else portable
    if choice not in PATHS:
        raise FastVLMError(f"FASTVLM_MLX_KERNELS must be auto, portable or cpu, got {choice!r}")
    if choice == "cpu" and not on_cpu:
        raise FastVLMError("FASTVLM_MLX_KERNELS=cpu needs MLX's CPU backend; use auto or portable")
    return PATHS[choice]


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(selected(), name)
