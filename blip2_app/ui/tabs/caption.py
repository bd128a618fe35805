"""The Caption tab: captions for one image, every decoding knob at hand.

Public endpoint: `/caption (image, style, prompt, decoding, num_beams, ..., seed)` -> one caption
per line. The image is uploaded, an example (the model's own or the photos: tabs/examples.py) or
drawn on the Draw tab, which the button's first step turns into the image (tabs/drawing.py).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from ...batching import TextBatcher
from ...engine import Engine
from ...generation import GenerationSettings
from ...prompts import MAX_QUESTION_CHARS
from ..components import named_choice
from ..decoding import DecodingInputs, decoding_choice, seed_number, slider
from ..engine_view import LoadedModels
from ..errors import guarded
from ..validation import one_image, one_line, optional_text
from ..zerogpu import gpu
from .common import UI_ONLY, TabContext
from .drawing import image_slot
from .examples import examples_for

STYLES = [("Short", "short"), ("Detailed", "detailed"), ("Custom prompt", "custom")]


class CaptionHandlers:
    """What the Caption tab's events call; holds the engine and the app's batcher, through which
    captions are written together with other visitors' (one instance per app)."""

    def __init__(self, engine: Engine, batcher: TextBatcher | None = None):
        self.engine = engine
        self.batcher = batcher or TextBatcher.one_at_a_time(engine)
        self.models = LoadedModels.of(engine)

    def defaults(self) -> GenerationSettings:
        return self.models.decoding

    def write(self, image: Any, style: str, prompt: Any, decoding: DecodingInputs) -> str:
        """Captions for one image, one per line (`decoding.num_captions` lines)."""
        prepared = one_image(self.engine, image)
        prompt = optional_text(prompt, "custom prompt", MAX_QUESTION_CHARS)
        generation = decoding.settings(self.defaults())
        results = self.batcher.caption(prepared, style, prompt if style == "custom" else None, generation)
        return "\n".join(one_line(generated.text) for generated in results)

    # The events. Their parameters are the public API's (names and order), one per widget.
    @gpu(seconds=60)
    @guarded("writing captions")
    def caption(
        self,
        image: Any,
        style: str = "short",
        prompt: str | None = "",
        decoding: str | None = None,
        num_beams: float | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        min_new_tokens: float | None = None,
        max_new_tokens: float | None = None,
        repetition_penalty: float | None = None,
        length_penalty: float | None = None,
        no_repeat_ngram_size: float | None = None,
        num_captions: float | None = None,
        seed: float | None = None,
    ) -> str:
        """Captions for one image, one per line."""
        knobs = DecodingInputs(
            decoding=decoding,
            num_beams=num_beams,
            temperature=temperature,
            top_p=top_p,
            min_new_tokens=min_new_tokens,
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            num_captions=num_captions,
            seed=seed,
        )
        return self.write(image, style, prompt, knobs)

    @gpu(seconds=60)
    def example_caption(self, image: Any) -> str:
        """The default caption of an example photo (what lazy example caching stores)."""
        return self.caption(image)


def build(context: TabContext) -> None:
    """The tab's widgets and events (inside `gr.Tabs`)."""
    handlers = CaptionHandlers(context.engine, context.batcher)
    with gr.Tab("Caption", id="caption", elem_id="tab-caption"):
        # Created before the examples (which write into it when cached), shown further down.
        output = gr.Textbox(
            label="Captions (one per line)",
            lines=3,
            max_lines=12,
            interactive=False,
            buttons=["copy"],
            elem_id="caption-output",
            render=False,
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=300):
                slot = image_slot(
                    context.engine,
                    "caption",
                    "Image",
                    height=340,
                    state_ttl=context.state_ttl,
                    examples=lambda image: _examples(context, handlers, image, output),
                )
            with gr.Column(scale=6, min_width=300):
                style = named_choice(
                    gr.Radio(STYLES, value="short", label="Style", info=_style_info(context)), "style"
                )
                prompt = gr.Textbox(
                    value="",
                    label="Custom prompt",
                    placeholder="e.g. “A photograph of” — the caption continues this text",
                    max_length=MAX_QUESTION_CHARS,
                    visible=False,
                )
                knobs = _decoding_widgets(handlers.defaults(), context.unsupported)
                button = gr.Button("Write caption", variant="primary", elem_id="caption-button")
                output.render()
    # On the Draw tab the drawing first becomes the image (tabs/drawing.py); /caption is unchanged.
    button.click(**slot.first_step()).success(
        inputs=[slot.image, style, prompt, *knobs],
        outputs=output,
        api_name="caption",
        api_description="Captions for one image, one per line.",
        **context.batched_model_event(handlers.caption),
    )
    style.change(lambda chosen: gr.Textbox(visible=chosen == "custom"), style, prompt, **UI_ONLY)


def _style_info(context: TabContext) -> str | None:
    captioner = context.models.captioner
    if captioner is None or captioner.templates is None:
        return None
    detailed = captioner.templates.caption_detailed or "(no prompt)"
    return f"Detailed sends “{detailed}” for you; custom continues your own text."


def _examples(context: TabContext, handlers: CaptionHandlers, image: gr.Image, output: gr.Textbox) -> None:
    """The model's own example pictures, or the photos (tabs/examples.py)."""
    examples = examples_for(context)
    if not examples.images:
        return
    cached = context.settings.cache_examples == "lazy"
    gr.Examples(
        [[path] for path in examples.images],
        inputs=[image],
        outputs=[output] if cached else None,
        fn=context.on_gpu(handlers.example_caption) if cached else None,
        label=examples.label,
        examples_per_page=8,
        elem_id="caption-examples",
        api_visibility="private",
        # Cached: the first click anywhere computes the default caption, then every visitor gets
        # it at once. Never "eager" (Gradio's default on a Space), which would caption every
        # photo before the app opens.
        cache_examples=cached,
        cache_mode="lazy" if cached else None,
    )


def _decoding_widgets(
    defaults: GenerationSettings, unsupported: dict[str, str]
) -> list[gr.components.Component]:
    """The decoding radio and the "Advanced settings" accordion, in `/caption`'s parameter order
    (decoding, num_beams, temperature, top_p, min/max new tokens, penalties, n-gram, count, seed)."""
    decoding = decoding_choice(defaults.decoding, unsupported.get("beam"))
    with gr.Accordion("Advanced settings", open=False):
        with gr.Row():
            beams = slider("num_beams", defaults.num_beams, "Beams", 1, "beam search only", unsupported)
            count = slider(
                "num_captions", defaults.num_captions, "Number of captions", 1, elem_id="caption-count"
            )
        with gr.Row():
            temperature = slider("temperature", defaults.temperature, "Temperature", 0.01, "sampling only")
            top_p = slider("top_p", defaults.top_p, "Top-p", 0.01, "sampling only")
        with gr.Row():
            min_tokens = slider("min_new_tokens", defaults.min_new_tokens, "Min new tokens", 1)
            max_tokens = slider("max_new_tokens", defaults.max_new_tokens, "Max new tokens", 1)
        with gr.Row():
            repetition = slider("repetition_penalty", defaults.repetition_penalty, "Repetition penalty", 0.05)
            length = slider(
                "length_penalty",
                defaults.length_penalty,
                "Length penalty",
                0.1,
                "beam search only",
                unsupported,
            )
        with gr.Row():
            ngram = slider(
                "no_repeat_ngram_size",
                defaults.no_repeat_ngram_size,
                "No-repeat n-gram size",
                1,
                "0 = off",
                unsupported,
            )
            seed = seed_number()
    return [
        decoding,
        beams,
        temperature,
        top_p,
        min_tokens,
        max_tokens,
        repetition,
        length,
        ngram,
        count,
        seed,
    ]
