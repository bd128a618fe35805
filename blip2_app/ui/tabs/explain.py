"""The Explain tab, on the retrieval model: how well a text matches an image (ITM, ITC), where in
the image the match comes from (a Grad-CAM heatmap, and one per word), and zero-shot labels.

Public endpoints: `/match (image, text)` -> {"itm", "itc"}; `/explain (image, text)` -> the heatmap
over the image, then the per-word maps; `/classify (image, labels, template, rerank)` -> a
`gr.Label` value. What the maps mean and where they mislead: docs/explain.md.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from ... import explain as explaining
from ...engine import Engine
from ..components import ResultGallery, safe_image
from ..errors import guarded
from ..validation import flag, one_image
from ..zerogpu import gpu
from .common import IMAGE_SOURCES, TabContext

MEANING = (
    "**ITM** {itm:.3f}: the match head's probability that this text describes this image (0-1). "
    "**ITC** {itc:.3f}: the cosine between the image's best query embedding and the text's "
    "(what search ranks by; compare it between texts, not against a fixed threshold)."
)
CLASSIFY_NOTE = (
    "Probabilities: softmax of the ITC cosines at temperature {temperature} (LAVIS' initial value: "
    "this checkpoint does not keep a learned one)."
)
RERANK_NOTE = " Re-ranked: the order and the scores are each label's own ITM match probability (they need not sum to 1)."


class ExplainHandlers:
    """What the Explain tab's events call; holds only the engine (one instance per app)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @gpu(seconds=30)
    @guarded("matching the image and the text")
    def match(self, image: Any, text: str) -> tuple[dict[str, float], str]:
        """ITM match probability and ITC cosine, and one line on what each means."""
        result = explaining.match(self.engine, one_image(self.engine, image), text)
        return result.as_dict(), MEANING.format(itm=result.itm, itc=result.itc)

    @gpu(seconds=60)
    @guarded("drawing the heatmap")
    def explain(self, image: Any, text: str) -> tuple[Any, list[tuple[Any, str]]]:
        """The heatmap over the image, and one small map per word."""
        prepared = one_image(self.engine, image)
        heatmap = explaining.explain(self.engine, prepared, text)
        words = [(explaining.overlay(prepared.image, grid, size=160), word) for word, grid in heatmap.words]
        return explaining.overlay(prepared.image, heatmap.grid), words

    @gpu(seconds=30)
    @guarded("ranking the labels")
    def classify(
        self,
        image: Any,
        labels: str,
        template: str | None = explaining.DEFAULT_TEMPLATE,
        rerank: bool = False,
    ) -> tuple[dict[str, float], str]:
        """The labels ranked best first, as a gr.Label value, and how the scores were computed."""
        prepared = one_image(self.engine, image)
        names = explaining.parse_labels(labels)
        use_itm = flag(rerank, "rerank")
        scores = explaining.classify(
            self.engine, prepared, names, explaining.check_template(template), use_itm
        )
        value = {s.label: (s.itm if use_itm and s.itm is not None else s.probability) for s in scores}
        note = CLASSIFY_NOTE.format(temperature=explaining.ITC_TEMPERATURE) + (RERANK_NOTE if use_itm else "")
        return value, note


def build(context: TabContext) -> None:
    """The tab's widgets and events (inside `gr.Tabs`)."""
    handlers = ExplainHandlers(context.engine)
    with gr.Tab("Explain", id="explain", elem_id="tab-explain"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=300):
                image = safe_image(label="Image", sources=IMAGE_SOURCES, height=300, elem_id="explain-image")
                text = gr.Textbox(
                    label="Text to match",
                    placeholder="e.g. “the red circle”",
                    max_length=explaining.MAX_TEXT_CHARS,
                    elem_id="explain-text",
                )
                button = gr.Button("Match and explain", variant="primary", elem_id="explain-button")
                scores = gr.JSON(label="Scores", elem_id="match-scores")
                meaning = gr.Markdown(elem_id="match-meaning")
            with gr.Column(scale=6, min_width=300):
                heatmap = gr.Image(
                    label="Where the match comes from (red = strongest)",
                    type="pil",
                    interactive=False,
                    height=340,
                    elem_id="explain-heatmap",
                )
                words = ResultGallery(
                    label="Per word", columns=6, height=200, interactive=False, elem_id="explain-words"
                )
        with gr.Accordion("Zero-shot labels", open=True), gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=300):
                labels = gr.Textbox(
                    label=f"Labels (comma-separated or one per line, up to {explaining.MAX_LABELS})",
                    lines=3,
                    placeholder="cat, dog, car",
                    elem_id="classify-labels",
                )
                template = gr.Textbox(
                    value=explaining.DEFAULT_TEMPLATE,
                    label="Template ({} is the label)",
                    max_length=120,
                    elem_id="classify-template",
                )
                rerank = gr.Checkbox(value=False, label="Re-rank by ITM (slower, often sharper)")
                classify = gr.Button("Rank labels", variant="primary", elem_id="classify-button")
            with gr.Column(scale=6, min_width=300):
                ranked = gr.Label(
                    num_top_classes=explaining.MAX_LABELS, label="Labels", elem_id="classify-output"
                )
                note = gr.Markdown(elem_id="classify-note")
    button.click(
        inputs=[image, text],
        outputs=[scores, meaning],
        api_name="match",
        api_description="ITM match probability (itm) and ITC cosine (itc) of an image and a text.",
        **context.model_event(handlers.match),
    )
    button.click(
        inputs=[image, text],
        outputs=[heatmap, words],
        api_name="explain",
        api_description="Grad-CAM heatmap of where the image matches the text, then one map per word.",
        **context.model_event(handlers.explain),
    )
    gr.on(
        [classify.click, labels.submit],
        inputs=[image, labels, template, rerank],
        outputs=[ranked, note],
        api_name="classify",
        api_description="Zero-shot labels ranked best first (ITC softmax; optional ITM re-rank).",
        **context.model_event(handlers.classify),
    )
