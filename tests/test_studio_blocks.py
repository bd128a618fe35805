"""StudioBlocks' hooks into Gradio's input processing (threat model, findings 8b and 9)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import gradio as gr
import pytest

from blip2_app.ui.blocks import StudioBlocks, check_raw_value
from blip2_app.ui.tabs.chat import MAX_EXEMPLAR_ROWS, table_size_check


def test_a_raw_check_runs_before_gradio_parses_the_value(monkeypatch):
    parsed = []

    async def gradio_preprocess(self, block_fn, inputs, state, explicit_call=False):
        parsed.append(inputs)
        return inputs

    monkeypatch.setattr(gr.Blocks, "preprocess_data", gradio_preprocess)
    with StudioBlocks() as demo:
        table = check_raw_value(gr.Dataframe(headers=["question", "answer"]), table_size_check)
    block_fn = SimpleNamespace(inputs=[table], api_name="chat")
    huge = {"headers": ["question", "answer"], "data": [["q", "a"]] * (MAX_EXEMPLAR_ROWS + 1)}
    with pytest.raises(gr.Error, match=f"has {MAX_EXEMPLAR_ROWS + 1} rows"):
        asyncio.run(demo.preprocess_data(block_fn, [huge], None))
    assert parsed == []  # refused before Gradio (and pydantic) looked at it
    fine = {"headers": ["question", "answer"], "data": [["What colour?", "red"]]}
    assert asyncio.run(demo.preprocess_data(block_fn, [fine], None)) == [fine]


def test_a_long_cell_is_refused_on_the_raw_value():
    with pytest.raises(gr.Error, match="at most 2,000 characters each"):
        table_size_check({"data": [["q" * 5000, "a"]]})
    table_size_check({"data": [["What colour?", "red"]]})
    table_size_check(None)  # nothing sent: the parser takes it from here
