"""The kernels as MLX's own ops: what Metal and CUDA run."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import activations

swiglu = activations.swiglu  # silu(gate) * up for the decoder's MLP, exactly as mlx-lm computes it


def compute_dtype(weights: mx.Dtype) -> mx.Dtype:
    """Activations in the weights' own dtype (bfloat16 for the published checkpoints)."""
    return weights


def gelu(x: mx.array) -> mx.array:
    """GELU in its exact (erf) form, as the reference uses everywhere in the tower."""
    return nn.gelu(x)


def depthwise_conv(x: mx.array, weight: mx.array, bias: mx.array, stride: int) -> mx.array:
    """A conv with one input channel per group (out = m * in), "same" padding."""
    k = weight.shape[1]
    return mx.conv2d(x, weight, stride, k // 2, groups=x.shape[-1]) + bias


def pointwise_ffn(x: mx.array, fc1: nn.Module, fc2: nn.Module) -> mx.array:
    """fc2(GELU(fc1(x))) for 1x1 convs."""
    return fc2(gelu(fc1(x)))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v over [B, heads, N, d]."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
