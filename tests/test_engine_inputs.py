"""Every hostile file through the engine: a caption or the specific ImageDecodeError, nothing else."""

import csv
from pathlib import Path

import pytest

from blip2_app.generation import GenerationSettings
from blip2_app.images import ImageDecodeError

HOSTILE = Path(__file__).parent / "data" / "hostile"
FILES = sorted(p.name for p in HOSTILE.iterdir() if p.name != "MANIFEST.tsv")


@pytest.mark.parametrize("name", FILES)
def test_hostile_file_through_caption(load_tiny, name):
    engine = load_tiny("tiny-random", retrieval_model="none")
    path = HOSTILE / name
    try:
        captions = engine.caption(
            [str(path)], generation=GenerationSettings(decoding="greedy", max_new_tokens=3)
        )
    except ImageDecodeError as error:
        message = str(error)
        assert message.endswith(".") and "\n" not in message and len(message) < 200
        return
    assert len(captions) == 1 and captions[0][0].text


def test_manifest_lists_every_file():
    with open(HOSTILE / "MANIFEST.tsv") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    listed = {row[0] for row in rows[1:] if row}
    assert set(FILES) <= listed


def test_inputs_of_every_kind_give_the_same_caption(load_tiny):
    import numpy as np
    from PIL import Image

    engine = load_tiny("tiny-random", retrieval_model="none")
    path = Path(__file__).parent / "data" / "photos" / "skimage_coffee.png"
    image = Image.open(path).convert("RGB")
    greedy = GenerationSettings(decoding="greedy", max_new_tokens=5)
    sources = [str(path), path.read_bytes(), image, np.asarray(image), {"path": str(path)}]
    results = {engine.caption([s], generation=greedy)[0][0].token_ids for s in sources}
    assert len(results) == 1


def test_an_empty_answer_is_said_not_returned(load_tiny, monkeypatch):
    """A model that ends its text at once (EOS first) gives the notice, never an empty string."""
    import torch
    from transformers import LogitsProcessor

    from blip2_app.backends import AnswerDone
    from blip2_app.engine import EMPTY_TEXT_NOTICE

    engine = load_tiny("tiny-random")
    language_model = engine.text.loaded.model.language_model
    eos = engine.text.loaded.processor.tokenizer.eos_token_id

    class EndAtOnce(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -float("inf"))
            forced[:, eos] = 0.0
            return forced

    original = language_model.generate
    monkeypatch.setattr(
        language_model,
        "generate",
        lambda **kw: original(**{**kw, "logits_processor": [*kw.get("logits_processor", []), EndAtOnce()]}),
    )
    photo = str(sorted((Path(__file__).parents[1] / "assets" / "examples").glob("*.jpg"))[0])
    greedy = GenerationSettings(decoding="greedy", max_new_tokens=5)
    [[caption]] = engine.caption([photo], generation=greedy)  # per image, its captions
    assert caption.text == EMPTY_TEXT_NOTICE and caption.empty
    assert engine.answer(photo, "what is it?", generation=greedy).text == EMPTY_TEXT_NOTICE
    assert list(engine.chat_stream(photo, "what is it?", generation=greedy)) == [
        AnswerDone(EMPTY_TEXT_NOTICE, empty=True)
    ]
