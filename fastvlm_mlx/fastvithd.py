"""FastViTHD, the hybrid conv/attention vision encoder of FastVLM, in NHWC.

Every convolution is the reparameterized (inference) form stored in the
checkpoints: one conv with bias. The module names match the reference so the
weight mapping is mostly a prefix change (see fastvlm.LAYOUTS).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .errors import FastVLMError


@dataclass
class VisionConfig:
    """Shape of the tower; the defaults are the published FastViTHD (mobileclip_l)."""

    layers: list[int] = field(default_factory=lambda: [2, 12, 24, 4, 2])
    embed_dims: list[int] = field(default_factory=lambda: [96, 192, 384, 768, 1536])
    mlp_ratios: list[float] = field(default_factory=lambda: [4, 4, 4, 4, 4])
    downsamples: list[bool] = field(default_factory=lambda: [True] * 5)
    token_mixers: list[str] = field(
        default_factory=lambda: ["repmixer"] * 3 + ["attention"] * 2
    )
    pos_embs_shapes: list = field(
        default_factory=lambda: [None, None, None, [7, 7], [7, 7]]
    )
    cls_ratio: float = 2.0
    repmixer_kernel_size: int = 3
    down_patch_size: int = 7
    down_stride: int = 2
    head_dim: int = 32
    image_size: int = 1024

    def check(self) -> None:
        """Refuse, in one line, a tower these lists cannot build."""
        stages = len(self.layers)
        lists = (self.embed_dims, self.mlp_ratios, self.downsamples, self.token_mixers, self.pos_embs_shapes)
        if not stages or any(len(v) != stages for v in lists):
            raise FastVLMError("vision_config: layers, embed_dims, mlp_ratios, downsamples, "
                               "token_mixers and pos_embs_shapes need one entry per stage")
        for mixer, dims in zip(self.token_mixers, self.embed_dims):
            if mixer not in ("repmixer", "attention"):
                raise FastVLMError(f"vision_config: unknown token mixer {mixer!r}")
            if mixer == "attention" and dims % self.head_dim:
                raise FastVLMError(f"vision_config: {dims} channels do not split into heads of {self.head_dim}")

    @property
    def hidden_size(self) -> int:
        """Channels of the image embedding (3072 for the published tower)."""
        return int(self.embed_dims[-1] * self.cls_ratio)

    def check_resolution(self, resolution: int) -> None:
        """The tower takes square inputs whose side is a positive multiple of its stride."""
        if resolution <= 0 or resolution % self.stride:
            raise FastVLMError(f"resolution must be a positive multiple of {self.stride}, got {resolution}")

    @property
    def stride(self) -> int:
        """Input pixels per output token along a side: stem 4x, then one 2x per downsample."""
        downs = sum(
            1
            for i in range(len(self.layers) - 1)
            if self.downsamples[i] or self.embed_dims[i] != self.embed_dims[i + 1]
        )
        return 4 * self.down_stride**downs


# Exact GELU needs erf, which the CPU backend evaluates one element at a time
# (166 ms for 6.3 M values). Here it is Eigen's and XLA's float32 rational erf
# (within 2e-6 of it), pure arithmetic in two compiled kernels. MLX builds each
# with g++ -O3, which vectorizes the loop only if no op in it branches (mx.clip,
# minimum and maximum test for NaN) and fuses at most 11 ops deep; the clip is
# written with abs and the polynomials in Estrin's form to meet both
# (12.6 M values: 61 ms as one kernel with mx.clip, 15 ms as these two).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)  # erf(z) = z P(z^2) / Q(z^2) on |z| <= 4
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)
_CLIP = 4 * 2**0.5  # |x| past which erf(x / sqrt 2) is 1 in float32
# With w = 2 min(|x|, _CLIP): z^2 = w^2 / 8 and 0.5 x erf(z) = |x| w P(w^2) / Q(w^2)
# for these P and Q, highest power first.
_P = [c * 0.125 ** (len(_ERF_P) - 1 - i) * 0.25 * 0.5**0.5 for i, c in enumerate(_ERF_P)]
_Q = [c * 0.125 ** (len(_ERF_Q) - 1 - i) for i, c in enumerate(_ERF_Q)]


def gelu(x: mx.array) -> mx.array:
    """GELU in its exact (erf) form, as the reference uses everywhere in the tower."""
    if mx.default_device() != mx.cpu:
        return nn.gelu(x)
    return joined(in_bands(lambda a, b: _gelu_rational(x[:, a:b], 0.0), x.shape[1]))


def _gelu_rational(x: mx.array, bias: mx.array | float) -> mx.array:
    """GELU(x + bias) = 0.5 x + |x| w P(t) / Q(t), w = 2 min(|x|, clip), t = w^2; x finite.

    Each kernel adds the bias itself, which costs less than writing x + bias out.
    w stays alive until the second kernel is done: MLX would otherwise write that
    kernel's output over w, and with a broadcast bias an in-place loop is not
    vectorized.
    """
    w = _clip_twice(x, bias)
    return mx.depends(_gelu_erf_part(x, bias, w), w)


@mx.compile
def _clip_twice(x: mx.array, bias: mx.array | float) -> mx.array:
    """2 min(|x + bias|, clip), as 2 clip - 2 max(d, 0) with max(d, 0) = (d + |d|) / 2: exact."""
    d = _CLIP - mx.abs(x + bias)
    return 2 * _CLIP - (d + mx.abs(d))


@mx.compile
def _gelu_erf_part(x: mx.array, bias: mx.array | float, w: mx.array) -> mx.array:
    x = x + bias
    # 1e-6 keeps t^4 times the small high-order coefficients out of subnormal range
    # (2x slower there); it moves erf by less than 1e-7.
    t = w * w + 1e-6
    t2 = t * t
    p = (_P[0] * t2 + (_P[1] * t + _P[2])) * (t2 * t2) + ((_P[3] * t + _P[4]) * t2 + (_P[5] * t + _P[6]))
    q = (_Q[0] * t2 + (_Q[1] * t + _Q[2])) * t2 + (_Q[3] * t + _Q[4])
    return 0.5 * x + (mx.abs(x) * w) * (p / q)


# MLX's CPU backend runs each elementwise kernel on one thread, and each stream on
# a thread of its own: the tower's elementwise work is split into bands of rows,
# one per core, each on its own stream (1.9x on 2 cores).
_STREAMS: list[mx.Stream] = []


def in_bands(band: Callable[[int, int], mx.array], rows: int) -> list[mx.array]:
    """band(start, stop) for one slice of axis 1 per CPU stream."""
    if not _STREAMS:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        _STREAMS.extend(mx.new_stream(mx.cpu) for _ in range(min(cores or 1, 8)))
    n = min(len(_STREAMS), rows)
    edges = [rows * i // n for i in range(n + 1)]
    parts = []
    for stream, a, b in zip(_STREAMS, edges, edges[1:]):
        with mx.stream(stream):
            parts.append(band(a, b))
    return parts


def joined(parts: list[mx.array]) -> mx.array:
    """Bands back into one array along axis 1."""
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Module:
    """A reparameterized conv with bias, "same" padding; one input channel per group
    makes it a DepthwiseConv2d, a 1x1 kernel a PointwiseConv2d."""
    if groups == in_ch and groups > 1:
        return DepthwiseConv2d(in_ch, out_ch, kernel, stride)
    if kernel == 1 and groups == 1 and stride == 1:
        return PointwiseConv2d(in_ch, out_ch)
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups)


class PointwiseConv2d(nn.Module):
    """A 1x1 conv as one matmul over all pixels: on the CPU backend mx.conv2d's 1x1
    path is 1.2-1.7x slower than the same product through BLAS. Keeps the conv
    weight layout [O, 1, 1, I] of the checkpoints."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        scale = (1.0 / in_ch) ** 0.5
        self.weight = mx.random.uniform(-scale, scale, (out_ch, 1, 1, in_ch))
        self.bias = mx.zeros((out_ch,))
        self.stride = 1

    def __call__(self, x: mx.array) -> mx.array:
        return self.project(x, self.bias)

    def project(self, x: mx.array, bias: mx.array | None = None) -> mx.array:
        """The product, plus `bias` if given: without it, for a consumer that adds the
        bias in its own kernel."""
        w = self.weight.reshape(self.weight.shape[0], -1).T
        pixels = x.reshape(-1, x.shape[-1])
        y = pixels @ w if bias is None else mx.addmm(bias, pixels, w)
        return y.reshape(*x.shape[:-1], w.shape[1])


class DepthwiseConv2d(nn.Module):
    """A conv with one input channel per group (out = m * in), the tower's workhorse.

    On the CPU backend mx.conv2d's grouped kernel is 3-4x slower than summing
    k*k shifted copies of the input, so there the sum is used (see _shift_add);
    other backends keep mx.conv2d.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1):
        super().__init__()
        scale = (1.0 / (kernel * kernel)) ** 0.5
        self.weight = mx.random.uniform(-scale, scale, (out_ch, kernel, kernel, 1))
        self.bias = mx.zeros((out_ch,))
        self.stride = stride

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() == mx.cpu:
            return _shift_add(x, self.weight, self.bias, self.stride)
        k = self.weight.shape[1]
        return mx.conv2d(x, self.weight, self.stride, k // 2, groups=x.shape[-1]) + self.bias


def _shift_add(x: mx.array, weight: mx.array, bias: mx.array, stride: int) -> mx.array:
    """Depthwise conv as a sum of shifted windows times per-channel taps.

    Three taps per compiled kernel: MLX's CPU kernels index each input through
    its own strides, and past a handful of inputs that loop stops being fast
    (7x7 on 128x128x192: all 49 taps in one kernel 113 ms, three per kernel
    63 ms). g++ vectorizes such a loop only when every input steps by 1 along
    the channels and the output does not overwrite an input, which it checks at
    run time: so the taps are made contiguous, and each partial sum is kept
    alive (mx.depends) until the next is written, since MLX would otherwise
    reuse its buffer for the output (36 -> 25 ms). Bands of output rows run on
    separate streams (see in_bands).
    """
    out_ch, k = weight.shape[0], weight.shape[1]
    if out_ch != x.shape[-1]:
        x = mx.repeat(x, out_ch // x.shape[-1], axis=-1)  # output o reads input o // m
    pad = k // 2
    H = (x.shape[1] + 2 * pad - k) // stride + 1
    W = (x.shape[2] + 2 * pad - k) // stride + 1
    x = mx.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    taps = mx.contiguous(weight[..., 0].transpose(1, 2, 0))  # [k, k, C]
    offsets = [(i, j) for i in range(k) for j in range(k)]

    def band(a: int, b: int) -> mx.array:
        out = bias
        for n in range(0, len(offsets), 3):
            group = offsets[n : n + 3]
            windows = [
                x[:, i + stride * a : i + stride * (b - 1) + 1 : stride, j : j + stride * (W - 1) + 1 : stride]
                for i, j in group
            ]
            total = _multiply_add(out, windows, [taps[i, j] for i, j in group])
            out = total if n == 0 else mx.depends(total, out)
        return out

    return joined(in_bands(band, H))


@mx.compile
def _multiply_add(out: mx.array, windows: list[mx.array], taps: list[mx.array]) -> mx.array:
    for window, tap in zip(windows, taps):
        out = out + window * tap
    return out


class SEBlock(nn.Module):
    """Squeeze-Excite: global mean, 1x1 reduce to C/16, ReLU, 1x1 expand, sigmoid gate."""

    def __init__(self, dims: int, rd_ratio: float = 0.0625):
        super().__init__()
        self.reduce = conv(dims, int(dims * rd_ratio), 1)
        self.expand = conv(int(dims * rd_ratio), dims, 1)

    def __call__(self, x: mx.array) -> mx.array:
        s = x.mean(axis=(1, 2), keepdims=True)
        s = mx.sigmoid(self.expand(nn.relu(self.reduce(s))))
        return x * s


class MobileOneBlock(nn.Module):
    """A reparameterized MobileOne block: conv, optional Squeeze-Excite, GELU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1,
                 groups: int = 1, use_se: bool = False):
        super().__init__()
        self.reparam_conv = conv(in_ch, out_ch, kernel, stride, groups)
        if use_se:
            self.se = SEBlock(out_ch)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.reparam_conv(x)
        if "se" in self:
            x = self.se(x)
        return gelu(x)


class ReparamLargeKernelConv(nn.Module):
    """Depthwise-grouped large-kernel conv (the downsampler's first half) + GELU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int):
        super().__init__()
        self.lkb_reparam = conv(in_ch, out_ch, kernel, stride, groups=in_ch)

    def __call__(self, x: mx.array) -> mx.array:
        return gelu(self.lkb_reparam(x))


class PatchEmbed(nn.Module):
    """Downsampler between stages: large-kernel stride-2 conv, then 1x1 MobileOne."""

    def __init__(self, patch_size: int, stride: int, in_ch: int, out_ch: int):
        super().__init__()
        self.proj = [
            ReparamLargeKernelConv(in_ch, out_ch, patch_size, stride),
            MobileOneBlock(out_ch, out_ch, 1),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.proj:
            x = layer(x)
        return x


class RepCPE(nn.Module):
    """Conditional positional encoding; the skip is folded into the depthwise conv."""

    def __init__(self, dims: int, spatial_shape: list[int]):
        super().__init__()
        self.reparam_conv = conv(dims, dims, spatial_shape[0], groups=dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.reparam_conv(x)


class RepMixer(nn.Module):
    """Token mixer of the conv stages: a depthwise conv with the skip folded in."""

    def __init__(self, dims: int, kernel: int):
        super().__init__()
        self.reparam_conv = conv(dims, dims, kernel, groups=dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.reparam_conv(x)


class ConvFFN(nn.Module):
    """Depthwise 7x7 conv (its BatchNorm folded in at load), then 1x1 -> GELU -> 1x1."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.conv = conv(dims, dims, 7, groups=dims)
        self.fc1 = conv(dims, hidden, 1)
        self.fc2 = conv(hidden, dims, 1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv(x)
        if mx.default_device() != mx.cpu:
            return self.fc2(gelu(self.fc1(x)))
        # fc1's bias, the GELU and fc2 run on each band, so the 4x-wide hidden
        # map is never copied (tower: 6.16 s -> 5.84 s).
        h = self.fc1.project(x)
        hidden = in_bands(lambda a, b: _gelu_rational(h[:, a:b], self.fc1.bias), h.shape[1])
        return joined([self.fc2(g) for g in hidden])


class RepMixerBlock(nn.Module):
    def __init__(self, dims: int, kernel: int, mlp_ratio: float):
        super().__init__()
        self.token_mixer = RepMixer(dims, kernel)
        self.convffn = ConvFFN(dims, int(dims * mlp_ratio))

    def __call__(self, x: mx.array) -> mx.array:
        x = self.token_mixer(x)
        return x + self.convffn(x)  # layer_scale is folded into convffn.fc2


class MHSA(nn.Module):
    """Multi-head self-attention over all pixels of the feature map."""

    def __init__(self, dims: int, head_dim: int):
        super().__init__()
        self.num_heads = dims // head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dims, dims * 3, bias=False)
        self.proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        qkv = self.qkv(x.reshape(B, H * W, C))
        qkv = qkv.reshape(B, H * W, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if mx.default_device() == mx.cpu:
            out = joined(in_bands(lambda a, b: _attention(q[:, a:b], k[:, a:b], v[:, a:b], self.scale),
                                  self.num_heads))
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(0, 2, 1, 3).reshape(B, H * W, C)
        return self.proj(out).reshape(B, H, W, C)


def _attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v with exp_shifted, normalized after the product with v.

    The scores are built transposed, keys by queries: each query's max then varies
    along the contiguous axis, which the compiled exp kernel vectorizes (a per-row
    max has stride 0 there and forces the scalar loop), and the max and sum reduce
    across rows, 4x faster than along them (one band of 12 heads at 32x32: 82 ms
    as rows, 41 ms transposed).
    """
    s = (k * scale) @ q.swapaxes(-1, -2)
    e = exp_shifted(s, s.max(axis=-2, keepdims=True))
    return (e.swapaxes(-1, -2) @ v) / e.sum(axis=-2)[..., None]


# The CPU backend's exp calls a software fma six times a value (~12 ns), and
# attention at 1024 px takes 100 M of them. For x <= shift, 2^((x - shift) log2 e)
# is split into 2^f, |f| <= 1/2, a polynomial, times 2^r, r an integer written
# straight into a float's exponent bits. r is clamped at -127 as an integer: a
# float maximum tests for NaN, which keeps g++ from vectorizing the kernel.
_LOG2E = 1.4426950408889634
_ROUND = 1.5 * 2**23  # x + _ROUND - _ROUND rounds x to an integer
_EXP2 = [math.log(2) ** n / math.factorial(n) for n in range(8)]  # 2^f = sum (f ln2)^n / n!


def exp_shifted(x: mx.array, shift: mx.array | float) -> mx.array:
    """exp(x - shift) for finite x <= shift; values below e^-88 come out as 0."""
    fraction, exponent = _exp2_parts(x, shift)
    return fraction * exponent.view(mx.float32)


@mx.compile
def _exp2_parts(x: mx.array, shift: mx.array | float) -> tuple[mx.array, mx.array]:
    u = (x - shift) * _LOG2E
    # |u| < 2^32, so rounding leaves |f| <= 256 and the polynomial finite; the
    # change is below float32 rounding wherever exp(u) is not 0 anyway.
    u = u / (1.0 + mx.abs(u) * 2.0**-32)
    r = (u + _ROUND) - _ROUND
    f = u - r
    f2 = f * f
    c = _EXP2
    fraction = ((c[7] * f + c[6]) * f2 + (c[5] * f + c[4])) * (f2 * f2) + (
        (c[3] * f + c[2]) * f2 + (c[1] * f + c[0]))
    # r below the int32 range converts to INT_MIN (x86 and ARM alike), then clamps
    return fraction, mx.left_shift(mx.maximum(r.astype(mx.int32), -127) + 127, 23)


class AttentionBlock(nn.Module):
    def __init__(self, dims: int, mlp_ratio: float, head_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dims, eps=1e-5)  # LayerNormChannel: per pixel over C
        self.token_mixer = MHSA(dims, head_dim)
        self.convffn = ConvFFN(dims, int(dims * mlp_ratio))

    def __call__(self, x: mx.array) -> mx.array:
        # layer_scale_1 and _2 are folded into token_mixer.proj and convffn.fc2
        x = x + self.token_mixer(self.norm(x))
        return x + self.convffn(x)


class FastViTHD(nn.Module):
    """stem -> [RepCPE?] stage, downsampler, ... -> conv_exp with Squeeze-Excite.

    Returns the image embedding [B, H/64, W/64, hidden_size]; the classifier
    head of the reference is not built.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config
        dims = c.embed_dims
        self.patch_embed = [
            MobileOneBlock(3, dims[0], 3, stride=2),
            MobileOneBlock(dims[0], dims[0], 3, stride=2, groups=dims[0]),
            MobileOneBlock(dims[0], dims[0], 1),
        ]
        self.network = []
        for i, depth in enumerate(c.layers):
            if c.pos_embs_shapes[i] is not None:
                self.network.append(RepCPE(dims[i], c.pos_embs_shapes[i]))
            if c.token_mixers[i] == "repmixer":
                stage = [RepMixerBlock(dims[i], c.repmixer_kernel_size, c.mlp_ratios[i])
                         for _ in range(depth)]
            else:
                stage = [AttentionBlock(dims[i], c.mlp_ratios[i], c.head_dim)
                         for _ in range(depth)]
            self.network.append(stage)
            last = i == len(c.layers) - 1
            if not last and (c.downsamples[i] or dims[i] != dims[i + 1]):
                self.network.append(
                    PatchEmbed(c.down_patch_size, c.down_stride, dims[i], dims[i + 1])
                )
        self.conv_exp = MobileOneBlock(dims[-1], c.hidden_size, 3, groups=dims[-1],
                                       use_se=True)

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.patch_embed:
            x = layer(x)
        for stage in self.network:
            for block in stage if isinstance(stage, list) else [stage]:
                x = block(x)
        return self.conv_exp(x)
