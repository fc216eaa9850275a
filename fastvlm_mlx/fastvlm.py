"""FastVLM: FastViTHD -> 2-layer MLP projector -> Qwen2 decoder (mlx-lm's)."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen2

from .errors import FastVLMError
from . import kernels
from .fastvithd import FastViTHD, Linear, PatchEmbed, RepCPE, VisionConfig

IMAGE_TOKEN_INDEX = -200  # the reference's marker for the image slot in input ids
MODEL_TYPES = ("llava_qwen2", "fastvlm", "fast_vlm")
HF_TOWER_PREFIX = "model.vision_tower.vision_tower.model."


def _fits(value, hint) -> bool:
    """Whether a config value has the type a dataclass field declares (numbers positive)."""
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        number = isinstance(value, int) or (hint is float and isinstance(value, float))
        return number and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (object,)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    return True  # optional or free-form fields (rope_scaling, pos_embs_shapes)


def checked(cls, params: dict, section: str = "config.json"):
    """Build dataclass `cls` from config entries, refusing a missing or mistyped one in one line."""
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in names.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in params:
            if required:
                raise FastVLMError(f"{section} has no {name}: not a complete FastVLM config")
            continue
        if not _fits(params[name], hints[name]):
            kind = getattr(hints[name], "__name__", str(hints[name]))
            raise FastVLMError(f"{section}: {name} must be {'a positive ' if kind in ('int', 'float') else ''}"
                               f"{kind}, got {params[name]!r}")
    return cls(**{k: v for k, v in params.items() if k in names})


def flat_config(config: dict) -> dict:
    """transformers' port (fast_vlm) nests the decoder's config in text_config: lift it
    to the top, where LLaVA's and mlx-vlm's configs keep it."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        return config
    outer = {k: v for k, v in config.items() if k not in ("text_config", "tie_word_embeddings")}
    tied = text.get("tie_word_embeddings", config.get("tie_word_embeddings"))
    return {**text, **outer, **({} if tied is None else {"tie_word_embeddings": tied})}


@dataclass
class ModelArgs:
    text_config: qwen2.ModelArgs
    vision_config: VisionConfig
    mm_hidden_size: int
    context_length: int  # positions a conversation may use: the reference truncates at this

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise FastVLMError(
                f"not a FastVLM checkpoint: model_type is {model_type!r}, "
                f"expected one of {', '.join(MODEL_TYPES)}"
            )
        projector = config.get("mm_projector_type", "mlp2x_gelu")
        if projector != "mlp2x_gelu":
            raise FastVLMError(f"unsupported mm_projector_type {projector!r} (FastVLM uses mlp2x_gelu)")
        described = config.get("vision_config", {})
        if not isinstance(described, dict):
            raise FastVLMError("config.json: vision_config must be an object")
        if described.keys() & {"layers", "embed_dims"}:  # a tower of other shapes, stage by stage
            vision = checked(VisionConfig, described, "config.json's vision_config")
            vision.check()
        else:  # the published FastViTHD: mlx-vlm's and transformers' vision_config only restate it
            tower = config.get("mm_vision_tower", "mobileclip_l_1024")
            match = re.fullmatch(r"mobileclip_l_(\d+)", str(tower))
            if not match:
                raise FastVLMError(f"unsupported vision tower {tower!r} (FastVLM uses mobileclip_l_<size>)")
            vision = VisionConfig(image_size=int(match.group(1)))
        kv_heads = {"num_key_value_heads": config["num_attention_heads"]} if "num_attention_heads" in config else {}
        text = checked(qwen2.ModelArgs, {**kv_heads, **config, "model_type": "qwen2"})
        if text.hidden_size % text.num_attention_heads or text.num_attention_heads % text.num_key_value_heads:
            raise FastVLMError(
                f"config.json: hidden_size {text.hidden_size}, num_attention_heads "
                f"{text.num_attention_heads} and num_key_value_heads {text.num_key_value_heads} "
                "do not divide evenly"
            )
        mm_hidden = config.get("mm_hidden_size", vision.hidden_size)
        if mm_hidden != vision.hidden_size:
            raise FastVLMError(
                f"config mismatch: mm_hidden_size is {mm_hidden} but the vision tower "
                f"emits {vision.hidden_size} channels"
            )
        context = config.get("tokenizer_model_max_length", text.max_position_embeddings)
        if not _fits(context, int):
            raise FastVLMError(f"config.json: tokenizer_model_max_length must be a positive int, got {context!r}")
        return cls(text_config=text, vision_config=vision, mm_hidden_size=mm_hidden,
                   context_length=min(context, text.max_position_embeddings))


class Projector(nn.Module):
    """mlp2x_gelu: Linear(mm_hidden -> d), exact GELU, Linear(d -> d)."""

    def __init__(self, in_dims: int, dims: int):
        super().__init__()
        self.linear_1 = Linear(in_dims, dims)
        self.linear_2 = Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.gelu(self.linear_1(x)))


class MLP(qwen2.MLP):
    """Qwen2's MLP, down(silu(gate) * up), from the kernels."""

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.mlp(x, self)


class Embedding(nn.Embedding):
    """nn.Embedding whose use as the tied head goes through the kernels."""

    def as_linear(self, x: mx.array) -> mx.array:
        return kernels.linear(x, self["weight"])


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm from the kernels."""

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.rms_norm(x, self["weight"], self.eps)


class Attention(qwen2.Attention):
    """Qwen2's attention, its inputs (projections and rotary embedding) and the attention
    itself from the kernels."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        b, length, _ = x.shape
        q, k, v = kernels.attention_inputs(x, self, cache.offset if cache is not None else 0)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = kernels.decoder_attention(q, k, v, self.scale, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear with its product from the kernels (on the CPU backend MLX's
    own has no BLAS path: a 304-token prefill of the 0.5B decoder at 8 bits, 125 s)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = kernels.quantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose use as the tied head goes through the kernels."""

    def as_linear(self, x: mx.array) -> mx.array:
        return kernels.quantized_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)


def quantize(model: nn.Module, group_size: int, bits: int, predicate: Callable[[str, nn.Module], bool]) -> None:
    """nn.quantize, each quantized layer then computing through the kernels."""
    nn.quantize(model, group_size, bits, class_predicate=predicate)
    ours = {nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding}
    for _, module in model.named_modules():
        if type(module) in ours:
            module.__class__ = ours[type(module)]  # same state, our __call__


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vision_tower = FastViTHD(args.vision_config)
        self.mm_projector = Projector(args.mm_hidden_size, args.text_config.hidden_size)
        self.language_model = qwen2.Model(args.text_config)
        text = args.text_config
        for layer in self.language_model.layers:
            layer.self_attn = Attention(text)
            layer.mlp = MLP(text.hidden_size, text.intermediate_size)
        ours = {nn.Linear: Linear, nn.Embedding: Embedding, nn.RMSNorm: RMSNorm}  # mlx-lm's layers, our kernels
        for _, module in self.language_model.named_modules():
            if type(module) in ours:
                module.__class__ = ours[type(module)]

    @property
    def dtype(self) -> mx.Dtype:
        """The weights' dtype (norms are never quantized; mlx-vlm's checkpoints quantize the projector)."""
        return self.language_model.model.norm.weight.dtype

    def encode_image(self, pixels: mx.array) -> mx.array:
        """[1, H, W, 3] in [0, 1] -> projected image features [1, N, d]."""
        return self.mm_projector(self.image_embeddings(pixels))

    def image_embeddings(self, pixels: mx.array) -> mx.array:
        """[1, H, W, 3] -> the tower's output flattened to tokens [1, N, mm_hidden]."""
        for side in pixels.shape[1:3]:
            self.args.vision_config.check_resolution(side)
        dtype = kernels.compute_dtype(self.vision_tower.patch_embed[0].reparam_conv.weight.dtype)
        x = self.vision_tower(pixels.astype(dtype))
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def embed(self, input_ids: list[int], image_features: mx.array | None) -> mx.array:
        """Embed the prompt and splice the image features into its image slot."""
        embed_tokens = self.language_model.model.embed_tokens
        dtype = kernels.compute_dtype(self.dtype)

        def embed_text(ids: list[int]) -> mx.array:
            if not ids:  # a quantized embedding cannot look up nothing
                return mx.zeros((1, 0, self.args.text_config.hidden_size), dtype)
            return embed_tokens(mx.array(ids, dtype=mx.int32)[None]).astype(dtype)

        slots = [i for i, t in enumerate(input_ids) if t == IMAGE_TOKEN_INDEX]
        if not slots:
            return embed_text(input_ids)
        if len(slots) > 1 or image_features is None:
            raise ValueError("a prompt takes exactly one image slot and its image")
        s = slots[0]
        parts = [embed_text(input_ids[:s]), image_features.astype(dtype), embed_text(input_ids[s + 1 :])]
        return mx.concatenate(parts, axis=1)

    def lm_head(self, h: mx.array) -> mx.array:
        """Decoder hidden states (after the final norm) -> logits."""
        lm = self.language_model
        if lm.args.tie_word_embeddings:
            return lm.model.embed_tokens.as_linear(h)
        return lm.lm_head(h)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map a state dict in any published layout (see LAYOUTS) to this model.

        Weights already in our layout pass through, but for layer scales, which
        all layouts store and we fold. This is the one mapping the converter uses too.
        """
        if any(k.startswith(COREML_EXPORT_KEY) for k in weights):
            raise FastVLMError(COREML_EXPORT)
        for layout in LAYOUTS:
            if any(k.startswith(layout.tower) for k in weights):
                weights = layout.sanitize(weights, self.vision_tower)
                break
        return fold_layer_scales(weights)


# Each layer scale multiplies a branch that ends in a linear layer: folded into it.
LAYER_SCALE_TARGETS = {"layer_scale": "convffn.fc2", "layer_scale_1": "token_mixer.proj",
                       "layer_scale_2": "convffn.fc2"}


def fold_layer_scales(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Scale the rows of each layer scale's linear layer by it and drop it.

    Like the BatchNorm folds, the products stay float32: rounded back to a
    bfloat16 checkpoint's dtype they moved the fixture's image features by 2e-3.
    """
    out = dict(weights)
    for key in weights:
        block, leaf = key.rsplit(".", 1)
        if leaf not in LAYER_SCALE_TARGETS:
            continue
        scale = out.pop(key).astype(mx.float32).reshape(-1)
        for param in ("weight", "bias"):
            name = f"{block}.{LAYER_SCALE_TARGETS[leaf]}.{param}"
            if name not in out:
                raise FastVLMError(f"checkpoint has {key} but not {name}")
            value = out[name]
            factor = scale.reshape(-1, *[1] * (value.ndim - 1))
            out[name] = value.astype(mx.float32) * factor
    return out


BN_EPS = 1e-5

COREML_EXPORT_KEY = "multi_modal_projector.linear_0."
COREML_EXPORT = (
    "this is Apple's MLX export for the FastVLM app: its vision tower is a CoreML model "
    "(fastvithd.mlpackage), not tensors; use the PyTorch/HF checkpoint (e.g. apple/FastVLM-0.5B) "
    "or an mlx-community/FastVLM-* one instead"
)


@dataclass(frozen=True)
class Layout:
    """Where a published layout keeps the tower, the projector (a Sequential: Linear 0,
    GELU, Linear 2) and the decoder, and how it stores convolutions. Every layout keeps
    the ConvFFN BatchNorms unfolded and the layer scales apart."""

    name: str
    tower: str
    projector: str
    decoder: tuple[tuple[str, str], ...]  # (their prefix, ours)
    nhwc: bool  # convolutions [O, kH, kW, I/g] as MLX wants, else PyTorch's [O, I/g, kH, kW]
    projector_layers: tuple[str, str] = ("0", "2")  # their names of the two Linear layers
    tower_names: Callable[[str, FastViTHD], str] | None = None  # their tower key -> the reference's

    def sanitize(self, weights: dict[str, mx.array], tower: FastViTHD) -> dict[str, mx.array]:
        """Their keys and layouts -> ours, BatchNorms folded into their convs."""
        out: dict[str, mx.array] = {}
        bn: dict[str, dict[str, mx.array]] = {}
        for key, value in weights.items():
            if key.startswith(self.tower):
                name = key[len(self.tower):]
                if self.tower_names:
                    name = self.tower_names(name, tower)
                if name.startswith("head."):
                    continue  # the classifier head is not used by FastVLM
                if ".convffn.conv." in name:
                    prefix, leaf = name.split(".convffn.conv.", 1)
                    bn.setdefault(prefix, {})[leaf] = value
                    continue
                if value.ndim == 4 and not self.nhwc:
                    value = value.transpose(0, 2, 3, 1)
                out["vision_tower." + name] = value
            elif key.startswith(self.projector):
                layer, leaf = key[len(self.projector):].split(".", 1)
                if layer not in self.projector_layers:
                    raise FastVLMError(f"unexpected weight {key!r}: the projector is Linear, GELU, Linear")
                out[f"mm_projector.linear_{self.projector_layers.index(layer) + 1}.{leaf}"] = value
            elif "rotary_emb.inv_freq" in key:
                continue
            else:
                theirs, ours = next(((t, o) for t, o in self.decoder if key.startswith(t)), (None, None))
                if theirs is None:
                    raise FastVLMError(f"unexpected weight {key!r} in a {self.name} checkpoint")
                out[ours + key[len(theirs):]] = value
        for prefix, p in bn.items():
            out.update(self._fold_batch_norm(prefix, p))
        return out

    def _fold_batch_norm(self, prefix: str, p: dict[str, mx.array]) -> dict[str, mx.array]:
        """The ConvFFN's depthwise conv and its inference BatchNorm as one conv with bias (float32)."""
        try:
            w, gamma, beta = p["conv.weight"], p["bn.weight"], p["bn.bias"]
            mean, var = p["bn.running_mean"], p["bn.running_var"]
        except KeyError as e:
            raise FastVLMError(f"checkpoint lacks {prefix}.convffn.conv.{e.args[0]}") from None
        scale = gamma.astype(mx.float32) * mx.rsqrt(var.astype(mx.float32) + BN_EPS)
        w = w.astype(mx.float32) * scale.reshape(-1, 1, 1, 1)
        return {f"vision_tower.{prefix}.convffn.conv.weight": w if self.nhwc else w.transpose(0, 2, 3, 1),
                f"vision_tower.{prefix}.convffn.conv.bias":
                    beta.astype(mx.float32) - mean.astype(mx.float32) * scale}


def mlx_vlm_tower_names(name: str, tower: FastViTHD) -> str:
    """mlx-vlm calls the stem patch_embed.blocks; otherwise its names are the reference's."""
    return re.sub(r"^patch_embed\.blocks\.", "patch_embed.", name)


# timm's fastvit_mci3 names (the transformers port) -> the reference's, within a block.
TIMM_NAMES = ((r"^stem\.", "patch_embed."), (r"^final_conv\.", "conv_exp."),
              (r"\.se\.fc1\.", ".se.reduce."), (r"\.se\.fc2\.", ".se.expand."),
              (r"\.mlp\.", ".convffn."), (r"\.(layer_scale(?:_[12])?)\.gamma$", r".\1"),
              (r"\.proj\.0\.reparam_conv\.", ".proj.0.lkb_reparam."))


def timm_tower_names(name: str, tower: FastViTHD) -> str:
    """timm groups the reference's flat network list into stages of [downsample,
    pos_emb,] blocks: stages.S.<part> -> network.I, I counted off our own network."""
    parts, stage = {}, 0
    for i, entry in enumerate(tower.network):
        if isinstance(entry, PatchEmbed):
            parts[f"stages.{stage}.downsample"] = f"network.{i}"  # leads into stage `stage`
        elif isinstance(entry, RepCPE):
            parts[f"stages.{stage}.pos_emb"] = f"network.{i}"
        else:
            parts[f"stages.{stage}.blocks"] = f"network.{i}"
            stage += 1
    match = re.match(r"stages\.\d+\.(?:downsample|pos_emb|blocks)", name)
    if match and match.group(0) in parts:
        name = parts[match.group(0)] + name[match.end():]
    for pattern, replacement in TIMM_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


LAYOUTS = (
    # apple/FastVLM-* (LLaVA's save_pretrained), and Apple's .bin/.pt checkpoints.
    Layout("HF/LLaVA", tower=HF_TOWER_PREFIX, projector="model.mm_projector.",
           decoder=(("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
           nhwc=False),
    # mlx-community/FastVLM-* (mlx-vlm's converter), quantized ones included.
    Layout("mlx-vlm", tower="vision_tower.vision_model.", projector="mm_projector.",
           decoder=(("language_model.", "language_model."),), nhwc=True, tower_names=mlx_vlm_tower_names),
    # transformers' port (model_type fast_vlm): timm's fastvit_mci3 tower, LLaVA's projector names.
    Layout("transformers fast_vlm", tower="model.vision_tower.timm_model.",
           projector="model.multi_modal_projector.",
           decoder=(("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
           nhwc=False, projector_layers=("linear_1", "linear_2"), tower_names=timm_tower_names),
)
HF_LAYOUT = LAYOUTS[0]
