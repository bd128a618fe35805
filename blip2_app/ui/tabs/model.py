"""The Model tab: what is loaded, where, and in which precision each component really ended up."""

from __future__ import annotations

import gradio as gr

from ...config import Settings
from ...engine import Engine
from ..errors import guarded
from ..report import model_report_markdown
from .common import UI_ONLY, TabContext


class ModelHandlers:
    """What the Model tab's events call (no model work: no GPU, off the queue)."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings

    @guarded("reading the model status")
    def model_report(self) -> str:
        return model_report_markdown(self.engine.info(), self.engine, self.settings)


def build(context: TabContext) -> None:
    """The tab's widgets and events (inside `gr.Tabs`); the report is read again when it is shown."""
    handlers = ModelHandlers(context.engine, context.settings)
    with gr.Tab("Model", id="model", elem_id="tab-model") as tab:
        with gr.Row():
            gr.Markdown(
                "What is loaded, where, and in which precision each component really ended up "
                "(read from the loaded weights, not from the request).",
                elem_classes=["hint"],
            )
            refresh = gr.Button("Refresh", size="sm", scale=0, min_width=110, elem_id="model-refresh")
        report = gr.Markdown(handlers.model_report(), elem_id="model-report")
    refresh.click(handlers.model_report, None, report, **UI_ONLY)
    tab.select(handlers.model_report, None, report, **UI_ONLY)
