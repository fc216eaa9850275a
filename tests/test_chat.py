"""Multi-turn chat on one KV cache, and streaming."""

import mlx.core as mx
import pytest

from conftest import IMAGE, QUESTION, rel_err
from fastvlm_mlx import Chat, FastVLMError, generate
from fastvlm_mlx.prompt_cache import ModelMemo
from fastvlm_mlx.defaults import DEFAULT_SYSTEM
from fastvlm_mlx.processor import first_turn, next_turn


def from_scratch_logprobs(chat: Chat, ids: list[int]):
    """The next-token log-probabilities of `ids` prefilled in one pass, no cache."""
    model = chat.model
    logits = model.language_model(None, input_embeddings=model.embed(ids, chat.features))[0, -1]
    return logits - logits.logsumexp()


def answer(chat: Chat, question: str, max_tokens: int = 5):
    return list(chat.ask(question, max_tokens=max_tokens))


def test_second_turn_reuses_cache_and_matches_full_prefill(tiny):
    model, tokenizer = tiny
    ModelMemo.of(model).prefix = None  # the opening turn prefills everything
    chat = Chat(model, tokenizer, IMAGE)
    first = answer(chat, QUESTION)
    history = list(chat.tokens)
    assert history[-1] == chat.im_end  # the answer was closed for the template
    second = answer(chat, "What colour is it?")
    own = next_turn(tokenizer, "What colour is it?")
    # Only the closing <|im_end|> of the first answer and the new turn were prefilled.
    assert second[-1].stats.prompt_tokens == len(own) + 1
    opening = first_turn(tokenizer, DEFAULT_SYSTEM, QUESTION)
    assert first[-1].stats.prompt_tokens == len(opening) - 1 + chat.visual_tokens
    full = history + own
    assert rel_err(second[0].logprobs, from_scratch_logprobs(chat, full)) <= 1e-4
    assert second[-1].stats.vision_s == 0.0  # the image was encoded once


def half_answered(chat: Chat):
    """A stream of a long answer, stopped after two responses."""
    stream = chat.ask(QUESTION, max_tokens=50)
    next(stream)
    next(stream)
    return stream


def test_interrupted_answer_keeps_the_session_consistent(tiny):
    model, tokenizer = tiny
    chat = Chat(model, tokenizer, IMAGE)
    half_answered(chat).close()  # what Ctrl-C does in the CLI
    history = list(chat.tokens)
    own = next_turn(tokenizer, "And now?")
    reply = answer(chat, "And now?")
    assert rel_err(reply[0].logprobs, from_scratch_logprobs(chat, history + own)) <= 1e-4


def test_an_old_stream_never_changes_a_later_turn(tiny):
    model, tokenizer = tiny
    chat = Chat(model, tokenizer, IMAGE)
    old = half_answered(chat)
    newer = list(chat.ask("And the colours?", max_tokens=5))
    history = list(chat.tokens)
    assert list(old) == []  # superseded: it yields nothing more
    old.close()
    del old
    assert chat.tokens == history
    # The next answer starts from the newer turn, as a prefill from scratch would.
    reply = list(chat.ask("More?", max_tokens=3))
    ids = history + next_turn(tokenizer, "More?")
    assert rel_err(reply[0].logprobs, from_scratch_logprobs(chat, ids)) <= 1e-4
    assert newer[-1].finish_reason is not None


def test_reset_starts_over_with_the_same_image(tiny):
    model, tokenizer = tiny
    chat = Chat(model, tokenizer, IMAGE)
    first = answer(chat, QUESTION)
    answer(chat, "More?")
    chat.reset()
    again = answer(chat, QUESTION)
    assert [r.token for r in again] == [r.token for r in first]
    assert again[-1].stats.prompt_tokens == first[-1].stats.prompt_tokens


def test_streamed_text_is_the_decoded_answer(tiny):
    model, tokenizer = tiny
    chat = Chat(model, tokenizer, IMAGE)
    chat.stop_ids = set()
    responses = answer(chat, QUESTION, max_tokens=24)
    tokens = [r.token for r in responses]
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens)
    assert responses[-1].finish_reason == "length"
    assert responses[-1].stats.generation_tokens == 24


def test_generate_api_one_shot(tiny, reference):
    model, tokenizer = tiny
    text = generate(model, tokenizer, IMAGE, QUESTION, max_tokens=8)
    expected = tokenizer.decode(reference["generated_ids"].tolist())
    assert text == expected


def test_prompt_longer_than_context_is_refused(tiny):
    model, tokenizer = tiny
    chat = Chat(model, tokenizer, IMAGE)
    with pytest.raises(FastVLMError, match="context is 4096"):
        answer(chat, "word " * 5000)
    assert chat.tokens == []  # nothing was recorded


def test_new_conversations_reuse_the_prefix_and_the_image(tiny, reference):
    """A second conversation on the same model skips the encoder (same picture) and
    the template before the image, and still computes the reference logits."""
    model, tokenizer = tiny
    Chat(model, tokenizer, IMAGE).ask(QUESTION, max_tokens=1).__next__()
    again = Chat(model, tokenizer, IMAGE)
    assert again.vision_s < 0.01  # features came from the content-hash cache
    response = next(again.ask(QUESTION, max_tokens=1))
    ids = reference["input_ids"][0].tolist()
    assert response.stats.prompt_tokens == len(ids) - 1 + 16 - ids.index(-200)
    logits = reference["prefill_logits"]
    assert rel_err(response.logprobs, logits - mx.logsumexp(logits)) <= 1e-4
