"""Kernels for MLX's CPU backend, where its own ops are slow in ways measured below.

MLX's CPU backend compiles each elementwise kernel with g++ -O3 for baseline
x86-64 and runs it on one thread; a kernel's loop is vectorized only if no op in
it branches (mx.maximum, mx.minimum and mx.clip test for NaN), every input steps
by 1 along the innermost axis, and its output does not overwrite an input. Each
kernel here is written to meet that, and the elementwise work runs in bands of
rows, one per core, each on a stream of its own; so do the matmuls where a BLAS
call runs on one thread (blas_in_bands).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import math
import os
from collections.abc import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import portable


def compute_dtype(weights: mx.Dtype) -> mx.Dtype:
    """float32 whatever the weights' dtype: half precision has neither BLAS nor fast
    kernels here (a float16 prefill of 304 tokens on the 0.5B decoder: 55 s, against
    1.7 s in float32). The tower's weights are kept in it too: converting float16
    weights at every op made the 1024 px tower 1.4x slower (9.2 s against 6.6 s)."""
    return mx.float32


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
    """GELU in its exact (erf) form, the rational erf on bands of rows."""
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
# one per core, each on its own stream (1.9x on 2 cores). A stream belongs to the
# thread that made it, so these are thread-local: a server's worker gets its own.
_STREAMS: list[mx.ThreadLocalStream] = []


def in_bands(band: Callable[[int, int], mx.array], rows: int) -> list[mx.array]:
    """band(start, stop) for one slice of axis 1 per CPU stream."""
    if not _STREAMS:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        _STREAMS.extend(mx.new_thread_local_stream(mx.cpu) for _ in range(min(cores or 1, 8)))
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


@functools.cache
def blas_in_bands() -> bool:
    """Whether matmuls run in bands too, one per stream: only where each BLAS call runs
    on its caller's thread alone, else every band's call would spread over every core.

    The mlx wheel's reference BLAS always does, so banding gives its matmuls every
    core (a 340-token prefill of the 0.5B decoder: 115 s -> 39 s on 2 cores).
    OpenBLAS is set to one thread per call here, for the whole process: its bands on
    streams then beat its own threads (1024 px tower: 0.81x in separate processes),
    whose idle spinning (sched_yield) took 12% of a prefill's CPU time from the
    elementwise bands. Any other BLAS keeps its threads and one call per matmul.
    """
    blas = _blas()
    if blas is not None and blas["reference"]:
        return True
    openblas = _openblas(blas)
    if openblas is None:
        return False
    _openblas_own_threads.append(openblas.openblas_get_num_threads())
    openblas.openblas_set_num_threads(1)
    return True


def _blas() -> dict | None:
    """utils.blas_library(), imported late: utils imports the kernels."""
    from ..utils import blas_library

    return blas_library()


def _openblas(blas: dict | None) -> ctypes.CDLL | None:
    """The OpenBLAS MLX's matmuls reach, if they reach one that can be set."""
    if blas is None or blas["name"] != "OpenBLAS":
        return None
    lib = ctypes.CDLL(blas["path"])
    return lib if hasattr(lib, "openblas_set_num_threads") and hasattr(lib, "openblas_get_num_threads") else None


@functools.cache
def small_products() -> bool:
    """Whether the BLAS multiplies a product of at most _SMALL_PRODUCT multiply-adds
    without packing the matrix: OpenBLAS's small-matrix kernel, on the cores it has
    one for. MLX calls sgemm even for one row, and OpenBLAS 0.3.21's packing sgemm
    reads a matrix at 6.8 GB/s a core against 16.3 GB/s for the small kernel, so
    decoding cuts its products to that size (0.5B decoder: 5.4 -> 8.9 tokens/s on
    2 cores). Its Haswell kernels have none: there the cut products were slower."""
    openblas = _openblas(_blas())
    if openblas is None or not hasattr(openblas, "openblas_get_corename"):
        return False
    openblas.openblas_get_corename.restype = ctypes.c_char_p
    return openblas.openblas_get_corename().decode().lower() in _SMALL_KERNEL_CORES


_SMALL_PRODUCT = 1_000_000  # M * N * K, OpenBLAS's limit for sgemm_small_kernel (100^3)
_SMALL_KERNEL_CORES = {"skylakex", "cooperlake", "sapphirerapids"}


_openblas_own_threads: list[int] = []  # what OpenBLAS chose for itself, before blas_in_bands set 1


@contextlib.contextmanager
def blas_threads() -> Iterator[None]:
    """OpenBLAS with its own thread count inside, one again after: for other MLX code in
    this process that calls it once a matmul (bench.compare's turns for mlx-vlm)."""
    if not (blas_in_bands() and _openblas_own_threads):
        yield
        return
    openblas = _openblas(_blas())
    openblas.openblas_set_num_threads(_openblas_own_threads[0])
    try:
        yield
    finally:
        openblas.openblas_set_num_threads(1)


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weight.T + bias, in bands where blas_in_bands(): of positions (axis 1) for a
    prefill, of outputs for a decode step on a large matrix (stacked_products), else in
    one call."""
    if not _banded_product(weight):
        return portable.linear(x, weight, bias)
    if x.ndim == 3 and x.shape[1] >= _BANDED_POSITIONS:
        return joined(in_bands(lambda a, b: portable.linear(x[:, a:b], weight, bias), x.shape[1]))
    return stacked_products(x, [(weight, bias)])[0]


def stacked_products(x: mx.array, layers: list[tuple[mx.array, mx.array | None]]) -> list[mx.array]:
    """x @ W.T + b for each (W, b), for a decode step: the outputs of all the W taken as
    one stack, in bands of it, one per stream, so matrices that share x (q, k, v; gate,
    up) join once, not once each. Each band is cut into products small enough for
    OpenBLAS's small-matrix kernel where it has one (see small_products)."""
    rows = x.size // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1])

    def product(i: int, lo: int, hi: int) -> mx.array:
        w, bias = layers[i]
        return _cut_product(x2, w[lo:hi], None if bias is None else bias[lo:hi], _piece(rows, w))

    outputs = _stack([w.shape[0] for w, _ in layers], product, banded=True)
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in outputs]


def _stack(sizes: list[int], product: Callable[[int, int, int], mx.array], banded: bool) -> list[mx.array]:
    """The [N, size] outputs of matrices that share an input, computed as one stack of
    their outputs, in bands of it if `banded`: product(i, lo, hi) is rows lo:hi of
    matrix i's output, [N, hi - lo], for the part of matrix i in a band."""
    starts = list(itertools.accumulate(sizes, initial=0))

    def band(a: int, c: int) -> mx.array:
        parts = [product(i, max(a, start) - start, min(c, stop) - start)
                 for i, (start, stop) in enumerate(zip(starts, starts[1:])) if max(a, start) < min(c, stop)]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)

    y = joined(in_bands(band, starts[-1])) if banded else band(0, starts[-1])
    return [y[:, a:c] for a, c in zip(starts, starts[1:])]


def _piece(rows: int, weight: mx.array) -> int:
    """Rows of weight per product with `rows` inputs: within the small-matrix kernel's
    limit where it serves (see small_products), else all of them."""
    if rows <= DECODE_ROWS and weight.dtype == mx.float32 and small_products():
        return max(1, _SMALL_PRODUCT // (rows * weight.shape[1]))
    return weight.shape[0]


def _cut_product(x: mx.array, weight: mx.array, bias: mx.array | None, step: int) -> mx.array:
    """x [N, I] @ weight.T + bias as products of at most `step` rows of weight each: the
    equal pieces as one batched matmul, for which MLX calls the BLAS once a piece; one
    MLX op a piece cost more than the products of a small matrix (the LM head in 138
    pieces: 34 ms against 24 ms as one op, decoding on 2 cores)."""
    if step >= weight.shape[0]:
        return portable.linear(x, weight, bias)
    step = _even_step(weight.shape[0], step)
    n = weight.shape[0] // step
    pieces = weight[: n * step].reshape(n, step, -1).swapaxes(1, 2)
    parts = [(x @ pieces).swapaxes(0, 1).reshape(x.shape[0], n * step)]
    if n * step < weight.shape[0]:
        parts.append(x @ weight[n * step :].T)
    y = mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    return y if bias is None else y + bias


@functools.cache
def _even_step(rows: int, most: int) -> int:
    """The largest piece of at most `most` rows that cuts `rows` evenly, if it takes at
    most twice the pieces of `most` rows; else `most`, and a shorter last piece. An even
    cut saves the last piece's product and the join: two of a decode step's four MLX ops
    a matrix band (gate, up and down on 2 cores; a float32 step 0.99x the time, 40
    alternating rounds)."""
    least = -(-rows // most)
    return next((rows // n for n in range(least, 2 * least + 1) if rows % n == 0), most)


def _banded_product(weight: mx.array) -> bool:
    """Whether products with this matrix run in bands: not for a small one, whose
    product costs less than a band's synchronization."""
    return weight.size >= _BANDED_WEIGHTS_BLAS and blas_in_bands()


_BANDED_WEIGHTS_BLAS = 1 << 16  # decoding the 0.5B decoder with 2 M (q, k, v, o unbanded): 1.04x slower


def conv2d(x: mx.array, weight: mx.array, bias: mx.array, stride: int, groups: int) -> mx.array:
    """Depthwise convs as shifted windows (below); the others as on every backend."""
    if groups > 1 and groups == x.shape[-1]:
        return depthwise_conv(x, weight, bias, stride)
    if _is_pointwise(weight, stride, groups) and _banded_product(weight):
        return joined(in_bands(lambda a, b: portable.pointwise(x[:, a:b], weight, bias), x.shape[1]))
    return portable.conv2d(x, weight, bias, stride, groups)


def _is_pointwise(weight: mx.array, stride: int, groups: int) -> bool:
    """A 1x1 conv: one matmul over all pixels."""
    return weight.shape[1] == 1 and groups == 1 and stride == 1


def depthwise_conv(x: mx.array, weight: mx.array, bias: mx.array, stride: int) -> mx.array:
    """Depthwise conv as a sum of shifted windows times per-channel taps: mx.conv2d's
    grouped kernel is 3-4x slower on this backend.

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


def pointwise_ffn(x: mx.array, fc1: nn.Module, fc2: nn.Module) -> mx.array:
    """fc2(GELU(fc1(x))) for 1x1 convs: fc1's bias, the GELU and fc2 run on each band
    of rows, so the 4x-wide hidden map is never copied (tower: 6.16 s -> 5.84 s); the
    matmuls too where blas_in_bands()."""
    def ffn(h: mx.array) -> mx.array:
        return portable.pointwise(_gelu_rational(h, fc1.bias), fc2.weight, fc2.bias)

    if _banded_product(fc1.weight):
        return joined(in_bands(lambda a, b: ffn(portable.pointwise(x[:, a:b], fc1.weight)), x.shape[1]))
    h = portable.pointwise(x, fc1.weight)
    return joined(in_bands(lambda a, b: ffn(h[:, a:b]), h.shape[1]))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v over [B, heads, N, d], a band of heads per stream."""
    return joined(in_bands(lambda a, b: _attention(q[:, a:b], k[:, a:b], v[:, a:b], scale), q.shape[1]))


def _attention(q: mx.array, k: mx.array, v: mx.array, scale: float, bias: mx.array | None = None) -> mx.array:
    """softmax(q k^T * scale + bias^T) v with exp_shifted, normalized after the product with v.

    The scores are built transposed, keys by queries: each query's max then varies
    along the contiguous axis, which the compiled exp kernel vectorizes (a per-row
    max has stride 0 there and forces the scalar loop), and the max and sum reduce
    across rows, 4x faster than along them (one band of 12 heads at 32x32: 82 ms
    as rows, 41 ms transposed). `bias` is [keys, queries], -1e30 where masked out.
    """
    s = (k * scale) @ q.swapaxes(-1, -2) if bias is None else mx.addmm(bias, k * scale, q.swapaxes(-1, -2))
    e = exp_shifted(s, s.max(axis=-2, keepdims=True))
    return (e.swapaxes(-1, -2) @ v) / e.sum(axis=-2)[..., None]


def attention_inputs(x: mx.array, attn: nn.Module, offset) -> tuple[mx.array, mx.array, mx.array]:
    """q, k, v [B, heads, L, d] of the decoder's attention, q and k rotated, the rotation
    from a table of cosines and sines made once a forward pass: mx.fast.rope evaluates
    them for every head again, at a third of the speed of the table in a prefill, and
    on this backend as a dozen MLX ops per call in a decode step. A prefill computes
    all three projections and the rotation on each band of positions, a decode step
    the projections as one stack (stacked_products, or quantized_stack)."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    rope, (b, length, _) = attn.rope, x.shape
    if not (type(rope) is nn.RoPE and not rope.traditional and isinstance(offset, int)
            and rope.dims == attn.q_proj.weight.shape[0] // attn.n_heads):
        return portable.attention_inputs(x, attn, offset)
    cos, sin = _rotary_table(offset, length, rope.dims, rope.base, rope.scale)
    heads = (attn.n_heads, attn.n_kv_heads, attn.n_kv_heads)

    def rotated(q: mx.array, k: mx.array, v: mx.array, a: int, c: int) -> list[mx.array]:
        """[B, c - a, heads * d] projections at positions a:c -> [B, c - a, heads, d], q and k rotated."""
        q, k, v = (y.reshape(b, c - a, h, -1) for y, h in zip((q, k, v), heads))
        if length == 1:  # one position: one product with its rotation, not six ops
            turn = _rotation(offset, rope.dims, rope.base, rope.scale)
            return [q @ turn, k @ turn, v]
        return [_rotated(q, cos[a:c], sin[a:c]), _rotated(k, cos[a:c], sin[a:c]), v]

    if stacked_codes(x, projections):
        parts = [rotated(*quantized_stack(x, projections), 0, length)]
    elif any("scales" in p for p in projections) or not _banded_product(attn.q_proj.weight):
        parts = [rotated(*(p(x) for p in projections), 0, length)]  # each product as the layer computes it
    elif length < _BANDED_POSITIONS:
        parts = [rotated(*stacked_products(x, [(p.weight, p.get("bias")) for p in projections]), 0, length)]
    else:
        parts = in_bands(lambda a, c: rotated(*(portable.linear(x[:, a:c], p.weight, p.get("bias"))
                                                for p in projections), a, c), length)
    return tuple(joined([part[i] for part in parts]).transpose(0, 2, 1, 3) for i in range(3))


@functools.lru_cache(maxsize=1)
def _rotary_table(offset: int, length: int, dims: int, base: float, scale: float) -> tuple[mx.array, mx.array]:
    """cos and sin [length, 1, dims / 2] of positions offset... times base^(-2i / dims), the
    angles in float32 as the reference computes them (Qwen2 in transformers), each cosine
    and sine then exact; built once a forward pass, not in each of its layers."""
    inverse = (1.0 / np.float32(base) ** (np.arange(0, dims, 2, dtype=np.float32) / np.float32(dims))).astype(np.float32)
    positions = (np.arange(offset, offset + length, dtype=np.float32) * np.float32(scale))[:, None]
    angles = (positions * inverse).astype(np.float64)[:, None]
    cos, sin = mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))
    mx.eval(cos, sin)  # shared by later calls, on any stream or thread
    return cos, sin


@functools.lru_cache(maxsize=1)
def _rotation(offset: int, dims: int, base: float, scale: float) -> mx.array:
    """The [dims, dims] matrix R with x @ R = _rotated(x) at position offset: the same two
    products and one sum per value, the other terms exact zeros."""
    c, s = (np.asarray(t).reshape(-1) for t in _rotary_table(offset, 1, dims, base, scale))
    half = c.size
    turn = np.zeros((2 * half, 2 * half), np.float32)
    i = np.arange(half)
    turn[i, i], turn[i + half, i], turn[i, i + half], turn[i + half, i + half] = c, -s, s, c
    turn = mx.array(turn)
    mx.eval(turn)  # shared by later calls, on any stream or thread
    return turn


def _rotated(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [B, L, heads, d] rotated as rotate-half RoPE (mx.fast.rope with traditional=False)."""
    half = x.shape[-1] // 2
    first, second = _rotate(x[..., :half], x[..., half:], cos, sin)
    return mx.concatenate([first, second], axis=-1)


@mx.compile
def _rotate(x1: mx.array, x2: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, mx.array]:
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def decoder_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask, cache) -> mx.array:
    """The decoder's attention over [B, heads, L, d] queries and [B, kv heads, S, d] keys
    and values: a causal prefill on the kernel above (MLX's CPU SDPA took a quarter of a
    304-token prefill there), the rest (one-token steps, explicit masks, quantized
    caches) as mlx-lm computes it. A causal prefill runs in chunks of query positions,
    each over the keys its last query sees, which skips most of the masked scores
    (304 positions: 0.68x the time of one chunk)."""
    length, keys = q.shape[2], k.shape[2]
    causal = isinstance(mask, str) and mask == "causal"
    if length == 1 or hasattr(cache, "bits") or not (mask is None or causal):
        return portable.decoder_attention(q, k, v, scale, mask, cache)
    b, heads, _, d = q.shape
    groups = k.shape[1]
    per = heads // groups
    q = q.reshape(b, groups, per, length, d)
    chunks = _causal_chunks(keys, length, per, q.dtype) if causal else [(0, length, None)]

    def band(a: int, c: int) -> mx.array:
        outs = []
        for start, stop, bias in chunks:
            seen = keys - length + stop
            side_by_side = q[:, a:c, :, start:stop].reshape(b, c - a, per * (stop - start), d)  # heads sharing a key head
            out = _attention(side_by_side, k[:, a:c, :seen], v[:, a:c, :seen], scale, bias)
            outs.append(out.reshape(b, c - a, per, stop - start, d))
        return mx.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]

    return joined(in_bands(band, groups)).reshape(b, heads, length, d)


@functools.lru_cache(maxsize=1)
def _causal_chunks(keys: int, length: int, heads: int, dtype: mx.Dtype) -> list[tuple[int, int, mx.array]]:
    """Query positions start:stop in chunks of at most _CAUSAL_CHUNK, each with its bias
    [keys it sees, heads * (stop - start)]: 0 where query i (at position keys - length + i)
    sees the key, -1e30 where not; built once a prefill, not in each of its layers."""
    n = -(-length // _CAUSAL_CHUNK)
    edges = [length * i // n for i in range(n + 1)]
    chunks = []
    for start, stop in zip(edges, edges[1:]):
        seen = keys - length + stop
        visible = mx.arange(seen)[:, None] <= mx.arange(seen - (stop - start), seen)[None]
        chunks.append((start, stop, mx.tile(mx.where(visible, 0.0, -1e30).astype(dtype), (1, heads))))
    mx.eval([bias for *_, bias in chunks])  # shared by later calls, on any stream or thread
    return chunks


_CAUSAL_CHUNK = 128  # 304 and 372 positions in 3 chunks: 0.68x and 0.57x the time of one


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


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """The decoder's RMSNorm. mx.fast.rms_norm runs here as its fallback, six MLX ops;
    for a decode step's few rows the sum of squares is one product and the rest one
    compiled kernel (a float32 decode step 0.94x the time, 14 alternating rounds). A
    prefill keeps mx.fast.rms_norm, 2.3x faster than this at 304 rows."""
    if x.size // x.shape[-1] > DECODE_ROWS:
        return portable.rms_norm(x, weight, eps)
    return _rms_scaled(x, (x[..., None, :] @ x[..., :, None])[..., 0], weight, eps)


@mx.compile
def _rms_scaled(x: mx.array, squares: mx.array, weight: mx.array, eps: float) -> mx.array:
    return x * mx.rsqrt(squares * (1.0 / x.shape[-1]) + eps) * weight


def mlp(x: mx.array, layer: nn.Module) -> mx.array:
    """down(silu(gate(x)) * up(x)) for the decoder's MLP; where blas_in_bands(), a
    prefill runs all of it on each band of positions, with no join in between, and a
    decode step computes gate and up as one stack (stacked_products, or quantized_stack)."""
    gate, up, down = layer.gate_proj, layer.up_proj, layer.down_proj
    if stacked_codes(x, (gate, up)):
        return down(_swiglu(*quantized_stack(x, (gate, up))))
    if any("scales" in m for m in (gate, up, down)) or not _banded_product(gate.weight):
        return down(swiglu(gate(x), up(x)))
    if not (x.ndim == 3 and x.shape[1] >= _BANDED_POSITIONS):
        return down(_swiglu(*stacked_products(x, [(gate.weight, gate.get("bias")), (up.weight, up.get("bias"))])))

    def band(a: int, b: int) -> mx.array:
        xb = x[:, a:b]
        h = _swiglu(portable.linear(xb, gate.weight, gate.get("bias")), portable.linear(xb, up.weight, up.get("bias")))
        return portable.linear(h, down.weight, down.get("bias"))

    return joined(in_bands(band, x.shape[1]))


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up for the decoder's MLP: mx.sigmoid runs a scalar software exp
    here (a 304-token prefill of the 0.5B decoder: 24 ms a layer), so silu is built
    on exp_shifted (2.9 ms), on bands of positions [B, L, hidden] in a prefill."""
    if gate.ndim != 3 or gate.shape[1] < _BANDED_POSITIONS:  # a one-token step: not worth a band's sync
        return _swiglu(gate, up)
    return joined(in_bands(lambda a, b: _swiglu(gate[:, a:b], up[:, a:b]), gate.shape[1]))


def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    fraction, exponent = _exp_minus_abs_parts(gate)
    return _silu_times(gate, fraction * exponent.view(mx.float32), up)


@mx.compile
def _exp_minus_abs_parts(x: mx.array) -> tuple[mx.array, mx.array]:
    """exp_shifted's two parts of exp(-|x|), -|x| computed in the same kernel."""
    return _exp2_parts(-mx.abs(x), 0.0)


_BANDED_POSITIONS = 16


@mx.compile
def _silu_times(g: mx.array, e: mx.array, u: mx.array) -> mx.array:
    """silu(g) u for e = exp(-|g|): (max(g, 0) + min(g, 0) e) / (1 + e) u, with max and
    min as (g + |g|) / 2 and (g - |g|) / 2, which are exact and keep the kernel vectorized."""
    a = mx.abs(g)
    return (0.5 * ((g + a) + (g - a) * e) / (1 + e)) * u


# MLX's CPU quantized matmul has no BLAS path: it multiplies row by row on one
# thread (0.5B decoder at 8 bits, 304-token prefill: 125 s against 2 s in float32).
# Here a product with few rows (decoding) multiplies the packed codes in place, and
# a larger one dequantizes the weights to float32 a block at a time into BLAS. The
# first costs per row, the second per matrix: on 4864x896 at 8 bits, 4 rows take
# 3.7 ms against 6.5 ms, 8 rows 10.3 ms against 6.9 ms.
DECODE_ROWS = 4


def quantized_matmul(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array,
                     group_size: int, bits: int) -> mx.array:
    """x @ W.T for W in MLX's affine quantization: W = scales * codes + biases per group.
    Codes that straddle words (3, 5, 6 bits) go through MLX's own kernels, on bands of
    outputs too: its decode kernel runs on one thread (4864x896 at 3 or 6 bits, one
    row: 4.0 ms, 2.1-2.3 ms on 2 bands), and a prefill's dequantized matrix stays a
    block at a time."""
    scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    rows = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    few = rows.shape[0] <= DECODE_ROWS
    if bits in _WORD_BITS:
        p = _Packing(x.shape[-1], group_size, bits)
        if few:
            y = _codes_times(rows, [(weight, scales, biases)], p)[0]
        else:
            y = _dequantized_times(rows, weight, scales, biases, lambda w, s, b: _dequantize(w, s, b, p))
    elif few:
        def product(_: int, lo: int, hi: int) -> mx.array:
            return portable.quantized_matmul(rows, weight[lo:hi], scales[lo:hi], biases[lo:hi], group_size, bits)

        y = _stack([weight.shape[0]], product, banded=weight.size * 32 // bits >= _BANDED_WEIGHTS)[0]
    else:
        y = _dequantized_times(rows, weight, scales, biases,
                               lambda w, s, b: mx.dequantize(w, s, b, group_size, bits).T)
    return y.reshape(*x.shape[:-1], weight.shape[0])


_WORD_BITS = (2, 4, 8)  # code sizes that fill whole 32-bit words


def stacked_codes(x: mx.array, layers: tuple[nn.Module, ...]) -> bool:
    """Whether quantized layers that share x go as one stack (quantized_stack): a decode
    step's few rows, and every layer packed alike, in codes that fill whole words."""
    return (x.size // x.shape[-1] <= DECODE_ROWS and all("scales" in m for m in layers)
            and len({(m.group_size, m.bits) for m in layers}) == 1 and layers[0].bits in _WORD_BITS)


def quantized_stack(x: mx.array, layers: tuple[nn.Module, ...]) -> list[mx.array]:
    """Each quantized layer's x @ W.T + b, for layers that share x in a decode step (q, k,
    v; gate, up): x taken apart by code and summed by group once, not once a layer, and
    the outputs in bands of one stack, as stacked_products has it for float matrices (a
    decode step of the 0.5B decoder 0.97x the time at 8 bits, 0.92x at 4, 25 rounds)."""
    rows = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    matrices = [(m["weight"], m["scales"].astype(mx.float32), m["biases"].astype(mx.float32)) for m in layers]
    ys = _codes_times(rows, matrices, _Packing(x.shape[-1], layers[0].group_size, layers[0].bits))
    ys = [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]
    return [y + m["bias"] if "bias" in m else y for y, m in zip(ys, layers)]


class _Packing:
    """How MLX packs codes: `pack` codes of `bits` bits a uint32 word, lowest bits first,
    `words` words a group of `group_size` inputs sharing one scale and one bias."""

    def __init__(self, inputs: int, group_size: int, bits: int):
        self.bits = bits
        self.pack = 32 // bits
        self.words = group_size // self.pack
        self.groups = inputs // group_size

    def grouped(self, weight: mx.array) -> mx.array:
        """[O, I / pack] words -> [O, groups, words]."""
        return weight.reshape(weight.shape[0], self.groups, self.words)

    def by_code(self, x: mx.array) -> list[mx.array]:
        """[N, I] -> for each code k, [N, 1, groups, words]: input 'pack * word + k' of a
        group at [..., word]; slices of one copy, so that a compiled kernel takes them as
        they are (an index taken inside it is a gather of its own, for every call)."""
        xk = mx.contiguous(x.reshape(x.shape[0], self.groups, self.words, self.pack).transpose(3, 0, 1, 2))
        return [xk[k : k + 1].reshape(x.shape[0], 1, self.groups, self.words) for k in range(self.pack)]


def _codes_times(x: mx.array, matrices: list[tuple[mx.array, mx.array, mx.array]], p: _Packing) -> list[mx.array]:
    """Few rows, for each (codes, scales, biases) of matrices that share x: sum_g scale[o, g]
    (codes . x over group g) + bias[o, g] (sum of x over g), the codes multiplied where they
    lie in one compiled kernel and each group's scale and bias applied in another, on bands
    of the matrices' stacked outputs if they are large (a small stack costs less than a
    band's synchronization). The biases as a product of their own cost two MLX ops more a
    band: a decode step 1.06x (8-bit) and 1.03x (4-bit) the time (30 alternating rounds each)."""
    xk = p.by_code(x)
    group_sums = x.reshape(x.shape[0], 1, p.groups, -1).sum(-1)  # [N, 1, groups]

    def product(i: int, lo: int, hi: int) -> mx.array:
        weight, scales, biases = matrices[i]
        products = _unpack_multiply(p.grouped(weight[lo:hi]).view(mx.int32), xk, p.bits)
        return _scaled_groups(products.sum(-1), scales[lo:hi], biases[lo:hi], group_sums).sum(-1)

    codes = sum(weight.size for weight, _, _ in matrices) * p.pack
    return _stack([weight.shape[0] for weight, _, _ in matrices], product, banded=codes >= _BANDED_WEIGHTS)


_BANDED_WEIGHTS = 1 << 21


@mx.compile
def _scaled_groups(code_sums: mx.array, scales: mx.array, biases: mx.array, x_sums: mx.array) -> mx.array:
    """scale (codes . x) + bias (sum of x) for each group: [N, O, groups]."""
    return code_sums * scales + x_sums * biases


@mx.compile
def _unpack_multiply(w: mx.array, xk: list[mx.array], bits: int) -> mx.array:
    """Each code of the words w [O, groups, words] times its input xk[k] [N, 1, groups, words],
    summed over the codes of a word: [N, O, groups, words]. The words are read as int32
    (the mask drops the sign's bits), which converts to float32 in one instruction; the
    sum over codes is a tree, which keeps the kernel shallow enough to stay one."""
    mask = (1 << bits) - 1
    terms = [((w >> (bits * k)) & mask).astype(mx.float32) * x for k, x in enumerate(xk)]
    while len(terms) > 1:
        terms = [a + b for a, b in zip(terms[::2], terms[1::2])] + terms[len(terms) // 2 * 2 :]
    return terms[0]


def _dequantized_times(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array,
                       dequantize: Callable[[mx.array, mx.array, mx.array], mx.array]) -> mx.array:
    """Many rows: W dequantized to float32 (`dequantize` gives W.T of some rows of it) a
    block of outputs at a time, each block unpacked in bands on every core, and
    multiplied through BLAS. Only one block is in float32 at a time, so memory stays
    quantized."""
    banded = blas_in_bands()  # the products too, each on its band's stream

    def block(a: int, b: int) -> mx.array:
        def band(c: int, d: int) -> mx.array:
            w = dequantize(weight[a + c : a + d], scales[a + c : a + d], biases[a + c : a + d])
            return x @ w if banded else w

        columns = in_bands(band, b - a)
        return mx.concatenate(columns if banded else [x @ w for w in columns], axis=-1)

    step = max(1, _DEQUANT_BLOCK // x.shape[-1])
    edges = list(range(0, weight.shape[0], step)) + [weight.shape[0]]
    return mx.concatenate([block(a, b) for a, b in zip(edges, edges[1:])], axis=-1)


_DEQUANT_BLOCK = 1 << 24  # weights: 64 MB in float32 (the 0.5B decoder's largest matrix is 4.4 M)


def _dequantize(weight: mx.array, scales: mx.array, biases: mx.array, p: _Packing) -> mx.array:
    """[O, I / pack] words -> float32 W.T [I, O].

    Transposed, every input of the kernel steps by 1 along the outputs, the only axis
    along which both the words and the scales vary, so g++ vectorizes it (in W's own
    layout the scales are broadcast along the codes of a group and the loop stays
    scalar: 4864x896 at 4 bits 5.2 ms, transposed words included 2.9 ms). The codes of
    a word come out side by side along the inputs, in W's own order, so x multiplies it
    as it is (putting x in code order instead cost a copy of x: the down projection
    with 304 rows 1.47x float32's time at 8 bits, 1.24x without). SSE2 has no shift by a
    count per lane, so code k comes out of its word by a mask per lane and float
    arithmetic (_unmask_codes)."""
    outputs = weight.shape[0]
    words = mx.contiguous(weight.view(mx.int32).T).reshape(p.groups, p.words, 1, outputs)
    masks, steps = _code_masks(p.bits, outputs)
    scales, biases = (mx.contiguous(a.T)[:, None, None] for a in (scales, biases))
    return _unmask_codes(words, masks, steps, float(1 << p.bits), scales, biases).reshape(-1, outputs)


@functools.lru_cache(maxsize=16)
def _code_masks(bits: int, outputs: int) -> tuple[mx.array, mx.array]:
    """For code k of a word, along axis 2: its bits' mask as int32 and 2^(-bits k),
    each repeated along the outputs, [1, 1, 32 / bits, outputs]."""
    k = np.arange(32 // bits)
    masks = ((((1 << bits) - 1) << (bits * k)).astype(np.uint32).view(np.int32))
    steps = (2.0 ** (-bits * k)).astype(np.float32)
    made = tuple(mx.array(np.repeat(a[None, None, :, None], outputs, axis=3)) for a in (masks, steps))
    mx.eval(made)  # shared by later calls, on any stream or thread
    return made


@mx.compile
def _unmask_codes(words: mx.array, masks: mx.array, steps: mx.array, levels: float, scales: mx.array,
                  biases: mx.array) -> mx.array:
    """scale * code + bias for code k = (word & mask_k) 2^(-bits k). As an int32 the top
    code's bits are signed: it comes out as code - levels, so t = that + levels is taken
    mod levels (t < 2 levels). Every value here is exact in float32."""
    t = (words & masks).astype(mx.float32) * steps + levels
    code = t - levels * (t * (1.0 / levels)).astype(mx.int32).astype(mx.float32)
    return code * scales + biases
