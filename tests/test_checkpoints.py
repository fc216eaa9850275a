"""What checkpoints hold beyond weights: their dtype, context, preprocessing facts, and overflow."""

import mlx.core as mx
import pytest

from conftest import CHECKPOINT, IMAGE, QUESTION
from fastvlm_mlx import Chat, load
from fastvlm_mlx.errors import FastVLMError
from fastvlm_mlx.generation import FINITE_CHECK_EVERY
from fastvlm_mlx.utils import default_dtype, stored_dtype


def test_default_dtype_is_the_checkpoints_own_off_the_cpu(monkeypatch):
    weights = {"a": mx.zeros((4, 4), mx.bfloat16), "b": mx.zeros((2,), mx.float32),
               "q": mx.zeros((64,), mx.uint32)}
    assert stored_dtype(weights) == mx.bfloat16
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert default_dtype(mx.bfloat16) == mx.float32  # no fast half precision on the CPU backend
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert default_dtype(mx.bfloat16) == mx.bfloat16 and default_dtype(mx.float16) == mx.float16


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


def checkpoint_copy(tmp_path, **config_changes):
    """The fixture checkpoint with its config.json changed (None removes a key)."""
    import json
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, out)
    config = json.loads((out / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_context_is_the_checkpoints_tokenizer_model_max_length(tmp_path):
    """The reference truncates at tokenizer_model_max_length (8192 published): a
    conversation longer than that is refused, an answer stops at it."""
    model, tokenizer = load(checkpoint_copy(tmp_path, tokenizer_model_max_length=200), dtype=mx.float32)
    assert model.args.context_length == 200
    chat = Chat(model, tokenizer, IMAGE)
    with pytest.raises(FastVLMError, match="context is 200"):
        list(chat.ask("word " * 200))
    chat.stop_ids = set()
    prompt = chat.cache.positions(chat.prompt_ids(QUESTION))
    assert len(list(chat.ask(QUESTION, max_tokens=1000))) == 200 - prompt
    # Without it, max_position_embeddings bounds the conversation, as before.
    model, _ = load(checkpoint_copy(tmp_path / "b", tokenizer_model_max_length=None), dtype=mx.float32)
    assert model.args.context_length == model.args.text_config.max_position_embeddings == 4096


@pytest.mark.parametrize("value", [0, -5, "8192", 1.5, True])
def test_bad_tokenizer_model_max_length_is_refused(tmp_path, value):
    with pytest.raises(FastVLMError, match="tokenizer_model_max_length must be a positive int"):
        load(checkpoint_copy(tmp_path, tokenizer_model_max_length=value))


def with_preprocessor(tmp_path, **entries):
    import json

    out = checkpoint_copy(tmp_path)
    (out / "preprocessor_config.json").write_text(json.dumps(entries))
    return out


# mlx-community/FastVLM-*'s file (FastVLMImageProcessor) and Apple's export's (CLIPImageProcessor).
PUBLISHED_PREPROCESSORS = [
    dict(crop_size={"height": 256, "width": 256}, do_center_crop=True, do_normalize=True, do_rescale=True,
         image_mean=[0, 0, 0], image_std=[1, 1, 1], resample=3, rescale_factor=0.00392156862745098,
         size={"shortest_edge": 256}, image_processor_type="FastVLMImageProcessor"),
    dict(crop_size={"height": 256, "width": 256}, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
         resample=3, rescale_factor=1 / 255, size={"shortest_edge": 256},
         image_processor_type="CLIPImageProcessor"),
]


@pytest.mark.parametrize("entries", PUBLISHED_PREPROCESSORS)
def test_fastvlm_preprocessors_load_quietly(tmp_path, entries, capfd):
    load(with_preprocessor(tmp_path, **entries))
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("entries, message", [
    (dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]),
     "sets image_mean .* not a FastVLM preprocessor"),
    (dict(image_mean=[0, 0, 0], image_std=[0.5, 0.5, 0.5]), "sets image_std"),
    (dict(image_mean="zero"), "sets image_mean 'zero'"),
    (dict(rescale_factor=1.0), "rescale_factor 1.0"),
])
def test_other_normalizations_are_refused(tmp_path, entries, message):
    with pytest.raises(FastVLMError, match=message):
        load(with_preprocessor(tmp_path, **entries))


def test_other_sizes_and_resampling_get_a_note(tmp_path, capfd):
    load(with_preprocessor(tmp_path, size={"shortest_edge": 1024}, resample=2))
    err = capfd.readouterr().err
    assert "names 1024 px, the tower's config 256 px" in err and "resample 2" in err
