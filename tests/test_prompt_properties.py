"""Property-based: any history / few-shot / question text gives a prompt that fits the context
and keeps every image token."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blip2_app.errors import InvalidRequestError
from blip2_app.generation import GenerationSettings
from blip2_app.prompts import ChatTurn

text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),  # any Unicode, control characters included
    max_size=300,
)
turns = st.lists(st.builds(ChatTurn, question=text, answer=text), max_size=12)


@pytest.fixture(scope="module")
def engine(load_tiny):
    return load_tiny("tiny-random", retrieval_model="none")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=text, history=turns, exemplars=turns, instruction=text, max_new=st.integers(1, 300))
def test_chat_prompt_fits_and_keeps_image_tokens(engine, question, history, exemplars, instruction, max_new):
    generation = GenerationSettings(decoding="greedy", max_new_tokens=max_new)
    try:
        built = engine.build_chat_prompt(question, history, exemplars, instruction, generation)
    except InvalidRequestError as error:
        # Only an empty question (after cleaning) is refused; the sentence says so.
        assert "question is empty" in str(error)
        assert not question.strip() or all(not c.isprintable() or c.isspace() for c in question)
        return
    ids, _ = engine.text.encode_prompts([built.text])
    config = engine.text.loaded.model.config
    assert int((ids == config.image_token_id).sum()) == config.num_query_tokens
    assert (ids[0, : config.num_query_tokens] == config.image_token_id).all()
    assert ids.shape[1] + max_new <= config.text_config.max_position_embeddings
    assert built.text.endswith("Answer:")
