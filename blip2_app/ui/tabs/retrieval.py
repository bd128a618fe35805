"""The Retrieval tab: index your own pictures (per session) and search them by text or by image.

Public endpoints: `/index_gallery (files, ...)`, `/search_text (query, top_k, ...)`,
`/search_image (image, top_k, ...)`, `/clear_gallery ()`.

The gallery work itself (decode, de-duplicate, embed, add; search, ITM re-rank) is in the two
functions under "gallery service" below, apart from the handlers, so that a shared gallery service
(blip2_app/retrieval.py) can take their place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from ...config import Settings
from ...engine import MAX_RETRIEVAL_TEXT_TOKENS, Engine
from ...errors import InvalidRequestError
from ...gallery import Gallery
from ...prompts import MAX_QUERY_CHARS, clean_text
from ...retrieval import AddReport, SearchHit
from .. import sessions
from ..components import ResultGallery, image_files, named_number, safe_image
from ..engine_view import LoadedModels
from ..errors import escaped, guarded, user_error
from ..guard import request_address
from ..sessions import MAX_GALLERY_IMAGES, GalleryBudget, GallerySession
from ..validation import flag, one_image, whole_number
from ..zerogpu import gpu
from .common import IMAGE_SOURCES, UI_ONLY, UI_QUEUED, TabContext

MAX_TOP_K = 30
MAX_FILES_PER_REQUEST = MAX_GALLERY_IMAGES  # default; the limit is the gallery's size (--max-gallery-images)

Results = list[tuple[Any, str]]


def display_name(path: Any) -> str:
    name = Path(str(path)).name or "image"
    return name if len(name) <= 80 else name[:77] + "..."


def hit_caption(hit: SearchHit) -> str:
    """The text under a result: rank, name, raw cosine, calibrated probability, ITM if re-ranked."""
    text = f"#{hit.rank} {hit.name} · cosine {hit.cosine:.3f} · p {hit.probability:.2f}"
    if hit.itm_probability is not None:
        text += f" · ITM {hit.itm_probability:.2f}"
    if hit.caption:
        text += f" · {hit.caption}"
    return text


PROGRESS_LABELS = {  # Gallery.add's stages, as the progress bar names them
    "reading": "Reading images",
    "embedding": "Computing image features",
    "captioning": "Captioning images",
}


def index_images(
    engine: Engine, session: GallerySession, paths: list[Any], describe: bool, room: int, progress: Any
) -> AddReport:
    """Adds up to `room` of `paths` to `session` through the gallery service (gallery.py)."""
    gallery = Gallery(engine, session.index, images=session)
    report = gallery.add(
        paths,
        [display_name(path) for path in paths],
        describe=describe,
        limit=room,
        progress=lambda stage, done, total: progress((done, total), desc=PROGRESS_LABELS[stage]),
    )
    session.index = gallery.index
    if not report.added and report.unreadable and not report.duplicates and not report.over_limit:
        first_name, first_reason = report.unreadable[0]
        what = "The file could not" if len(paths) == 1 else f"None of the {len(paths)} files could"
        raise user_error(f"{what} be read as an image. {first_name}: {first_reason}")
    return report


# --------------------------------------------------------------------------- handlers
class RetrievalHandlers:
    """What the Retrieval tab's events call. One instance per app, shared by all sessions: it holds
    the engine, the settings and the bound on galleries in memory; each visitor's gallery is
    passed in and out."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        matcher = LoadedModels.of(engine).matcher
        self.thumbnail_side = max(256, int(matcher.image_size if matcher is not None else 224))
        # The one piece of state shared by sessions: which galleries hold memory (weak references).
        self.galleries = GalleryBudget(settings.max_galleries, settings.max_galleries_per_client)

    @property
    def gallery_limit(self) -> int:
        """Images one gallery holds at most (--max-gallery-images, else the built-in default)."""
        return self.settings.max_gallery_images or sessions.MAX_GALLERY_IMAGES

    @property
    def evicted_message(self) -> str:
        return (
            "Your gallery was emptied to make room for other visitors' galleries (this server keeps at "
            f"most {self.settings.max_galleries} in memory). Please index your images again."
        )

    @gpu(seconds=180)  # indexing a full gallery is the long one
    @guarded("indexing the gallery")
    def index_gallery(
        self,
        files: Any,
        caption_images: bool = False,
        session: GallerySession | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's documented idiom)
        request: gr.Request | None = None,  # filled in by Gradio: who indexes (per-client share)
    ) -> tuple[str, GallerySession]:
        """Adds images to this session's gallery; returns a status sentence."""
        if isinstance(session, GallerySession) and session.evicted:
            gr.Info(self.evicted_message)
            session = None
        session = session if isinstance(session, GallerySession) else GallerySession(side=self.thumbnail_side)
        describe = flag(caption_images, "caption_images")
        paths = self._file_list(files)
        if request is not None and not session.owner:
            session.owner = request_address(request)
        with self.galleries.use(session):  # from here on, no other request can empty this gallery
            session.evicted = False  # emptied while this request waited: it starts afresh
            limit = self.gallery_limit
            room = limit - len(session)
            if room <= 0:
                raise user_error(
                    f"This gallery is full ({limit} images). Clear it before adding more images."
                )
            outcome = index_images(self.engine, session, paths, describe, room, progress)
        return self._report(outcome, len(session), limit), session

    @staticmethod
    def _report(report: AddReport, size: int, limit: int) -> str:
        """The status sentence of an indexing request; what was left out also as warnings."""
        failed, over = report.unreadable, len(report.over_limit)
        for name, reason in failed[:5]:
            gr.Warning(escaped(f"Skipped {name}: {reason}"))
        if len(failed) > 5:
            gr.Warning(f"{len(failed) - 5} more file(s) could not be read either.")
        if over > 0:
            gr.Warning(f"The gallery holds at most {limit} images: {over} image(s) were not added.")
        added = len(report.added)
        status = f"Indexed {added} new image{'s' if added != 1 else ''}; the gallery now holds {size}."
        if report.duplicates:
            status += f" Skipped {len(report.duplicates)} already in the gallery."
        if failed:
            status += f" Could not read {len(failed)} file{'s' if len(failed) != 1 else ''}."
        if over > 0:
            status += f" {over} not added: the gallery is full."
        return status

    def _file_list(self, files: Any) -> list[Any]:
        if files is None or files == []:
            raise user_error("Please choose one or more images to index first.")
        paths = [files] if isinstance(files, (str, dict)) else files
        if not isinstance(paths, (list, tuple)):
            raise InvalidRequestError("Send the images to index as a list of files.")
        most = self.settings.max_gallery_images or MAX_FILES_PER_REQUEST
        if len(paths) > most:
            raise InvalidRequestError(f"{len(paths)} files were sent; index at most {most} images at a time.")
        return [path["path"] if isinstance(path, dict) and "path" in path else path for path in paths]

    def _require_gallery(self, session: Any) -> GallerySession:
        if isinstance(session, GallerySession) and session.evicted:
            raise user_error(self.evicted_message)
        if not isinstance(session, GallerySession) or len(session) == 0:
            raise user_error("The gallery is empty: upload some images and press “Index images” first.")
        return session

    @staticmethod
    def _results(hits: Sequence[SearchHit], session: GallerySession) -> Results:
        return [(session.image(hit.content_hash), hit_caption(hit)) for hit in hits]

    @gpu(seconds=60)
    @guarded("searching the gallery")
    def search_text(
        self,
        query: str,
        top_k: float = 5,
        rerank: bool = False,
        rerank_k: float = 10,
        session: GallerySession | None = None,
    ) -> Results:
        """Best matches for a text, as (image, "#rank name · cosine · p · ITM") pairs."""
        gallery = self._require_gallery(session)
        if not isinstance(query, str):
            raise InvalidRequestError("The search text must be text.")
        text = clean_text(query, "search text", MAX_QUERY_CHARS)
        count = whole_number(top_k, "top_k", 1, MAX_TOP_K)
        use_itm = flag(rerank, "rerank")
        reranked = whole_number(rerank_k, "rerank_k", 1, MAX_TOP_K) if use_itm else 0
        overflow = self.engine.retrieval_text_overflow(text)
        if overflow:
            gr.Warning(
                f"Only the first {MAX_RETRIEVAL_TEXT_TOKENS} tokens of the search text are read (BLIP-2's "
                f"text length); the last {overflow} were left out."
            )
        with self.galleries.use(gallery):
            self._require_gallery(gallery)  # evicted while this request waited?
            hits = Gallery(self.engine, gallery.index, images=gallery).search_text(text, count, reranked)
            return self._results(hits, gallery)

    @gpu(seconds=60)
    @guarded("searching the gallery")
    def search_image(self, image: Any, top_k: float = 5, session: GallerySession | None = None) -> Results:
        """Gallery images most like the given one (the query image itself is left out)."""
        gallery = self._require_gallery(session)
        count = whole_number(top_k, "top_k", 1, MAX_TOP_K)
        prepared = one_image(self.engine, image)
        with self.galleries.use(gallery):
            self._require_gallery(gallery)
            hits = Gallery(self.engine, gallery.index).search_image(prepared, count)
            if not hits:
                gr.Warning("The gallery holds only this image: add other images to compare it with.")
            return self._results(hits, gallery)

    @guarded("clearing the gallery")
    def clear_gallery(self, session: GallerySession | None = None) -> tuple[str, GallerySession]:
        count = len(session) if isinstance(session, GallerySession) else 0
        if isinstance(session, GallerySession):
            self.galleries.forget(session)
        fresh = GallerySession(side=self.thumbnail_side)
        if not count:
            return "The gallery is already empty.", fresh
        return f"Cleared the gallery ({count} image{'s' if count != 1 else ''}).", fresh

    @staticmethod
    def gallery_preview(session: GallerySession | None) -> Results:
        """Thumbnails of everything indexed in this session, in insertion order."""
        if not isinstance(session, GallerySession) or session.index is None:
            return []
        return [(session.image(item.content_hash), item.name) for item in session.index.items()]


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class GalleryWidgets:
    """The left column: upload, index, clear, the status sentence and the thumbnails."""

    files: gr.File
    describe: gr.Checkbox
    index: gr.Button
    clear: gr.Button
    status: gr.Textbox
    preview: ResultGallery


@dataclass(frozen=True)
class SearchWidgets:
    """The right column: both searches' inputs and the shared results gallery."""

    query: gr.Textbox
    top_k: gr.Slider | gr.Number
    rerank: gr.Checkbox
    rerank_k: gr.Slider | gr.Number
    search: gr.Button
    query_image: gr.Image
    image_top_k: gr.Slider | gr.Number
    search_image: gr.Button
    results: ResultGallery


def build(context: TabContext) -> None:
    """The tab's widgets and events (inside `gr.Tabs`)."""
    handlers = RetrievalHandlers(context.engine, context.settings)
    with gr.Tab("Retrieval", id="retrieval", elem_id="tab-retrieval"):
        state = gr.State(None, time_to_live=context.state_ttl)
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=300):
                gallery = _gallery_column(handlers.gallery_limit)
            with gr.Column(scale=6, min_width=300):
                search = _search_column()
    gallery.index.click(
        inputs=[gallery.files, gallery.describe, state],
        outputs=[gallery.status, state],
        api_name="index_gallery",
        api_description="Adds images to this session's gallery; returns a status sentence.",
        **context.model_event(handlers.index_gallery),
    ).then(handlers.gallery_preview, state, gallery.preview, **UI_QUEUED)
    gallery.clear.click(
        handlers.clear_gallery,
        inputs=[state],
        outputs=[gallery.status, state],
        api_name="clear_gallery",
        api_description="Empties this session's gallery.",
        concurrency_limit=None,  # no model work: never waits behind model requests
    ).then(lambda: ([], []), None, [gallery.preview, search.results], **UI_ONLY)
    gr.on(
        [search.search.click, search.query.submit],
        inputs=[search.query, search.top_k, search.rerank, search.rerank_k, state],
        outputs=search.results,
        api_name="search_text",
        api_description="Ranked gallery images for a text, with scores in each caption.",
        **context.model_event(handlers.search_text),
    )
    search.search_image.click(
        inputs=[search.query_image, search.image_top_k, state],
        outputs=search.results,
        api_name="search_image",
        api_description="Gallery images most similar to an example image, with scores.",
        **context.model_event(handlers.search_image),
    )
    search.rerank.change(lambda on: gr.Slider(interactive=on), search.rerank, search.rerank_k, **UI_ONLY)


def _gallery_column(limit: int) -> GalleryWidgets:
    files = image_files(
        file_types=["image"],
        label=f"Images for your gallery (up to {limit})",
        height=190,
        elem_id="gallery-files",
    )
    describe = gr.Checkbox(
        value=False, label="Also caption each image", info="slower; captions appear in results"
    )
    with gr.Row():
        index = gr.Button("Index images", variant="primary", elem_id="index-button")
        clear = gr.Button("Clear gallery", variant="stop", elem_id="clear-gallery")
    status = gr.Textbox(
        value="The gallery is empty.", label="Gallery", interactive=False, elem_id="gallery-status"
    )
    preview = ResultGallery(
        label="Indexed images",
        columns=4,
        height=220,
        interactive=False,
        object_fit="cover",
        elem_id="gallery-preview",
    )
    return GalleryWidgets(files, describe, index, clear, status, preview)


def _top_k(value: int, label: str, name: str, **kwargs: Any) -> gr.Slider | gr.Number:
    return named_number(gr.Slider(1, MAX_TOP_K, value=value, step=1, label=label, **kwargs), name)


def _search_column() -> SearchWidgets:
    with gr.Tabs():
        with gr.Tab("Search by text", id="by-text"):
            query = gr.Textbox(
                label="Describe what you are looking for",
                placeholder="a cat sleeping on a sofa",
                max_length=MAX_QUERY_CHARS,
                elem_id="search-query",
            )
            with gr.Row():
                top_k = _top_k(6, "Results", "top_k")
                rerank = gr.Checkbox(value=False, label="Re-rank with ITM", info="image-text matching head")
                rerank_k = _top_k(10, "Re-rank top k", "rerank_k", interactive=False)
            search = gr.Button("Search", variant="primary", elem_id="search-button")
        with gr.Tab("Search by image", id="by-image"):
            query_image = safe_image(
                label="Example image", sources=IMAGE_SOURCES, height=200, elem_id="query-image"
            )
            image_top_k = _top_k(6, "Results", "top_k")
            search_image = gr.Button("Find similar images", variant="primary", elem_id="search-image-button")
    gr.Markdown(
        "**cosine**: raw ITC score (best of the 32 query tokens; image search: Chamfer "
        "similarity). **p**: calibrated probability (softmax at BLIP-2's temperature 0.07 "
        "over the best matches). **ITM**: match probability from the image-text matching "
        "head, when re-ranked.",
        elem_classes=["hint"],
    )
    results = ResultGallery(
        label="Results",
        columns=3,
        height="auto",
        interactive=False,
        object_fit="cover",
        elem_id="search-results",
    )
    return SearchWidgets(
        query, top_k, rerank, rerank_k, search, query_image, image_top_k, search_image, results
    )
