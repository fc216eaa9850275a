"""FastViTHD, the hybrid conv/attention vision encoder of FastVLM, in NHWC.

Every convolution is the reparameterized (inference) form stored in the
checkpoints: one conv with bias. The module names match the reference so the
weight mapping is mostly a prefix change (see fastvlm.LAYOUTS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .errors import FastVLMError


@dataclass
class VisionConfig:
    """Shape of the tower; the defaults are the published FastViTHD (mobileclip_l)."""

    layers: list[int] = field(default_factory=lambda: [2, 12, 24, 4, 2])
    embed_dims: list[int] = field(default_factory=lambda: [96, 192, 384, 768, 1536])
    mlp_ratios: list[float] = field(default_factory=lambda: [4, 4, 4, 4, 4])
    downsamples: list[bool] = field(default_factory=lambda: [True] * 5)
    token_mixers: list[str] = field(default_factory=lambda: ["repmixer"] * 3 + ["attention"] * 2)
    pos_embs_shapes: list = field(default_factory=lambda: [None, None, None, [7, 7], [7, 7]])
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
        downs = sum(self.downsamples[i] or self.embed_dims[i] != self.embed_dims[i + 1]
                    for i in range(len(self.layers) - 1))
        return 4 * self.down_stride**downs


class Conv2d(nn.Module):
    """A reparameterized conv with bias and "same" padding, weights [O, k, k, I/groups]
    as the checkpoints store them. How it is computed (a matmul for 1x1, shifted
    windows for depthwise on the CPU) is the kernels' choice."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__()
        scale = (groups / (in_ch * kernel * kernel)) ** 0.5
        self.weight = mx.random.uniform(-scale, scale, (out_ch, kernel, kernel, in_ch // groups))
        self.bias = mx.zeros((out_ch,))
        self.stride = stride
        self.groups = groups

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.conv2d(x, self.weight, self.bias, self.stride, self.groups)


class Linear(nn.Linear):
    """nn.Linear with its product from the kernels (on the CPU, in bands of positions)."""

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.linear(x, self["weight"], self.get("bias"))


class SEBlock(nn.Module):
    """Squeeze-Excite: global mean, 1x1 reduce to C/16, ReLU, 1x1 expand, sigmoid gate."""

    def __init__(self, dims: int, rd_ratio: float = 0.0625):
        super().__init__()
        self.reduce = Conv2d(dims, int(dims * rd_ratio), 1)
        self.expand = Conv2d(int(dims * rd_ratio), dims, 1)

    def __call__(self, x: mx.array) -> mx.array:
        s = x.mean(axis=(1, 2), keepdims=True)
        s = mx.sigmoid(self.expand(nn.relu(self.reduce(s))))
        return x * s


class MobileOneBlock(nn.Module):
    """A reparameterized MobileOne block: conv, optional Squeeze-Excite, GELU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1,
                 groups: int = 1, use_se: bool = False):
        super().__init__()
        self.reparam_conv = Conv2d(in_ch, out_ch, kernel, stride, groups)
        if use_se:
            self.se = SEBlock(out_ch)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.reparam_conv(x)
        if "se" in self:
            x = self.se(x)
        return kernels.gelu(x)


class ReparamLargeKernelConv(nn.Module):
    """Depthwise-grouped large-kernel conv (the downsampler's first half) + GELU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int):
        super().__init__()
        self.lkb_reparam = Conv2d(in_ch, out_ch, kernel, stride, groups=in_ch)

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.gelu(self.lkb_reparam(x))


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


class RepMixer(nn.Module):
    """Token mixer of the conv stages: a depthwise conv with the skip folded in."""

    def __init__(self, dims: int, kernel: int):
        super().__init__()
        self.reparam_conv = Conv2d(dims, dims, kernel, groups=dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.reparam_conv(x)


class RepCPE(RepMixer):
    """Conditional positional encoding before the attention stages: the same folded
    depthwise conv, 7x7."""


class ConvFFN(nn.Module):
    """Depthwise 7x7 conv (its BatchNorm folded in at load), then 1x1 -> GELU -> 1x1."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.conv = Conv2d(dims, dims, 7, groups=dims)
        self.fc1 = Conv2d(dims, hidden, 1)
        self.fc2 = Conv2d(hidden, dims, 1)

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.pointwise_ffn(self.conv(x), self.fc1, self.fc2)


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
        self.qkv = Linear(dims, dims * 3, bias=False)
        self.proj = Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        qkv = self.qkv(x.reshape(B, H * W, C))
        qkv = qkv.reshape(B, H * W, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = kernels.attention(q, k, v, self.scale)
        out = out.transpose(0, 2, 1, 3).reshape(B, H * W, C)
        return self.proj(out).reshape(B, H, W, C)


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
                self.network.append(RepCPE(dims[i], c.pos_embs_shapes[i][0]))
            if c.token_mixers[i] == "repmixer":
                stage = [RepMixerBlock(dims[i], c.repmixer_kernel_size, c.mlp_ratios[i])
                         for _ in range(depth)]
            else:
                stage = [AttentionBlock(dims[i], c.mlp_ratios[i], c.head_dim)
                         for _ in range(depth)]
            self.network.append(stage)
            last = i == len(c.layers) - 1
            if not last and (c.downsamples[i] or dims[i] != dims[i + 1]):
                self.network.append(PatchEmbed(c.down_patch_size, c.down_stride, dims[i], dims[i + 1]))
        self.conv_exp = MobileOneBlock(dims[-1], c.hidden_size, 3, groups=dims[-1], use_se=True)

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.patch_embed:
            x = layer(x)
        for stage in self.network:
            for block in stage if isinstance(stage, list) else [stage]:
                x = block(x)
        return self.conv_exp(x)
