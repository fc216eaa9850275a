"""Time each stage of time-to-first-token on the model code that chat runs.

A run is: preprocess -> vision tower -> projector -> prefill (first token) ->
decode, with evaluation forced at every boundary so each stage is charged for
its own work only. TTFT of a run is the sum of its first four stages.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from PIL import Image

from fastvlm_mlx.errors import FastVLMError
from fastvlm_mlx.fastvithd import RepMixer
from fastvlm_mlx.fastv import FastV
from fastvlm_mlx import kernels
from fastvlm_mlx.fastvlm import IMAGE_TOKEN_INDEX, Model, ModelArgs
from fastvlm_mlx.generation import prefill
from fastvlm_mlx.defaults import DEFAULT_SYSTEM
from fastvlm_mlx.processor import first_turn, preprocess
from fastvlm_mlx.utils import blas_library

from .flops import decoder_flops, projector_flops, vision_flops

STAGES = ("preprocess", "vision", "projector", "prefill")  # TTFT is their sum
SAMPLES = tuple(f"{s}_s" for s in STAGES) + ("ttft_s", "decode_s", "decode_tps")
FASTV_SAMPLES = ("prefill_fastv_s", "ttft_fastv_s")  # the same request with FastV pruning
FILLER = "Describe every detail of this picture. "

# The published FastVLM decoders (Qwen2), by the size in the checkpoint name.
DECODERS = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                 tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                 tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
               tie_word_embeddings=False),
}


def random_config(size: str) -> dict:
    """The config.json of apple/FastVLM-<size>, as published (no vision_config)."""
    return {
        "model_type": "llava_qwen2",
        **DECODERS[size],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "tokenizer_model_max_length": 8192,
        "mm_vision_tower": "mobileclip_l_1024",
        "mm_hidden_size": 3072,
        "mm_projector_type": "mlp2x_gelu",
    }


def random_model(config: dict, dtype: mx.Dtype) -> Model:
    """A model of the config's shapes with random weights: latency does not depend on them."""
    model = Model(ModelArgs.from_dict(config))
    fold_skips(model.vision_tower)
    model.set_dtype(dtype)
    model.vision_tower.set_dtype(kernels.compute_dtype(dtype))
    mx.eval(model.parameters())
    model.eval()
    return model


def fold_skips(tower: nn.Module) -> None:
    """Fold the skip connection into the centre tap of random RepMixer and RepCPE convs,
    as reparameterization does; without it the random depthwise convs shrink the
    activations ~0.6x per block, to ~1e-15 in stage 3, where half precision
    underflows and slow denormal arithmetic can skew timings."""
    for _, module in tower.named_modules():
        if isinstance(module, RepMixer):  # RepCPE too
            conv = module.reparam_conv
            k = conv.weight.shape[1]
            conv.weight = conv.weight + mx.zeros((1, k, k, 1)).at[0, k // 2, k // 2, 0].add(1.0)


def synthetic_image(width: int = 1600, height: int = 1200) -> Image.Image:
    """Random noise, non-square so the padding step of preprocessing runs too."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def prompt_ids(tokenizer, text_tokens: int, vocab_size: int) -> list[int]:
    """About `text_tokens` text token ids with one image slot.

    With a tokenizer, the real chat template around a filler question; without
    one (random weights), random ids with the slot after the first half.
    """
    if tokenizer is None:
        ids = np.random.default_rng(0).integers(0, vocab_size, text_tokens).tolist()
        half = text_tokens // 2
        return ids[:half] + [IMAGE_TOKEN_INDEX] + ids[half:]
    overhead = len(first_turn(tokenizer, DEFAULT_SYSTEM, "")) - 1
    if text_tokens <= overhead:
        raise FastVLMError(
            f"--prompt-tokens must be more than {overhead}, the tokens of the chat template itself"
        )
    filler = tokenizer.encode(FILLER * text_tokens, add_special_tokens=False)
    question = tokenizer.decode(filler[: text_tokens - overhead])
    return first_turn(tokenizer, DEFAULT_SYSTEM, question)


def time_run(model: Model, image: Image.Image, resolution: int, ids: list[int],
             max_tokens: int, fastv: FastV | None = None) -> tuple[dict[str, float], int]:
    """One request, stage by stage: the samples in seconds and the visual token count.

    Prefill is chat's own `prefill` (decoder, LM head on the last position) and
    the greedy sampler gives the first token; mlx-lm's generate_step continues
    from it on the same cache. With FastV the prefill is timed a second time,
    pruned, on a fresh cache, so both stand side by side on the same features.
    """
    cache = make_prompt_cache(model.language_model)
    sampler = make_sampler(0.0)
    t0 = time.perf_counter()
    pixels = preprocess(image, resolution)
    mx.eval(pixels)
    t1 = time.perf_counter()
    embeddings = model.image_embeddings(pixels)
    mx.eval(embeddings)
    t2 = time.perf_counter()
    features = model.mm_projector(embeddings)
    mx.eval(features)
    t3 = time.perf_counter()
    first = sampler(prefill(model, ids, features, cache))
    mx.eval(first)
    t4 = time.perf_counter()
    for _ in generate_step(first, model.language_model, max_tokens=max_tokens - 1,
                           sampler=sampler, prompt_cache=cache):
        pass
    t5 = time.perf_counter()
    mx.synchronize(generation_stream)  # generate_step runs one step ahead: drain it
    decode_s = t5 - t4
    sample = {
        "preprocess_s": t1 - t0,
        "vision_s": t2 - t1,
        "projector_s": t3 - t2,
        "prefill_s": t4 - t3,
        "ttft_s": t4 - t0,
        "decode_s": decode_s,
        "decode_tps": (max_tokens - 1) / decode_s,
    }
    if fastv is not None:
        start = time.perf_counter()
        mx.eval(sampler(prefill(model, ids, features, make_prompt_cache(model.language_model), fastv)))
        sample["prefill_fastv_s"] = time.perf_counter() - start
        sample["ttft_fastv_s"] = t3 - t0 + sample["prefill_fastv_s"]
    return sample, features.shape[1]


def summarize(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
            "p90": float(np.percentile(v, 90))}


@dataclass
class Result:
    """Every sample at one resolution, with the FLOPs each stage had to do."""

    resolution: int
    visual_tokens: int
    text_tokens: int
    flops: dict[str, int]
    visual_kept: int | None = None  # with FastV: the visual tokens layers >= K see
    samples: dict[str, list[float]] = field(default_factory=dict)
    warmup_samples: dict[str, list[float]] = field(default_factory=dict)
    peak_memory: int = 0

    @classmethod
    def create(cls, model: Model, resolution: int, visual_tokens: int, text_tokens: int,
               max_tokens: int, fastv: FastV | None = None) -> "Result":
        args = model.args.text_config
        prefill = text_tokens + visual_tokens
        flops = {
            "vision": vision_flops(model.args.vision_config, resolution),
            "projector": projector_flops(model.args.mm_hidden_size, args.hidden_size, visual_tokens),
            "prefill": decoder_flops(args, prefill),
            # the decode window spans tokens 2..max_tokens, each one fed at its position
            "decode": sum(decoder_flops(args, 1, prefill + i) for i in range(max_tokens - 1)),
        }
        flops["ttft"] = flops["vision"] + flops["projector"] + flops["prefill"]
        kept = None
        if fastv is not None:
            kept = fastv.kept(visual_tokens)
            pruned = decoder_flops(args, prefill, fastv=(fastv.layer, prefill - visual_tokens + kept))
            flops["prefill_fastv"] = pruned
            flops["ttft_fastv"] = flops["vision"] + flops["projector"] + pruned
        keys = SAMPLES + (FASTV_SAMPLES if fastv is not None else ())
        return cls(resolution, visual_tokens, text_tokens, flops, kept,
                   {k: [] for k in keys}, {k: [] for k in keys})

    @property
    def prefill_tokens(self) -> int:
        return self.text_tokens + self.visual_tokens

    @property
    def runs(self) -> int:
        return len(self.samples["ttft_s"])

    def add(self, sample: dict[str, float], warmup: bool) -> None:
        target = self.warmup_samples if warmup else self.samples
        for k, v in sample.items():
            target[k].append(v)

    def summary(self) -> dict[str, dict[str, float]]:
        """Median, p10 and p90 of each sample over the counted runs."""
        return {k: summarize(v) for k, v in self.samples.items()}

    def achieved(self, peak_gflops: float) -> dict[str, dict[str, float]]:
        """GFLOP/s of each stage at its median time, and that as a fraction of the peak."""
        medians = {k: v["median"] for k, v in self.summary().items()}
        out = {}
        for stage, flops in self.flops.items():
            gflops = flops / medians[f"{stage}_s"] / 1e9
            out[stage] = {"gflops": gflops, "fraction_of_peak": gflops / peak_gflops}
        return out

    def to_dict(self, peak_gflops: float) -> dict:
        return {
            "resolution": self.resolution,
            "visual_tokens": self.visual_tokens,
            "text_tokens": self.text_tokens,
            "prefill_tokens": self.prefill_tokens,
            "visual_kept_fastv": self.visual_kept,
            "runs": self.runs,
            "samples": self.samples,
            "warmup_samples": self.warmup_samples,
            "summary": self.summary(),
            "flops": self.flops,
            "achieved": self.achieved(peak_gflops),
            "peak_memory_bytes": self.peak_memory,
        }


def check_request(model: Model, resolutions: list[int], ids: list[int], max_tokens: int) -> None:
    """Reject, before any timing, resolutions the tower cannot take, requests past the
    context, and a decode too short to time."""
    if max_tokens < 2:
        raise FastVLMError(f"--max-tokens must be at least 2 to time decoding, got {max_tokens}")
    side = model.args.vision_config.stride
    context = model.args.context_length
    for r in resolutions:
        model.args.vision_config.check_resolution(r)
        length = len(ids) - 1 + (r // side) ** 2 + max_tokens
        if length > context:
            raise FastVLMError(
                f"at {r} px the prompt and answer need {length} positions but the context "
                f"is {context}; lower --resolution, --prompt-tokens or --max-tokens"
            )


def measure(model: Model, ids: list[int], resolutions: list[int], runs: int, warmup: int,
            max_tokens: int, fastv: FastV | None = None) -> Iterator[tuple[Result, int]]:
    """Time warmup + runs requests per resolution; yield (its result so far, run index) after each.

    A generator so the caller can show progress and, on Ctrl-C, keep what it
    has been given: every yielded Result holds only completed runs. The request
    must have passed check_request, which the caller runs before any slow setup.
    """
    image = synthetic_image()
    for resolution in resolutions:
        mx.reset_peak_memory()
        result = None
        for i in range(warmup + runs):
            sample, visual_tokens = time_run(model, image, resolution, ids, max_tokens, fastv)
            if result is None:
                result = Result.create(model, resolution, visual_tokens, len(ids) - 1,
                                       max_tokens, fastv)
            result.add(sample, warmup=i < warmup)
            result.peak_memory = mx.get_peak_memory()
            yield result, i


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def environment(dtype: mx.Dtype) -> dict:
    return {
        "device": mx.default_device().type.name,
        "device_info": mx.device_info(),
        "mlx": mx.__version__,
        "mlx_lm": version("mlx-lm"),
        "fastvlm_mlx": version("fastvlm-mlx"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "blas": blas_library(),
        "dtype": dtype_name(dtype),
    }


def model_info(model: Model, source: str, load_s: float) -> dict:
    """What was timed: where the model came from, its shapes, parameters and bytes."""
    text = model.args.text_config
    params = {name: sum(v.size for _, v in tree_flatten(part.parameters()))
              for name, part in (("vision", model.vision_tower),
                                 ("projector", model.mm_projector),
                                 ("decoder", model.language_model))}
    return {
        "source": source,
        "vision": asdict(model.args.vision_config),
        "decoder": {k: getattr(text, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "tie_word_embeddings")},
        "parameters": params,
        "weights_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
        "load_s": load_s,
    }
