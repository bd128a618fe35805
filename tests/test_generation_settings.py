import pytest

from blip2_app.errors import InvalidRequestError
from blip2_app.generation import GenerationSettings


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_beams": 0}, "num_beams must be between 1 and 10; got 0"),
        ({"num_beams": 1000}, "num_beams must be between 1 and 10; got 1000"),
        ({"temperature": 0}, "temperature must be between"),
        ({"temperature": -1}, "temperature must be between"),
        ({"top_p": 2}, "top_p must be between"),
        ({"max_new_tokens": 10**6}, "max_new_tokens must be between 1 and 512"),
        ({"min_new_tokens": 40, "max_new_tokens": 30}, "cannot exceed"),
        ({"num_captions": 6, "num_beams": 5}, "at most num_beams captions"),
        ({"decoding": "greedy", "num_captions": 2, "num_beams": 5}, "Greedy decoding gives one caption"),
        ({"decoding": "viterbi"}, "Decoding must be one of"),
        ({"num_beams": 2.5}, "whole number"),
        ({"top_p": "high"}, "must be a number"),
    ],
)
def test_out_of_range_values_are_refused_with_the_knob_named(changes, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerationSettings(**changes)


def test_generate_kwargs_per_decoding():
    beam = GenerationSettings().generate_kwargs()
    assert beam["num_beams"] == 5 and beam["do_sample"] is False and beam["max_new_tokens"] == 30
    nucleus = GenerationSettings(decoding="nucleus", top_p=0.5, temperature=0.7).generate_kwargs()
    assert nucleus["do_sample"] and nucleus["top_p"] == 0.5 and nucleus["temperature"] == 0.7
    assert GenerationSettings(decoding="greedy").generate_kwargs()["num_beams"] == 1
    assert GenerationSettings().replace(num_beams=None).num_beams == 5  # None keeps the value
