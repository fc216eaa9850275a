"""The cost model: analytic FLOPs per stage and a measured matmul peak; the bytes a
decode step reads and a measured memory bandwidth.

Convention: 2 FLOPs per multiply-add, counted for convolutions, linear layers
and the attention matmuls (Q.K^T and A.V); biases, norms, activations,
softmax, pooling and elementwise ops are not counted (torch.utils.flop_counter
counts the same way). It reproduces DESIGN.md's FastViTHD figures, 30 / 119 /
270 / 487 / 621 GFLOP at 256 / 512 / 768 / 1024 / 1152 px, within 1.3%;
1 FLOP per multiply-add would give half of them, and leaving out the
attention matmuls would miss 1024 px by 3%.
"""

from __future__ import annotations

import contextlib
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2

from fastvlm_mlx import kernels
from fastvlm_mlx.fastvithd import MHSA, FastViTHD, SEBlock, VisionConfig
from fastvlm_mlx.fastvlm import Model

CONVENTION = (
    "2 FLOPs per multiply-add, for convolutions, linear layers and the attention matmuls; "
    "biases, norms, activations, softmax, pooling and elementwise ops not counted"
)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def module_macs(module, h: int, w: int) -> tuple[int, int, int]:
    """Multiply-adds of `module` on an h x w map (tokens: h * w), and the map it emits.

    Children are visited in definition order, which in fastvithd.py is the
    order they run in, so a stride-2 conv shrinks the map for what follows.
    A conv is any module with a 4-D weight and a stride (nn.Conv2d or a custom
    kernel), padded to keep the size unless it says otherwise.
    """
    if isinstance(module, list):
        total = 0
        for m in module:
            macs, h, w = module_macs(m, h, w)
            total += macs
        return total, h, w
    if "weight" in module and module.weight.ndim == 4:  # any conv: [O, kH, kW, I/groups]
        out_ch, kh, kw, in_per_group = module.weight.shape
        (sh, sw), (ph, pw) = _pair(module.stride), _pair(getattr(module, "padding", (kh // 2, kw // 2)))
        d = getattr(module, "dilation", 1)
        h = (h + 2 * ph - d * (kh - 1) - 1) // sh + 1
        w = (w + 2 * pw - d * (kw - 1) - 1) // sw + 1
        return h * w * out_ch * kh * kw * in_per_group, h, w
    if isinstance(module, nn.Linear):
        out_dims, in_dims = module.weight.shape
        return h * w * out_dims * in_dims, h, w
    if isinstance(module, SEBlock):  # runs on the globally pooled 1 x 1 map
        return module_macs(list(module.children().values()), 1, 1)[0], h, w
    if isinstance(module, MHSA):
        n, dims = h * w, module.proj.weight.shape[0]
        linears = module_macs([module.qkv, module.proj], h, w)[0]
        return linears + 2 * n * n * dims, h, w  # Q.K^T and A.V over all pixel pairs
    return module_macs(list(module.children().values()), h, w)


def vision_flops(config: VisionConfig, resolution: int) -> int:
    """FLOPs of FastViTHD on one resolution x resolution image.

    Walks the module tree that the model code builds from `config`, so the
    count follows the real architecture. Construction is lazy in MLX: only
    shapes are read, no weight is materialised, and a loaded (possibly
    quantized) model's layout does not matter.
    """
    return 2 * module_macs(FastViTHD(config), resolution, resolution)[0]


def projector_flops(in_dims: int, dims: int, tokens: int) -> int:
    """FLOPs of the mlp2x_gelu projector (in_dims -> dims -> dims) on `tokens` features."""
    return 2 * tokens * (in_dims * dims + dims * dims)


def decoder_flops(args: qwen2.ModelArgs, tokens: int, context: int = 0,
                  fastv: tuple[int, int] | None = None) -> int:
    """FLOPs of the Qwen2 decoder on `tokens` new tokens after `context` cached ones.

    Attention counts the causal pairs only (what a query may see), and the
    LM head runs on the last position only, as in chat's prefill and decode.
    With fastv = (K, kept tokens), layers from K on see only the kept tokens.
    """
    d, heads, kv_heads = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
    kv_dims = kv_heads * (d // heads)
    per_token = 2 * d * d + 2 * d * kv_dims + 3 * d * args.intermediate_size

    def layer(n: int) -> int:
        return n * per_token + 2 * d * (n * context + n * (n + 1) // 2)

    cut, kept = fastv or (args.num_hidden_layers, tokens)
    layers = cut * layer(tokens) + (args.num_hidden_layers - cut) * layer(kept)
    return 2 * (layers + d * args.vocab_size)


def matmul_peak(dtype: mx.Dtype, budget_s: float = 0.25) -> tuple[float, int]:
    """GFLOP/s of the best square matmul in `dtype` on the default device, and its size.

    Grows the size until one product takes ~10 ms (so the timer and dispatch
    overheads vanish), then keeps the fastest of a few repeats within the budget.
    On the CPU backend the BLAS has its own threads for it (the kernels give it
    one a call), so the peak is the machine's, whichever ran first.
    """
    with kernels.cpu.blas_threads() if kernels.selected() is kernels.cpu else contextlib.nullcontext():
        return _matmul_peak(dtype, budget_s)


def _matmul_peak(dtype: mx.Dtype, budget_s: float) -> tuple[float, int]:
    n = 256
    while True:
        a = mx.random.normal((n, n)).astype(dtype)
        b = mx.random.normal((n, n)).astype(dtype)
        mx.eval(a, b, a @ b)  # warm-up
        start = time.perf_counter()
        mx.eval(a @ b)
        best = time.perf_counter() - start
        if best > 0.01 or n >= 4096:
            break
        n *= 2
    deadline = time.perf_counter() + budget_s
    for _ in range(10):
        if time.perf_counter() + best > deadline:
            break
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9, n


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of the fastest streaming copy of `nbytes` (counted read and written), in
    bands of rows on every core on the CPU backend, as one op elsewhere."""
    a = mx.random.uniform(shape=(1, nbytes // 4 // 1024, 1024))
    mx.eval(a)
    on_cpu = kernels.selected() is kernels.cpu

    def copy() -> list[mx.array]:
        return kernels.cpu.in_bands(lambda r, s: -a[:, r:s], a.shape[1]) if on_cpu else [-a]

    return 2 * a.nbytes / fastest(copy, repeats)


def fastest(work, repeats: int = 5) -> float:
    """Seconds of the fastest of `repeats` evaluations of work(), after one uncounted."""
    mx.eval(work())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(work())
        best = min(best, time.perf_counter() - start)
    return best


def decode_bytes(model: Model) -> int:
    """What one decode step reads: every decoder weight, but the embedding only as the tied head."""
    lm = model.language_model
    total = sum(v.nbytes for _, v in tree_flatten(lm.parameters()))
    if not lm.args.tie_word_embeddings:
        total -= sum(v.nbytes for _, v in tree_flatten(lm.model.embed_tokens.parameters()))
    return total
