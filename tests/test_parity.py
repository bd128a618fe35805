"""The engine's outputs equal a direct `processor -> model.generate` call with the same inputs."""

import pytest
import torch

from blip2_app.backends.base import trim_generated
from blip2_app.backends.local import NewTokensNoRepeatNGram
from blip2_app.generation import GenerationSettings
from blip2_app.prompts import ChatTurn
from tests.conftest import GENERATING_MODELS

DECODINGS = {
    "greedy": GenerationSettings(decoding="greedy", max_new_tokens=12),
    "beam": GenerationSettings(decoding="beam", num_beams=4, num_captions=2, max_new_tokens=12),
    "nucleus": GenerationSettings(decoding="nucleus", top_p=0.8, temperature=0.9, num_captions=2, seed=7),
}


def direct_generate(loaded, image, prompt: str, generation: GenerationSettings) -> list[list[int]]:
    """What a hand-written transformers script does, new tokens only, trailing padding removed."""
    inputs = loaded.processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        if generation.seed is not None:
            torch.manual_seed(generation.seed)
        kwargs = generation.generate_kwargs()
        if loaded.entry.family.decoder_only and kwargs["no_repeat_ngram_size"]:
            # The engine bans repeated n-grams among the new tokens only, as LAVIS does; given the
            # prompt's ids, transformers' own ban would count the prompt too (test below).
            size, kwargs["no_repeat_ngram_size"] = kwargs["no_repeat_ngram_size"], 0
            kwargs["logits_processor"] = [NewTokensNoRepeatNGram(size, inputs["input_ids"].shape[1])]
        output = loaded.model.generate(**inputs, **kwargs)
    if loaded.entry.family.decoder_only:
        output = output[:, inputs["input_ids"].shape[1] :]
    else:
        output = output[:, 1:]
    tokenizer = loaded.processor.tokenizer
    return [trim_generated(row, tokenizer.eos_token_id, tokenizer.pad_token_id) for row in output.tolist()]


@pytest.mark.parametrize("decoding", DECODINGS)
@pytest.mark.parametrize("name", GENERATING_MODELS)
def test_caption_ids_equal_direct_generate(load_tiny, images, name, decoding):
    engine = load_tiny(name, retrieval_model="none")
    generation = DECODINGS[decoding]
    for style, prompt in (("short", None), ("custom", "a photo of")):
        captions = engine.caption([images[0]], style=style, prompt=prompt, generation=generation)[0]
        text_prompt = captions[0].prompt
        expected = direct_generate(engine.text.loaded, images[0], text_prompt, generation)
        assert [list(c.token_ids) for c in captions] == expected
        assert len(captions) == generation.num_captions


@pytest.mark.parametrize("name", GENERATING_MODELS)
def test_vqa_prompt_is_byte_exact_and_answer_matches_direct_call(load_tiny, images, name):
    engine = load_tiny(name, retrieval_model="none")
    generation = DECODINGS["greedy"]
    answer = engine.answer(images[1], "  what colour is\tthe cat? ", generation=generation)
    assert answer.prompt == "Question: what colour is the cat? Short answer:"
    assert (
        list(answer.token_ids) == direct_generate(engine.text.loaded, images[1], answer.prompt, generation)[0]
    )
    chat = engine.chat(images[1], "and the dog?", history=[ChatTurn("what colour is the cat?", "red")])
    assert chat.prompt == "Question: what colour is the cat? Answer: red. Question: and the dog? Answer:"


@pytest.mark.parametrize("name", GENERATING_MODELS)
def test_prompt_encoding_equals_processor(load_tiny, images, name):
    engine = load_tiny(name, retrieval_model="none")
    prompt = "Question: what is on the table? Short answer:"
    ids, mask = engine.text.encode_prompts([prompt])
    expected = engine.text.loaded.processor(images=images[0], text=prompt, return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"])
    assert torch.equal(mask, expected["attention_mask"])


@pytest.mark.parametrize("decoding", ["greedy", "beam"])
@pytest.mark.parametrize("name", GENERATING_MODELS)
def test_batch_with_mixed_prompt_lengths_equals_one_at_a_time(load_tiny, images, name, decoding):
    engine = load_tiny(name, retrieval_model="none")
    generation = DECODINGS[decoding].replace(num_captions=1)
    questions = ["what?", "what colour is the big cat sitting on the left of the sofa?", "why is it here?"]
    batch = engine.answer_batch(images[:3], questions, generation)
    single = [
        engine.answer(img, q, generation=generation) for img, q in zip(images[:3], questions, strict=True)
    ]
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]
    # The tiny models do read the image and the prompt: answers are not all alike.
    assert len({b.token_ids for b in batch}) > 1


def test_images_and_prompts_change_the_output(load_tiny, images):
    engine = load_tiny("tiny-random", retrieval_model="none")
    generation = DECODINGS["greedy"]
    by_image = {engine.caption([img], generation=generation)[0][0].token_ids for img in images}
    assert len(by_image) >= 3


def test_nucleus_seed_is_reproducible_and_seeds_differ(load_tiny, images):
    engine = load_tiny("tiny-random-t5", retrieval_model="none")
    sample = DECODINGS["nucleus"].replace(max_new_tokens=16)
    first = engine.caption([images[0]], generation=sample)[0]
    again = engine.caption([images[0]], generation=sample)[0]
    other = engine.caption([images[0]], generation=sample.replace(seed=8))[0]
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_the_n_gram_ban_counts_the_new_tokens_only():
    """Prompt 5 9 7 5 9: transformers' ban would forbid 7 after 5 9; with no new tokens yet nothing
    is banned. New tokens 1 2 3 1 2: 3 is banned after 1 2, as transformers bans it."""
    ban = NewTokensNoRepeatNGram(3, prompt_length=5)
    scores = torch.zeros(1, 10)
    assert torch.isfinite(ban(torch.tensor([[5, 9, 7, 5, 9]]), scores.clone())).all()
    banned = ban(torch.tensor([[5, 9, 7, 5, 9, 1, 2, 3, 1, 2]]), scores.clone())
    assert torch.isinf(banned[0, 3]) and torch.isfinite(banned[0, torch.arange(10) != 3]).all()
