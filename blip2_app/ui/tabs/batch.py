"""The Batch tab: caption a whole set of images (files or a .zip), optionally ask each one question,
watch the table fill in, stop when you like, download CSV / JSON Lines / a .zip of `name.txt`.

Public endpoint: `/caption_batch (files, style, question, decoding, num_beams, ..., seed, prompt)`
-> the results table (columns file, caption, answer, status), then the download files. It streams:
each batch of images adds its rows, and the table and downloads stand when the visitor stops.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from ... import batch
from ...config import Settings
from ...engine import Engine
from ...errors import InvalidRequestError
from ...prompts import MAX_QUESTION_CHARS
from ..components import image_files, named_choice
from ..decoding import DecodingInputs
from ..errors import guarded, user_error
from ..sessions import MAX_GALLERY_IMAGES, takes_a_file_list
from ..validation import optional_text
from ..zerogpu import gpu
from .caption import STYLES, CaptionHandlers
from .caption import _decoding_widgets as decoding_widgets  # the same knobs, in /caption's order
from .common import UI_ONLY, TabContext

FILE_TYPES = [*sorted(batch.IMAGE_SUFFIXES), ".zip"]
Table = list[list[str]]


class BatchHandlers:
    """What the Batch tab's events call; holds the engine and the limits (one instance per app)."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.captions = CaptionHandlers(engine)
        self.limits = batch.BatchLimits(max_images=settings.max_gallery_images or MAX_GALLERY_IMAGES)

    def items(self, files: Any) -> list[batch.BatchItem]:
        if files is None or files == []:
            raise user_error("Please choose some images (or a .zip of images) to caption first.")
        paths = [files] if isinstance(files, (str, dict)) else files
        if not isinstance(paths, (list, tuple)):
            raise InvalidRequestError("Send the images to caption as a list of files.")
        if len(paths) > self.limits.max_images:
            raise InvalidRequestError(
                f"{len(paths)} files were sent; caption at most {self.limits.max_images} at a time."
            )
        found = [str(p["path"]) if isinstance(p, dict) and "path" in p else str(p) for p in paths]
        return batch.from_paths(found, [Path(p).name for p in found], self.limits)

    # The event. Its parameters are the public API's (names and order), one per widget.
    @takes_a_file_list
    @gpu(seconds=300)
    @guarded("captioning the batch")
    def caption_batch(
        self,
        files: Any,
        style: str = "short",
        question: str | None = "",
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
        prompt: str | None = "",
        progress: gr.Progress = gr.Progress(),  # noqa: B008  # Gradio's own pattern: a default argument
    ) -> Any:
        """Rows (file, caption, answer, status) as each batch finishes, and the download files."""
        knobs = DecodingInputs(  # positional: the widgets' order is DecodingInputs' field order
            decoding, num_beams, temperature, top_p, min_new_tokens, max_new_tokens,
            repetition_penalty, length_penalty, no_repeat_ngram_size, num_captions, seed,
        )  # fmt: skip
        generation = knobs.settings(self.captions.defaults())
        asked = optional_text(question, "question", MAX_QUESTION_CHARS)
        custom = optional_text(prompt, "custom prompt", MAX_QUESTION_CHARS)
        if style == "custom" and not custom:
            raise user_error("The custom style continues your own text: please type a custom prompt.")
        items = self.items(files)
        if not items:
            raise user_error("No images were found in what was sent (a .zip is searched for image files).")
        # Per run, in Gradio's cache (removed by its delete_cache); never shared between sessions.
        folder = Path(tempfile.mkdtemp(prefix="batch-", dir=get_upload_folder()))
        rows: list[batch.Row] = []
        progress((0, len(items)), desc="Captioning", unit="images")
        for done in batch.caption_rows(
            self.engine,
            items,
            style,
            custom if style == "custom" else None,
            generation,
            asked,
            self.limits.batch_size,
            progress=lambda n, total: progress((n, total), desc="Captioning", unit="images"),
        ):
            rows.extend(done)
            # A new folder each time: the files sit in Gradio's cache, which serves them in place,
            # so a download of an earlier update must not change under the visitor's feet.
            snapshot = folder / f"{len(rows):05d}"
            snapshot.mkdir()
            yield [row.as_list() for row in rows], batch.write_all(rows, snapshot)


def build(context: TabContext) -> None:
    """The tab's widgets and events (inside `gr.Tabs`)."""
    handlers = BatchHandlers(context.engine, context.settings)
    limit = handlers.limits.max_images
    with gr.Tab("Batch", id="batch", elem_id="tab-batch"), gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=300):
            files = image_files(
                file_types=FILE_TYPES,
                label=f"Images or a .zip of images (up to {limit} images)",
                height=190,
                elem_id="batch-files",
            )
            style = named_choice(gr.Radio(STYLES, value="short", label="Style"), "style")
            question = gr.Textbox(
                value="",
                label="Question for every image (optional)",
                placeholder="e.g. “what colour is the car?” — its answer gets its own column",
                max_length=MAX_QUESTION_CHARS,
                elem_id="batch-question",
            )
            prompt = gr.Textbox(value="", label="Custom prompt", max_length=MAX_QUESTION_CHARS, visible=False)
            knobs = decoding_widgets(handlers.captions.defaults(), context.unsupported)
            with gr.Row():
                run = gr.Button("Caption all", variant="primary", elem_id="batch-button")
                stop = gr.Button("Stop", variant="stop", elem_id="batch-stop")
        with gr.Column(scale=6, min_width=300):
            table = gr.Dataframe(
                headers=list(batch.COLUMNS),
                datatype=["str"] * len(batch.COLUMNS),
                interactive=False,
                wrap=True,
                column_widths=["22%", "40%", "18%", "20%"],
                label="Results (rows appear as each batch finishes)",
                elem_id="batch-table",
            )
            downloads = gr.File(
                label="Downloads: CSV, JSON Lines, .zip of name.txt captions",
                file_count="multiple",
                interactive=False,
                elem_id="batch-downloads",
            )
    event = run.click(
        inputs=[files, style, question, *knobs, prompt],
        outputs=[table, downloads],
        api_name="caption_batch",
        api_description="Captions (and optional answers) for many images; a table of file, caption, answer, status.",
        **context.model_event(handlers.caption_batch),
    )
    # Cancelling closes the handler between batches: the rows shown (and their files) stay.
    stop.click(None, None, None, cancels=[event], **UI_ONLY)
    style.change(lambda chosen: gr.Textbox(visible=chosen == "custom"), style, prompt, **UI_ONLY)
