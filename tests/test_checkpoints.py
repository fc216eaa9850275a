"""What checkpoints hold beyond weights: their dtype, context, preprocessing facts, and overflow."""

import mlx.core as mx
import pytest

from conftest import CHECKPOINT, IMAGE, QUESTION
from fastvlm_mlx import Chat, load
from fastvlm_mlx.errors import FastVLMError
from fastvlm_mlx.generation import FINITE_CHECK_EVERY
from fastvlm_mlx.utils import default_dtype, stored_dtype


def test_default_dtype_is_the_checkpoints_own_off_the_cpu():
    weights = {"a": mx.zeros((4, 4), mx.bfloat16), "b": mx.zeros((2,), mx.float32),
               "q": mx.zeros((64,), mx.uint32)}
    assert stored_dtype(weights) == mx.bfloat16
    with mx.stream(mx.cpu):
        assert default_dtype(mx.bfloat16) == mx.float32  # no fast half precision on the CPU backend
    if mx.default_device() != mx.cpu:
        assert default_dtype(mx.bfloat16) == mx.bfloat16


@pytest.fixture
def fresh():
    """A model of our own to break (the session's `tiny` stays intact)."""
    return load(CHECKPOINT, dtype=mx.float32)


def test_overflowing_image_features_are_refused_naming_the_stage(fresh):
    model, tokenizer = fresh
    linear = model.mm_projector.linear_2
    linear.weight = mx.full(linear.weight.shape, 3e38)  # float32's largest is 3.4e38: sums overflow
    with pytest.raises(FastVLMError, match="vision tower's image features came out non-finite.*--dtype float32"):
        Chat(model, tokenizer, IMAGE)
    with pytest.raises(FastVLMError, match="non-finite"):  # and nothing bad was remembered
        Chat(model, tokenizer, IMAGE)


def test_overflowing_prefill_logits_are_refused(fresh):
    model, tokenizer = fresh
    norm = model.language_model.model.norm
    norm.weight = mx.full(norm.weight.shape, 3e38)
    chat = Chat(model, tokenizer, IMAGE)
    with pytest.raises(FastVLMError, match="decoder's logits in the prefill came out non-finite"):
        list(chat.ask(QUESTION))


def test_overflowing_decode_logits_are_refused_within_a_few_tokens(fresh, monkeypatch):
    """Decode steps go through the decoder's __call__, the prefill does not: break only those."""
    model, tokenizer = fresh
    chat = Chat(model, tokenizer, IMAGE)
    chat.stop_ids = set()
    decoder = type(model.language_model)
    call = decoder.__call__
    monkeypatch.setattr(decoder, "__call__", lambda self, *a, **k: call(self, *a, **k) * mx.inf)
    answered = []
    with pytest.raises(FastVLMError, match="decoder's logits at answer token .* non-finite"):
        for response in chat.ask(QUESTION, max_tokens=64):
            answered.append(response.token)
    assert 1 <= len(answered) < FINITE_CHECK_EVERY  # the first token came from a finite prefill
