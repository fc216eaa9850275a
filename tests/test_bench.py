"""The TTFT bench: FLOP counts, the sweep on a tiny random model, the CLI's outputs."""

import json
import sys
from collections import Counter
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest
import typer
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
from typer.testing import CliRunner

from conftest import CHECKPOINT
from fastvlm_mlx import kernels
from fastvlm_mlx.bench import cli as bench_cli
from fastvlm_mlx.bench import decoder as decoder_bench
from fastvlm_mlx.bench import harness
from fastvlm_mlx.bench import tower as tower_bench
from fastvlm_mlx.bench.flops import decoder_flops, matmul_peak, projector_flops, vision_flops
from fastvlm_mlx.bench.harness import (SAMPLES, STAGES, measure,
                                       prompt_ids, random_config, random_model, time_run)
from fastvlm_mlx.errors import FastVLMError
from fastvlm_mlx.fastvithd import MHSA, Conv2d, ConvFFN, VisionConfig
from fastvlm_mlx.fastvlm import IMAGE_TOKEN_INDEX, Model, ModelArgs
from fastvlm_mlx.utils import blas_library
from fastvlm_mlx.utils import load_tokenizer

TINY_CONFIG = json.loads((CHECKPOINT / "config.json").read_text())

# DESIGN.md: FastViTHD GFLOP per resolution, from a FLOP counter on the reference.
PUBLISHED_GFLOP = {256: 30, 512: 119, 768: 270, 1024: 487, 1152: 621}


@pytest.mark.parametrize("resolution, gflop", PUBLISHED_GFLOP.items())
def test_vision_flops_match_the_published_figures(resolution, gflop):
    flops = vision_flops(VisionConfig(), resolution)  # from shapes: nothing is computed
    assert flops / 1e9 == pytest.approx(gflop, rel=0.02)


def test_decoder_flops_follow_the_weights_and_causal_attention():
    args = qwen2.ModelArgs.from_dict({**random_config("0.5b"), "model_type": "qwen2"})
    weights = dict(tree_flatten(qwen2.Model(args).parameters()))  # lazy, never evaluated
    matmul = sum(v.size for k, v in weights.items() if k.endswith("proj.weight"))
    head = args.hidden_size * args.vocab_size
    attention = 2 * args.hidden_size * args.num_hidden_layers  # one query, one key
    assert decoder_flops(args, 1) == 2 * (matmul + head + attention)
    # A prompt of T tokens costs what T-1 tokens and one more decode step cost,
    # less the LM head that only the last position runs.
    T = 300
    assert decoder_flops(args, T) == (decoder_flops(args, T - 1) + decoder_flops(args, 1, T - 1)
                                      - 2 * head)


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY_CONFIG, mx.float32)


def test_projector_flops(tiny):
    """The analytic count agrees with the projector's own weights."""
    weights = [v.size for k, v in tree_flatten(tiny.mm_projector.parameters()) if k.endswith("weight")]
    d, mm = tiny.args.text_config.hidden_size, tiny.args.mm_hidden_size
    assert projector_flops(mm, d, 16) == 2 * 16 * sum(weights)


def test_random_tower_keeps_activations_alive():
    """With published depths, the folded skips keep every stage's output far from the
    ~1e-15 it falls to without them (seen: 1e-4 at worst across seeds)."""
    mx.random.seed(0)
    config = {**TINY_CONFIG, "vision_config": {**TINY_CONFIG["vision_config"],
                                               "layers": [2, 12, 24, 4, 2]}}
    tower = random_model(config, mx.float32).vision_tower
    x = mx.random.uniform(shape=(1, 128, 128, 3))
    for layer in tower.patch_embed:
        x = layer(x)
    for stage in tower.network:
        for block in stage if isinstance(stage, list) else [stage]:
            x = block(x)
        assert mx.isfinite(x).all() and mx.abs(x).mean().item() > 1e-6


def test_tower_breakdown_counts_each_layer_and_flop_once():
    """bench.tower: every conv, ConvFFN and attention call timed under its kind, nested
    ones not twice, FLOPs adding up to the whole tower's, and the model left as it was."""
    model = random_model(TINY_CONFIG, mx.float32)
    tower, config = model.vision_tower, model.args.vision_config
    before = {cls: cls.__call__ for cls in tower_bench.KINDS}
    _, timed, kinds = tower_bench.breakdown(tower, 128, runs=1)
    run = kinds[0]
    assert sum(k.flops for k in run.values()) == vision_flops(config, 128)
    ffns = [m for _, m in tower.named_modules() if isinstance(m, ConvFFN)]
    convs = [m for _, m in tower.named_modules() if isinstance(m, Conv2d)]
    if kernels.selected() is kernels.cpu:  # a ConvFFN's 1x1 convs run fused with its GELU, not as calls
        convs = [c for c in convs if not any(c is f.fc1 or c is f.fc2 for f in ffns)]
    expected = Counter(tower_bench.conv_kind(c) for c in convs)
    expected["ConvFFN 1x1 convs + GELU"] = len(ffns)
    expected["attention (MHSA)"] = sum(isinstance(m, MHSA) for _, m in tower.named_modules())
    assert {name: k.calls for name, k in run.items()} == +expected
    assert all(k.seconds > 0 for k in run.values()) and sum(k.seconds for k in run.values()) < timed[0]
    assert {cls: cls.__call__ for cls in tower_bench.KINDS} == before


def test_tower_convffn_products_alone():
    """bench.tower's ConvFFN products: every ConvFFN once, with the FLOPs its kind counts
    in the breakdown, computed with the GELU replaced by the identity (fc2 of fc1's
    product then; the CPU kernels add fc1's bias in their GELU, so it goes with it), and
    the GELU back in place afterwards."""
    model = random_model(TINY_CONFIG, mx.float32)
    tower = model.vision_tower
    gelus = kernels.cpu._gelu_rational, kernels.portable.gelu
    seconds, flops, calls = tower_bench.convffn_products(tower, 128, runs=2)
    ffns = [m for _, m in tower.named_modules() if isinstance(m, ConvFFN)]
    assert calls == len(ffns) and len(seconds) == 2 and all(s > 0 for s in seconds)
    _, _, kinds = tower_bench.breakdown(tower, 128, runs=1)
    if kernels.selected() is kernels.cpu:  # on the portable path those FLOPs count as 1x1 convs
        assert flops == kinds[0]["ConvFFN 1x1 convs + GELU"].flops
    fc1, fc2 = ffns[0].fc1, ffns[0].fc2
    fc1.bias = mx.random.normal(fc1.bias.shape)
    x = mx.random.normal((1, 8, 8, fc1.weight.shape[-1]))
    with tower_bench.identity_gelu():
        alone = kernels.pointwise_ffn(x, fc1, fc2)
    hidden = fc1(x) - fc1.bias if kernels.selected() is kernels.cpu else fc1(x)
    assert mx.allclose(alone, fc2(hidden), atol=1e-5).item()
    assert (kernels.cpu._gelu_rational, kernels.portable.gelu) == gelus


def test_decoder_prefill_products_leave_out_only_the_silu(tiny):
    """bench.decoder's products alone: with the silu replaced, an MLP computes
    down(gate(x)) with up(x) still evaluated (its product is timed), and the silu is back
    afterwards; the timing covers the model's layers."""
    mlp = tiny.language_model.model.layers[0].mlp
    x = mx.random.normal((1, 40, tiny.args.text_config.hidden_size))  # a prefill: bands where the CPU has them
    before = kernels.cpu._swiglu, kernels.portable.swiglu
    with decoder_bench.identity_swiglu():
        alone = mlp(x)
    assert mx.allclose(alone, mlp.down_proj(mlp.gate_proj(x)), atol=1e-5).item()
    assert (kernels.cpu._swiglu, kernels.portable.swiglu) == before
    assert not mx.allclose(mlp(x), alone, atol=1e-3).item()
    assert decoder_bench.prefill_products(tiny, 40, repeats=1) > 0


def test_decoder_step_with_trivial_products(tiny):
    """bench.decoder's step without products: a product, on either kernel path and
    however large (the CPU path cuts large ones in bands), comes out as its input's first
    column in the product's shape; the patches are undone afterwards; both steps are timed."""
    x, weight = mx.random.normal((1, 1, 256)), mx.random.normal((10000, 256))
    before = kernels.cpu._cut_product, kernels.portable.linear
    # on the CPU path: banded, and cut into pieces as with OpenBLAS's small-matrix kernel
    with mock.patch.object(kernels.cpu, "small_products", lambda: True), decoder_bench.trivial_products():
        y = kernels.linear(x, weight)
        head = tiny.lm_head(x[..., : tiny.args.text_config.hidden_size])
    assert y.shape == (1, 1, 10000) and mx.array_equal(y, mx.broadcast_to(x[..., :1], y.shape)).item()
    assert mx.array_equal(head, mx.broadcast_to(x[..., :1], head.shape)).item()
    assert (kernels.cpu._cut_product, kernels.portable.linear) == before
    assert mx.allclose(kernels.linear(x, weight), x @ weight.T, atol=1e-4).item()
    whole, rest = decoder_bench.decode_steps(tiny, list(range(1, 9)), rounds=1)
    assert whole > 0 and rest > 0 and decoder_bench.op_seconds(10) > 0


def test_sweep_on_a_tiny_random_model(tiny):
    ids = prompt_ids(None, 8, tiny.args.text_config.vocab_size)
    assert len(ids) == 9 and ids.count(IMAGE_TOKEN_INDEX) == 1
    resolutions = [64, 128, 192]
    events = list(measure(tiny, ids, resolutions, runs=3, warmup=1, max_tokens=3))
    assert len(events) == len(resolutions) * 4
    results = [r for r, i in events if i == 0]  # one per resolution, in order
    assert all(r is results[resolutions.index(r.resolution)] for r, _ in events)
    assert [r.resolution for r in results] == resolutions
    for r in results:
        assert r.visual_tokens == (r.resolution // 64) ** 2
        assert r.prefill_tokens == 8 + r.visual_tokens
        assert r.runs == 3 and len(r.warmup_samples["ttft_s"]) == 1
        assert set(r.samples) == set(SAMPLES)
        for i in range(r.runs):  # TTFT of a run is exactly the sum of its stages
            parts = sum(r.samples[f"{s}_s"][i] for s in STAGES)
            assert r.samples["ttft_s"][i] == pytest.approx(parts, rel=1e-9)
        # The median of sums is not the sum of medians, but both lie between
        # the sums of the stages' minima and maxima: the gap is at most the
        # stages' total spread.
        summary = r.summary()
        gap = abs(summary["ttft_s"]["median"] - sum(summary[f"{s}_s"]["median"] for s in STAGES))
        spread = sum(np.ptp(r.samples[f"{s}_s"]) for s in STAGES)
        assert gap <= spread + 1e-9
        assert r.flops["ttft"] == r.flops["vision"] + r.flops["projector"] + r.flops["prefill"]
        assert r.peak_memory > 0


def test_prompt_with_the_chat_template():
    tokenizer = load_tokenizer(CHECKPOINT)
    ids = prompt_ids(tokenizer, 48, 0)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert abs(len(ids) - 1 - 48) <= 2  # the filler is cut in tokens, then re-tokenized
    with pytest.raises(FastVLMError, match="--prompt-tokens must be more than"):
        prompt_ids(tokenizer, 5, 0)


def test_matmul_peak_and_blas():
    gflops, n = matmul_peak(mx.float32)
    assert gflops > 0 and n >= 256
    if sys.platform == "linux":
        assert blas_library()["name"]


@pytest.mark.parametrize("size, params", [
    ("0.5b", 494_032_768), ("1.5b", 1_543_714_304), ("7b", 7_615_616_512),  # Qwen2's own counts
])
def test_random_shapes_are_the_published_ones(size, params):
    model = Model(ModelArgs.from_dict(random_config(size)))  # lazy: nothing is allocated
    assert sum(v.size for _, v in tree_flatten(model.language_model.parameters())) == params
    assert model.args.vision_config == VisionConfig()


runner = CliRunner()


def invoke(*args: str):
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(bench_cli.bench)
    return runner.invoke(app, list(args))


SMALL = ["--resolutions", "64,128", "--runs", "2", "--warmup", "1", "--max-tokens", "3"]


def test_json_has_every_field(tmp_path):
    out = tmp_path / "bench.json"
    r = invoke("--model", str(CHECKPOINT), *SMALL, "--json", str(out))
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["complete"] is True
    assert set(data) == {"complete", "environment", "model", "settings", "matmul_peak",
                         "memory_bound", "flop_convention", "results"}
    assert {"device", "mlx", "mlx_lm", "blas", "dtype", "platform"} <= set(data["environment"])
    assert data["environment"]["dtype"] == "float32"
    assert set(data["model"]) == {"source", "vision", "decoder", "parameters", "weights_bytes", "load_s"}
    assert data["model"]["decoder"]["hidden_size"] == 64 and data["model"]["load_s"] > 0
    assert data["settings"] == {"resolutions": [64, 128], "prompt_tokens": 48, "max_tokens": 3,
                                "runs": 2, "warmup": 1, "fastv": None}
    assert set(data["matmul_peak"]) == {"gflops", "size", "dtype"}
    bound = data["memory_bound"]
    decoder = data["model"]["decoder"]
    embedding = 0 if decoder["tie_word_embeddings"] else decoder["vocab_size"] * decoder["hidden_size"]
    # float32; an untied embedding is only looked up, not read whole
    assert bound["copy_bytes_per_s"] > 1e8
    assert bound["decode_bytes"] == 4 * (data["model"]["parameters"]["decoder"] - embedding)
    assert [res["resolution"] for res in data["results"]] == [64, 128]  # one row each
    for res in data["results"]:
        assert res["visual_tokens"] == (res["resolution"] // 64) ** 2
        assert res["prefill_tokens"] == res["text_tokens"] + res["visual_tokens"]
        assert set(res["samples"]) == set(SAMPLES) == set(res["summary"])
        assert all(len(v) == 2 for v in res["samples"].values())
        assert all(len(v) == 1 for v in res["warmup_samples"].values())
        assert all(set(v) == {"median", "p10", "p90"} for v in res["summary"].values())
        stages = {"vision", "projector", "prefill", "ttft", "decode"}
        assert set(res["flops"]) == set(res["achieved"]) == stages
        assert all(set(v) == {"gflops", "fraction_of_peak"} for v in res["achieved"].values())
        assert res["peak_memory_bytes"] > 0
        memory = res["decode_memory"]
        assert memory["bytes_per_s"] == pytest.approx(res["summary"]["decode_tps"]["median"] * bound["decode_bytes"])
        assert memory["fraction_of_bound"] == pytest.approx(memory["bytes_per_s"] / bound["copy_bytes_per_s"])
    table = r.stdout.splitlines()
    assert sum(line.split()[:1] == [str(px)] for line in table for px in (64, 128)) == 4  # 2 tables


def test_fastv_prefill_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    r = invoke("--model", str(CHECKPOINT), *SMALL, "--json", str(out), "--fastv", "1:0.5")
    assert r.exit_code == 0, r.output
    assert "FastV 1:0.5" in r.stdout
    data = json.loads(out.read_text())
    assert data["settings"]["fastv"] == "1:0.5"
    for res in data["results"]:
        assert res["visual_kept_fastv"] == round(res["visual_tokens"] * 0.5)
        assert set(res["samples"]) == set(SAMPLES) | {"prefill_fastv_s", "ttft_fastv_s"}
        for i in range(2):
            s = res["samples"]
            before = s["preprocess_s"][i] + s["vision_s"][i] + s["projector_s"][i]
            assert s["ttft_fastv_s"][i] == pytest.approx(before + s["prefill_fastv_s"][i], rel=1e-9)
        # layers >= K see fewer tokens, so the pruned prefill does less work
        assert res["flops"]["prefill_fastv"] < res["flops"]["prefill"]
    bad = invoke("--model", str(CHECKPOINT), *SMALL, "--fastv", "9:0.5")
    assert bad.exit_code == 2 and "K must be in [1, 2)" in bad.output


def test_random_weights_are_the_default_and_the_report_says_so(monkeypatch):
    monkeypatch.setattr(harness, "random_config", lambda size: TINY_CONFIG)
    r = invoke(*SMALL)
    assert r.exit_code == 0, r.output
    assert "random weights in the shapes of apple/FastVLM-0.5B (the default without --model)" in r.stdout
    assert "nothing downloaded" in r.stdout


def test_ctrl_c_prints_what_was_measured(monkeypatch, tmp_path):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 5:  # in the first counted run at 128 px, after its warm-up
            raise KeyboardInterrupt
        return time_run(*args, **kwargs)

    monkeypatch.setattr(harness, "time_run", interrupted)
    out = tmp_path / "partial.json"
    r = invoke("--model", str(CHECKPOINT), *SMALL, "--json", str(out))
    assert r.exit_code == 130
    assert "interrupted" in r.stdout and "64 px (2 runs)" in r.stdout
    data = json.loads(out.read_text())
    assert data["complete"] is False and [res["resolution"] for res in data["results"]] == [64]


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    r = invoke("--model", str(CHECKPOINT), *SMALL, "--plot", str(png))
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--model", "x", "--random", "0.5b"], "not both"),
    (["--random", "3b"], "--random takes one of 0.5b, 1.5b, 7b"),
    (["--dtype", "int8"], "--dtype takes one of"),
    (["--resolution", "256", "--resolutions", "256,512"], "not both"),
    (["--resolutions", "256,big"], "comma-separated integers"),
    (["--json", "/nonexistent/bench.json"], "the directory /nonexistent does not exist"),
    (["--model", str(CHECKPOINT), "--resolution", "100"], "multiple of 64"),
    (["--model", str(CHECKPOINT), "--prompt-tokens", "4"], "--prompt-tokens must be more than"),
])
def test_user_errors_are_one_line(args, message):
    r = invoke(*args)
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    r = invoke("--model", str(CHECKPOINT), "--plot", str(tmp_path / "x.png"))
    assert r.exit_code == 2
    assert "--plot needs matplotlib: pip install 'fastvlm-mlx[plot]'" in r.output
