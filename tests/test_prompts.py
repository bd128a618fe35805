"""Prompt building: exact templates, cleaning, few-shot, instructions, and context overflow."""

import pytest

from blip2_app.errors import InvalidRequestError
from blip2_app.generation import GenerationSettings
from blip2_app.prompts import ChatTurn, caption_prompt, chat_prompt, clean_answer, vqa_prompt
from blip2_app.registry import Registry

REGISTRY = Registry.load()
OPT = REGISTRY.resolve("blip2-opt-2.7b").templates
INSTRUCT = REGISTRY.resolve("instructblip-vicuna-7b").templates


def test_vqa_templates_per_family():
    for name in ("blip2-opt-2.7b", "blip2-flan-t5-xl", "instructblip-flan-t5-xl", "instructblip-vicuna-7b"):
        templates = REGISTRY.resolve(name).templates
        assert vqa_prompt(templates, "how many cats?") == "Question: how many cats? Short answer:"
        assert vqa_prompt(templates, "how many cats?", short=False) == "Question: how many cats? Answer:"


def test_caption_presets():
    assert caption_prompt(OPT, "short") == ""
    assert caption_prompt(OPT, "detailed") == "Question: Describe this image in detail. Answer:"
    assert caption_prompt(INSTRUCT, "short") == "A short image caption:"
    assert caption_prompt(OPT, "custom", "a photo of") == "a photo of"
    with pytest.raises(InvalidRequestError, match="custom prompt is empty"):
        caption_prompt(OPT, "custom", "   ")
    with pytest.raises(InvalidRequestError, match="Caption style must be one of"):
        caption_prompt(OPT, "poem")


def test_chat_with_few_shot_and_instruction():
    built = chat_prompt(
        OPT,
        "what colour is it?",
        history=[ChatTurn("what is it?", "a cup")],
        exemplars=[ChatTurn("what animal is this?", "a cat")],
        instruction="Answer in one word.",
    )
    assert built.text == (
        "Answer in one word. Question: what animal is this? Answer: a cat. "
        "Question: what is it? Answer: a cup. Question: what colour is it? Answer:"
    )


def test_control_characters_and_limits():
    assert vqa_prompt(OPT, "what\x00 is\x1b this?\n") == "Question: what is this? Short answer:"
    with pytest.raises(InvalidRequestError, match="question is empty"):
        vqa_prompt(OPT, "\x00\t ")
    with pytest.raises(InvalidRequestError, match="limit is 2,000 characters"):
        vqa_prompt(OPT, "x" * 2001)


def test_overflow_drops_oldest_turns_then_exemplars_then_trims_the_question():
    def count(text: str) -> int:
        return len(text.split())

    history = [ChatTurn(f"question {i}?", f"answer {i}") for i in range(10)]
    exemplars = [ChatTurn("example?", "yes")]
    built = chat_prompt(OPT, "last one?", history, exemplars, count_tokens=count, max_tokens=20)
    assert count(built.text) <= 20
    assert built.text.endswith("Question: last one? Answer:")
    assert "question 9?" in built.text and "question 0?" not in built.text
    assert built.dropped_turns > 0 and built.dropped_exemplars == 0 and not built.truncated
    tight = chat_prompt(OPT, "word " * 50 + "end?", history, exemplars, count_tokens=count, max_tokens=10)
    assert count(tight.text) <= 10
    assert tight.truncated and tight.dropped_turns == 10 and tight.dropped_exemplars == 1
    assert tight.text.endswith("end? Answer:")


def test_engine_overflow_keeps_image_tokens(load_tiny, images):
    engine = load_tiny("tiny-random", retrieval_model="none")
    generation = GenerationSettings(decoding="greedy", max_new_tokens=8)
    history = [ChatTurn("what colour is the teapot on the table " * 5, "red " * 20) for _ in range(30)]
    built = engine.build_chat_prompt("and now?", history, generation=generation)
    assert built.dropped_turns > 0
    ids, _ = engine.text.encode_prompts([built.text])
    config = engine.text.loaded.model.config
    assert int((ids == config.image_token_id).sum()) == config.num_query_tokens
    assert ids.shape[1] + generation.max_new_tokens <= config.text_config.max_position_embeddings
    answer = engine.chat(images[0], "and now?", history, generation=generation)
    assert any("oldest chat turn" in note for note in answer.notes)


def test_clean_answer_cuts_the_next_turn():
    assert clean_answer("  red. Question: and the dog? Answer: blue", OPT) == "red."
    assert clean_answer("a cat on a sofa", None) == "a cat on a sofa"
