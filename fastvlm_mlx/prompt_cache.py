"""What the decoder has computed, kept so it is never computed twice: image features
by content, the KV of a conversation, and the prompt prefix every conversation shares."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from PIL import Image

from .fastvlm import IMAGE_TOKEN_INDEX, Model


class ModelMemo:
    """What one model keeps between conversations.

    Image features by content hash, so asking again about a picture skips the
    encoder, and the KV of the constant prompt prefix before the image (system
    turn and template), so a new conversation prefills it only once per model.
    """

    def __init__(self, images: int = 8, max_bytes: int | None = None):
        self.images = images
        self.max_bytes = max_bytes
        self.features: OrderedDict[str, mx.array] = OrderedDict()
        self.prefix: tuple[list[int], list[tuple[mx.array, mx.array]]] | None = None

    @classmethod
    def of(cls, model: Model) -> "ModelMemo":
        memo = getattr(model, "_memo", None)
        if memo is None:
            memo = cls()
            object.__setattr__(model, "_memo", memo)  # a plain attribute, not a parameter
        return memo

    def remember_features(self, key: str, features: mx.array) -> None:
        self.features[key] = features
        while len(self.features) > self.images or (
                self.max_bytes is not None and sum(f.nbytes for f in self.features.values()) > self.max_bytes):
            self.features.popitem(last=False)


def image_digest(image: Image.Image, resolution: int) -> str:
    """Of the RGB pixels the encoder sees (palette indices alone would let two images collide)."""
    digest = hashlib.sha256(image.tobytes())
    digest.update(f"{image.mode}{image.size}{resolution}".encode())
    return digest.hexdigest()


def positions(ids: list[int], visual_tokens: int) -> int:
    """Sequence length of `ids` once the image slot is expanded to its features."""
    return len(ids) + (visual_tokens - 1 if IMAGE_TOKEN_INDEX in ids else 0)


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class PromptCache:
    """The decoder's KV cache (mlx-lm's, one per layer) and the ids it holds.

    Ids are a conversation's, the image slot as one marker that takes
    `visual_tokens` positions. A prompt reuses the longest prefix it shares with
    the held ids and the rest is trimmed, so only new tokens are prefilled.
    """

    def __init__(self, model: Model, visual_tokens: int = 0):
        self.model = model
        self.layers = make_prompt_cache(model.language_model)
        self.ids: list[int] = []
        self.visual_tokens = visual_tokens

    def positions(self, ids: list[int]) -> int:
        """Sequence length of `ids` once the image slot is expanded to its features."""
        return positions(ids, self.visual_tokens)

    def reuse(self, prompt: list[int]) -> int:
        """Trim to the longest prefix of `prompt` held (at least one token is left to
        prefill) and return its length in ids; an empty cache starts from the model's
        shared prefix."""
        self._seed(prompt)
        keep = min(shared_prefix(self.ids, prompt), len(prompt) - 1)
        target = self.positions(prompt[:keep])
        for c in self.layers:
            c.trim(c.offset - target)
        self.ids = prompt[:keep]
        return keep

    def settle(self, fed: list[int]) -> None:
        """After a prefill and decode of `fed`, note which of its ids the layers really
        hold: generate_step feeds each token before yielding it, except at max_tokens,
        and an interrupt can land between layers, so the smallest offset is trusted."""
        offset = min(c.offset for c in self.layers)
        if IMAGE_TOKEN_INDEX not in fed or offset <= fed.index(IMAGE_TOKEN_INDEX):
            held = min(offset, len(fed))
        elif offset < fed.index(IMAGE_TOKEN_INDEX) + self.visual_tokens:
            held = fed.index(IMAGE_TOKEN_INDEX)
        else:
            held = min(offset - self.visual_tokens + 1, len(fed))
        self.ids = fed[:held]

    def share_prefix(self, prompt: list[int]) -> None:
        """Give the model the KV of the ids before the image slot, the same for every image."""
        if IMAGE_TOKEN_INDEX not in prompt:
            return
        n = prompt.index(IMAGE_TOKEN_INDEX)
        memo = ModelMemo.of(self.model)
        if n == 0 or (memo.prefix is not None and memo.prefix[0] == prompt[:n]):
            return
        layers = [(c.keys[..., :n, :], c.values[..., :n, :]) for c in self.layers]
        mx.eval(layers)  # a lazy array belongs to the thread that made it; a server's worker does
        memo.prefix = (prompt[:n], layers)

    def _seed(self, prompt: list[int]) -> None:
        prefix = ModelMemo.of(self.model).prefix
        if self.ids or prefix is None or prompt[: len(prefix[0])] != prefix[0]:
            return
        for c, (keys, values) in zip(self.layers, prefix[1]):
            c.keys, c.values, c.offset = keys[...], values[...], keys.shape[2]
        self.ids = list(prefix[0])
