"""The kernels as MLX's own ops: what Metal and CUDA run."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import activations
from mlx_lm.models.base import scaled_dot_product_attention

swiglu = activations.swiglu  # silu(gate) * up for the decoder's MLP, exactly as mlx-lm computes it


def compute_dtype(weights: mx.Dtype) -> mx.Dtype:
    """Activations in the weights' own dtype (bfloat16 for the published checkpoints)."""
    return weights


def gelu(x: mx.array) -> mx.array:
    """GELU in its exact (erf) form, as the reference uses everywhere in the tower."""
    return nn.gelu(x)


def conv2d(x: mx.array, weight: mx.array, bias: mx.array, stride: int, groups: int) -> mx.array:
    """A conv with bias and "same" padding over NHWC, weights [O, k, k, I/groups]."""
    if weight.shape[1] == 1 and groups == 1 and stride == 1:
        return pointwise(x, weight, bias)
    return mx.conv2d(x, weight, stride, weight.shape[1] // 2, groups=groups) + bias


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weight.T + bias, as nn.Linear computes it."""
    return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """The decoder's RMSNorm, as nn.RMSNorm computes it."""
    return mx.fast.rms_norm(x, weight, eps)


def mlp(x: mx.array, layer: nn.Module) -> mx.array:
    """The decoder's MLP, down(silu(gate(x)) * up(x)), as mlx-lm computes it."""
    return layer.down_proj(swiglu(layer.gate_proj(x), layer.up_proj(x)))


def pointwise(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """A 1x1 conv as one matmul over all pixels (on the CPU backend mx.conv2d's 1x1
    path is 1.2-1.7x slower than the same product through BLAS); without `bias`
    for a consumer that adds it in a kernel of its own."""
    w = weight.reshape(weight.shape[0], -1).T
    pixels = x.reshape(-1, x.shape[-1])
    y = pixels @ w if bias is None else mx.addmm(bias, pixels, w)
    return y.reshape(*x.shape[:-1], w.shape[1])


def pointwise_ffn(x: mx.array, fc1: nn.Module, fc2: nn.Module) -> mx.array:
    """fc2(GELU(fc1(x))) for 1x1 convs."""
    return fc2(gelu(fc1(x)))


def quantized_matmul(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array,
                     group_size: int, bits: int) -> mx.array:
    """x @ W.T for W stored in MLX's affine quantization (what nn.QuantizedLinear computes)."""
    return mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=group_size, bits=bits)


def attention_inputs(x: mx.array, attn: nn.Module, offset) -> tuple[mx.array, mx.array, mx.array]:
    """q, k, v [B, heads, L, d] of the decoder's attention over x [B, L, hidden], q and k
    rotated for positions offset, offset + 1, ..., as mlx-lm's Qwen2 computes them."""
    b, length, _ = x.shape
    q, k, v = (proj(x).reshape(b, length, heads, -1).transpose(0, 2, 1, 3) for proj, heads in
               ((attn.q_proj, attn.n_heads), (attn.k_proj, attn.n_kv_heads), (attn.v_proj, attn.n_kv_heads)))
    return attn.rope(q, offset=offset), attn.rope(k, offset=offset), v


def decoder_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask, cache) -> mx.array:
    """The decoder's attention, as mlx-lm's Qwen2 computes it (quantized KV caches included)."""
    return scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v over [B, heads, N, d]."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
