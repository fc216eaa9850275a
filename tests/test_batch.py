"""The batched decode (serve's and caption's) against chat's one-at-a-time answers."""

import mlx.core as mx

from conftest import IMAGE, QUESTION
from fastvlm_mlx import Chat
from fastvlm_mlx.defaults import DEFAULT_SYSTEM
from fastvlm_mlx.generation import BatchDecoder, Stats, encode, make_answer_sampler
from fastvlm_mlx.processor import first_turn, load_image
from fastvlm_mlx.prompt_cache import PromptCache

# Prompts of four lengths: the batch left-pads them to one.
QUESTIONS = [QUESTION, "What colour?", "Count the things you see, one by one.", "Hm"]


def test_batched_answers_are_the_single_answers(tiny):
    check_batched_equals_alone(*tiny)


def test_quantized_batched_answers_are_the_single_answers(tmp_path):
    """The same with a 4-bit decoder: a batch of four goes through the CPU's
    codes-in-place product, one prompt's prefill through the dequantizing one."""
    from test_layouts import mlx_community

    from fastvlm_mlx import load

    model, tokenizer = load(mlx_community(tmp_path / "ckpt", bits=4))
    assert model.language_model.model.layers[0].mlp.up_proj.bits == 4
    check_batched_equals_alone(model, tokenizer)


def check_batched_equals_alone(model, tokenizer) -> None:
    alone = []
    for q in QUESTIONS:
        chat = Chat(model, tokenizer, IMAGE)
        chat.stop_ids = set()
        alone.append(list(chat.ask(q, max_tokens=8)))
    features = encode(model, load_image(IMAGE), model.args.vision_config.image_size)
    decoder = BatchDecoder(model, tokenizer, set(), max_batch=4)
    caches, got = {}, {}
    for q in QUESTIONS:
        prompt = first_turn(tokenizer, DEFAULT_SYSTEM, q)
        cache = PromptCache(model, features.shape[1])
        uid = decoder.add(cache, prompt, features, make_answer_sampler(tokenizer, model, 0.0, 1.0), 8, Stats())
        caches[uid], got[uid] = (cache, prompt), []
    for _ in range(100):  # bounded
        for uid, response in decoder.step():
            got[uid].append(response)
        if not decoder.sequences:
            break
    for uid, want in zip(sorted(got), alone):
        assert [r.token for r in got[uid]] == [r.token for r in want]
        for a, b in zip(got[uid], want):
            assert mx.abs(a.logprobs - b.logprobs).max().item() <= 1e-5 * mx.abs(b.logprobs).max().item()
        assert got[uid][-1].finish_reason == "length"
        assert "".join(r.text for r in got[uid]) == "".join(r.text for r in want)
        cache, prompt = caches[uid]
        tokens = [r.token for r in got[uid]]
        assert cache.ids == prompt + tokens  # the generator feeds each token it returns
        assert min(c.offset for c in cache.layers) == cache.positions(cache.ids)
