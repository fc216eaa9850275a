"""The CPU tower's hand-written kernels against MLX's own ops, at sizes and value
ranges the fixture's tiny tower does not reach."""

import ctypes
import math

import mlx.core as mx
import numpy as np
import pytest

from fastvlm_mlx.kernels import cpu, portable
from fastvlm_mlx.kernels.cpu import _attention, depthwise_conv, exp_shifted, gelu, in_bands, joined, swiglu


def test_exp_shifted_matches_exp_over_the_float_range():
    x = mx.concatenate([mx.linspace(-200.0, 0.0, 200_001), -(10.0 ** mx.linspace(3, 38, 1000))])
    got = np.asarray(exp_shifted(x, mx.array(0.0)), dtype=np.float64)
    want = np.exp(np.asarray(x, dtype=np.float64))
    normal = want > 1.2e-38
    assert np.all(np.isfinite(got)) and np.all(got[200_001:] == 0.0)
    rel = np.abs(got[normal] - want[normal]) / want[normal]
    # rounding x * log2(e) to float32 costs |x| * 6e-8, as it does in mx.exp
    assert np.max(rel / (1 + np.abs(np.asarray(x)[normal]))) < 1.5e-7  # mx.exp: 7.2e-8
    assert np.max(got[~normal]) < 1.2e-38  # underflow goes to 0, never to garbage
    assert got[200_000] == 1.0
    shifted = exp_shifted(mx.array([[1.5, -2.25, 7.0]]), mx.array([[7.0]]))
    assert np.allclose(shifted, np.exp([-5.5, -9.25, 0.0]), rtol=5e-7, atol=0)


def test_attention_matches_sdpa_on_peaked_scores():
    q, k, v = (mx.random.normal((1, 4, 300, 32), key=mx.random.key(i)) for i in range(3))
    q = q * 8  # scores spread over ~100: the softmax is nearly one-hot in places
    got = joined(in_bands(lambda a, b: _attention(q[:, a:b], k[:, a:b], v[:, a:b], 32**-0.5), 4))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=32**-0.5)
    assert mx.abs(got - want).max().item() < 1e-5 * mx.abs(want).max().item()


@pytest.mark.parametrize("in_ch,out_ch,kernel,stride", [(8, 8, 7, 1), (8, 8, 3, 2), (8, 16, 7, 2)])
def test_depthwise_shift_add_matches_conv2d(in_ch, out_ch, kernel, stride):
    weight = mx.random.normal((out_ch, kernel, kernel, 1), key=mx.random.key(1))
    bias = mx.random.normal((out_ch,), key=mx.random.key(2))
    x = mx.random.normal((1, 37, 29, in_ch), key=mx.random.key(3))
    want = mx.conv2d(x, weight, stride, kernel // 2, groups=in_ch) + bias
    got = depthwise_conv(x, weight, bias, stride)
    assert got.shape == want.shape
    # float32 rounding of a 49-term sum in another order: at most 3.8e-7 over 30 inputs
    assert mx.abs(got - want).max().item() < 1e-6 * mx.abs(want).max().item()


def test_gelu_matches_erf_form():
    x = mx.linspace(-12.0, 12.0, 100_001).reshape(1, 1, -1, 1)
    xs = np.asarray(x, dtype=np.float64).ravel()
    want = 0.5 * xs * (1 + np.array([math.erf(v / math.sqrt(2)) for v in xs]))
    got = np.asarray(gelu(x), dtype=np.float64).ravel()
    assert np.max(np.abs(got - want)) < 3e-6
    # Past the clip GELU(x) is x or 0 in float32; the clip must not lose that to rounding.
    big = np.array([1e3, 1e8, 1e30, -1e3, -1e8, -1e30])
    got = np.asarray(gelu(mx.array(big).reshape(1, 1, -1, 1)), dtype=np.float64).ravel()
    assert np.all(np.abs(got - np.maximum(big, 0)) <= 1e-6 * np.abs(big))


@pytest.fixture(params=["bands", "small-products", "threads"],
                ids=["blas-in-bands", "blas-small-products", "blas-threads"])
def banded(request, monkeypatch):
    """Every way the CPU kernels run matmuls: in bands, one per stream (a BLAS that runs a
    call on one thread), those bands of a decode step cut into small products too
    (OpenBLAS's small-matrix kernel), or one call each (any other BLAS)."""
    monkeypatch.setattr(cpu, "blas_in_bands", lambda: request.param != "threads")
    monkeypatch.setattr(cpu, "small_products", lambda: request.param == "small-products")
    monkeypatch.setattr(cpu, "_SMALL_PRODUCT", 5000)  # test matrices cut into many, the last one short
    return request.param != "threads"


def test_decoder_mlp_silu_matches_mlx_lm(banded):
    from mlx_lm.models import qwen2

    from fastvlm_mlx.fastvlm import MLP

    g = mx.concatenate([mx.linspace(-30.0, 30.0, 100_001), mx.array([-1e30, -1e8, 1e8, 1e30])])
    gs = np.asarray(g, dtype=np.float64)
    want = gs * 0.5 * (1 + np.tanh(gs / 2))  # silu, without overflow
    got = np.asarray(swiglu(g, mx.ones_like(g)), dtype=np.float64)
    assert np.all(np.abs(got - want) <= 1e-6 * np.maximum(np.abs(want), 1e-2))
    mlp = MLP(128, 512)  # large enough to run in bands
    for shape in ((1, 1, 128), (3, 1, 128), (1, 7, 128), (1, 40, 128)):  # decode (batched), a short turn, a prefill
        x = mx.random.normal(shape, key=mx.random.key(3)) * 4
        want = qwen2.MLP.__call__(mlp, x)  # mlx-lm's own swiglu
        assert mx.abs(cpu.mlp(x, mlp) - want).max().item() <= 1e-5 * mx.abs(want).max().item()


@pytest.mark.parametrize("shape", [(1, 1, 896), (3, 1, 896), (1, 2, 896), (1, 40, 896)])  # decode (batched), a prefill
def test_rms_norm_matches_mlx(shape):
    x = mx.random.normal(shape, key=mx.random.key(10)) * 3
    weight = mx.random.normal((896,), key=mx.random.key(11))
    want = mx.fast.rms_norm(x, weight, 1e-6)
    got = cpu.rms_norm(x, weight, 1e-6)
    assert got.shape == want.shape
    assert mx.abs(got - want).max().item() <= 1e-6 * mx.abs(want).max().item()
    tiny, want = cpu.rms_norm(x * 1e-5, weight, 1e-6), mx.fast.rms_norm(x * 1e-5, weight, 1e-6)  # eps matters
    assert mx.abs(tiny - want).max().item() <= 1e-6 * mx.abs(want).max().item()


def test_blas_runs_a_call_on_one_thread_where_matmuls_run_in_bands():
    from fastvlm_mlx.utils import blas_library

    blas = blas_library()
    if blas["reference"]:  # the mlx wheel's own: always one thread, no small-matrix kernel
        assert cpu.blas_in_bands() and not cpu.small_products()
    elif blas["name"] == "OpenBLAS":
        assert cpu.blas_in_bands()
        threads = ctypes.CDLL(blas["path"]).openblas_get_num_threads
        assert threads() == 1
        with cpu.blas_threads():  # lent back to other code, as bench.compare lends it to mlx-vlm
            assert threads() == cpu._openblas_own_threads[0] >= 1
        assert threads() == 1
    else:
        assert not cpu.blas_in_bands() and not cpu.small_products()


@pytest.mark.parametrize("shape", [(1, 40, 96), (2, 3, 96), (3, 1, 96), (1, 96), (1, 5, 96)])  # prefill, batched turns, batched decode, head, short
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_matmul(banded, shape, bias):
    outputs = cpu._BANDED_WEIGHTS_BLAS // 96 + 37  # large enough to be split by outputs
    w = mx.random.normal((outputs, 96), key=mx.random.key(1))
    b = mx.random.normal((outputs,), key=mx.random.key(2)) if bias else None
    x = mx.random.normal(shape, key=mx.random.key(3))
    want = x @ w.T + (b if bias else 0)
    got = cpu.linear(x, w, b)
    assert got.shape == want.shape == (*shape[:-1], outputs)
    assert mx.abs(got - want).max().item() <= 1e-6 * mx.abs(want).max().item()
    small = cpu.linear(x, w[:40], b[:40] if bias else None)  # too small to split
    assert mx.abs(small - want[..., :40]).max().item() <= 1e-6 * mx.abs(want).max().item()


@pytest.mark.parametrize("rows", [(1, 1, 96), (3, 96)])  # a decode step, batched
def test_stacked_products_match_matmul(banded, rows):
    """Matrices sharing an input, stacked into bands that begin and end inside them
    (840 outputs in 2, 3 or 4 bands: inside the first, or the second), with and without bias."""
    weights = [mx.random.normal((n, 96), key=mx.random.key(n)) for n in (700, 50, 90)]
    biases = [mx.random.normal((700,), key=mx.random.key(8)), None, mx.random.normal((90,), key=mx.random.key(8))]
    x = mx.random.normal(rows, key=mx.random.key(9))
    got = cpu.stacked_products(x, list(zip(weights, biases)))
    for out, w, b in zip(got, weights, biases):
        want = x @ w.T + (0 if b is None else b)
        assert out.shape == want.shape == (*rows[:-1], w.shape[0])
        assert mx.abs(out - want).max().item() <= 1e-6 * mx.abs(want).max().item()


@pytest.mark.parametrize("outputs, step", [(359, 52), (360, 45)])  # prime: a shorter last piece; even pieces
@pytest.mark.parametrize("rows", [1, 3])
def test_cut_product_matches_matmul(outputs, step, rows):
    assert cpu._even_step(outputs, 52) == step
    w = mx.random.normal((outputs, 96), key=mx.random.key(12))
    b = mx.random.normal((outputs,), key=mx.random.key(13))
    x = mx.random.normal((rows, 96), key=mx.random.key(14))
    want = x @ w.T + b
    got = cpu._cut_product(x, w, b, 52)
    assert got.shape == want.shape
    assert mx.abs(got - want).max().item() <= 1e-6 * mx.abs(want).max().item()


def test_pointwise_ffn_matches_the_portable_one(banded):
    from fastvlm_mlx.fastvithd import ConvFFN

    ffn = ConvFFN(128, 512)  # a fc1 large enough to run in bands
    ffn.fc1.bias = mx.random.normal((512,), key=mx.random.key(4))
    ffn.fc2.bias = mx.random.normal((128,), key=mx.random.key(6))
    x = mx.random.normal((1, 20, 12, 128), key=mx.random.key(5))
    want = portable.pointwise_ffn(x, ffn.fc1, ffn.fc2)
    got = cpu.pointwise_ffn(x, ffn.fc1, ffn.fc2)
    assert mx.abs(got - want).max().item() <= 1e-5 * mx.abs(want).max().item()


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 64), (4, 128), (6, 32), (8, 32), (8, 64)])
@pytest.mark.parametrize("rows", [(1, 1), (3,), (2, 2), (1, 40)])  # decode, batched decode, prefill
def test_quantized_matmul_matches_mlx(banded, monkeypatch, bits, group_size, rows):
    """Both CPU paths (codes multiplied in place, dequantized into BLAS) against the
    product with MLX's own dequantized matrix, on one large enough to be split into bands
    (and a prefill's dequantized matrix into blocks, the last one short)."""
    monkeypatch.setattr(cpu, "_DEQUANT_BLOCK", 3000 * 512)
    outputs = 2 * cpu._BANDED_WEIGHTS // 512 + 40
    w = mx.random.normal((outputs, 512), key=mx.random.key(bits * group_size))
    q, scales, biases = mx.quantize(w, group_size, bits)
    x = mx.random.normal((*rows, 512), key=mx.random.key(7)) * 3
    want = x @ mx.dequantize(q, scales, biases, group_size, bits).T
    got = cpu.quantized_matmul(x, q, scales, biases, group_size, bits)
    assert got.shape == want.shape == (*rows, outputs)
    assert mx.abs(got - want).max().item() <= 1e-5 * mx.abs(want).max().item()
    if rows == (3,):  # MLX's own quantized matmul agrees (too slow on this backend for more rows)
        mine = portable.quantized_matmul(x, q, scales, biases, group_size, bits)
        assert mx.abs(got - mine).max().item() <= 1e-5 * mx.abs(want).max().item()
    # and in the checkpoint's half-precision scales, as a bfloat16 model stores them
    got = cpu.quantized_matmul(x, q, scales.astype(mx.bfloat16), biases.astype(mx.bfloat16), group_size, bits)
    half = [a.astype(mx.bfloat16).astype(mx.float32) for a in (scales, biases)]
    want = x @ mx.dequantize(q, *half, group_size, bits).T
    assert mx.abs(got - want).max().item() <= 1e-5 * mx.abs(want).max().item()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("bands", [1 << 10, 1 << 30], ids=["bands", "one-stream"])
@pytest.mark.parametrize("rows", [(1, 1), (3,)])  # a decode step, batched
def test_quantized_stack_matches_each_layer(monkeypatch, bits, bands, rows):
    """Quantized layers sharing an input (q, k, v; gate, up) as one stack, in bands that
    begin and end inside them (840 outputs on the streams), with and without bias,
    against each layer on its own."""
    import mlx.nn as nn

    from fastvlm_mlx.fastvlm import quantize

    monkeypatch.setattr(cpu, "_BANDED_WEIGHTS", bands)
    layers = [nn.Linear(512, n, bias=b) for n, b in ((700, True), (50, False), (90, True))]
    for layer in layers:
        if "bias" in layer:
            layer.bias = mx.random.normal(layer.bias.shape, key=mx.random.key(layer.bias.shape[0]))
    holder = nn.Sequential(*layers)
    quantize(holder, 64, bits, lambda _, m: isinstance(m, nn.Linear))
    layers = tuple(holder.layers)
    x = mx.random.normal((*rows, 512), key=mx.random.key(9)) * 3
    assert cpu.stacked_codes(x, layers)
    for got, layer in zip(cpu.quantized_stack(x, layers), layers):
        want = x @ mx.dequantize(layer.weight, layer.scales, layer.biases, 64, bits).T
        want = want + layer.bias if "bias" in layer else want
        assert got.shape == want.shape == (*rows, layer.weight.shape[0])
        assert mx.abs(got - want).max().item() <= 1e-5 * mx.abs(want).max().item()
        alone = layer(x)  # the layer's own call: one matrix through the same kernels
        assert mx.abs(got - alone).max().item() <= 1e-6 * mx.abs(want).max().item()
    # not a stack: more rows than a decode step, codes packed differently, a float layer
    assert not cpu.stacked_codes(mx.zeros((1, cpu.DECODE_ROWS + 1, 512)), layers)
    other = nn.Sequential(nn.Linear(512, 64), nn.Linear(512, 64), nn.Linear(512, 64))
    quantize(other, 32, bits, lambda path, m: path != "layers.2")
    assert not cpu.stacked_codes(x, (layers[0], other.layers[0]))  # group size 32 against 64
    assert not cpu.stacked_codes(x, tuple(other.layers))  # the last one in float
    three = nn.Sequential(nn.Linear(512, 64))
    quantize(three, 64, 3, lambda _, m: True)
    assert not cpu.stacked_codes(x, (three.layers[0],))  # 3-bit codes straddle words


def _tiny_qwen2():
    """A small Qwen2's arguments: 4 query heads of 64 on 2 key heads, as the decoder's layout."""
    from mlx_lm.models import qwen2

    return qwen2.ModelArgs(model_type="qwen2", hidden_size=256, num_hidden_layers=1, intermediate_size=512,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=64,
                           rope_theta=1e6)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_decoder_layer_stacks_match_each_layer(banded, bits):
    """A quantized decoder's attention inputs and MLP in a decode step (q, k, v and gate,
    up as stacks) against the same layers called one by one, as mlx-lm calls them."""
    from mlx_lm.models import qwen2

    from fastvlm_mlx.fastvlm import MLP, Attention, quantize

    attn, mlp = Attention(_tiny_qwen2()), MLP(256, 4096)  # gate and up large enough for bands
    for module in (attn, mlp):
        quantize(module, 64, bits, lambda _, m: hasattr(m, "to_quantized"))
        mx.eval(module.parameters())
    for shape in ((1, 1, 256), (3, 1, 256)):
        x = mx.random.normal(shape, key=mx.random.key(5)) * 3
        assert cpu.stacked_codes(x, (mlp.gate_proj, mlp.up_proj))
        want = qwen2.MLP.__call__(mlp, x)
        assert mx.abs(cpu.mlp(x, mlp) - want).max().item() <= 1e-5 * mx.abs(want).max().item()
        for mine, theirs in zip(cpu.attention_inputs(x, attn, 40), portable.attention_inputs(x, attn, 40)):
            assert mx.abs(mine - theirs).max().item() <= 2e-5 * mx.abs(theirs).max().item()


def _rotary_reference(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Rotate-half RoPE over [L, heads, d], the angles in float32 as transformers' Qwen2
    computes them (the reference), everything else in float64."""
    d = x.shape[-1]
    inverse = 1.0 / np.float32(base) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    angles = (positions.astype(np.float32)[:, None] * inverse.astype(np.float32)).astype(np.float64)[:, None]
    first, second = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([first * np.cos(angles) - second * np.sin(angles),
                           second * np.cos(angles) + first * np.sin(angles)], axis=-1)


@pytest.mark.parametrize("length,offset", [(40, 0), (300, 60), (7, 3), (1, 90)])  # prefills, a short turn, decode
def test_attention_inputs_match_the_reference_rotation(banded, length, offset):
    from fastvlm_mlx.fastvlm import Attention

    attn = Attention(_tiny_qwen2())
    mx.eval(attn.parameters())
    x = mx.random.normal((1, length, 256), key=mx.random.key(4))
    got = cpu.attention_inputs(x, attn, offset)
    positions = np.arange(offset, offset + length)
    xs = np.asarray(x, dtype=np.float64)[0]
    for out, proj, heads, rotated in zip(got, (attn.q_proj, attn.k_proj, attn.v_proj), (4, 2, 2), (True, True, False)):
        y = xs @ np.asarray(proj.weight, dtype=np.float64).T + np.asarray(proj.bias, dtype=np.float64)
        y = y.reshape(length, heads, 64)
        want = (_rotary_reference(y, positions, 1e6) if rotated else y).transpose(1, 0, 2)[None]
        assert out.shape == want.shape
        assert np.abs(np.asarray(out) - want).max() <= 2e-6 * np.abs(want).max()
    # and as mlx-lm computes them (mx.fast.rope, whose float32 angles differ a little)
    for mine, theirs in zip(got, portable.attention_inputs(x, attn, offset)):
        assert mx.abs(mine - theirs).max().item() <= 2e-5 * mx.abs(theirs).max().item()


@pytest.mark.parametrize("length,cached", [(300, 0), (200, 50), (7, 20), (1, 30)])
@pytest.mark.parametrize("mask", ["causal", None])
def test_decoder_attention_matches_mlx_lm(length, cached, mask):
    """Grouped-query attention (14 heads on 2 key heads, as the 0.5B decoder), causal or
    not, over a prompt alone and after a cached prefix (queries at the end); 200 and 300
    positions run in chunks of queries."""
    q = mx.random.normal((1, 14, length, 64), key=mx.random.key(1)) * 3
    k, v = (mx.random.normal((1, 2, cached + length, 64), key=mx.random.key(i)) for i in (2, 3))
    want = portable.decoder_attention(q, k, v, 64**-0.5, mask, None)
    got = cpu.decoder_attention(q, k, v, 64**-0.5, mask, None)
    assert got.shape == want.shape
    assert mx.abs(got - want).max().item() < 1e-5 * mx.abs(want).max().item()
