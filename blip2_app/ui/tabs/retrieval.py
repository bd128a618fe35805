"""The Retrieval tab: index your own pictures (per session) and search them by text or by image.

Public endpoints: `/index_gallery (files, ...)`, `/search_text (query, top_k, ...)`,
`/search_image (image, top_k, ...)`, `/clear_gallery ()`, and for issue 18: `/more_like_this (item,
top_k)`, `/search_caption (item, top_k)`, `/search_combined (query, image, negative, top_k)`,
`/set_min_score (min_score, score)`, `/results_json ()`, `/download_gallery ()`, `/load_gallery
(archive)`. Selecting a result is a private UI step (it fills the hidden `item` box).

The gallery work itself (decode, de-duplicate, embed, add; search, ITM re-rank) is in the two
functions under "gallery service" below, apart from the handlers, so that a shared gallery service
(blip2_app/retrieval.py) can take their place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from ...config import Settings
from ...engine import MAX_RETRIEVAL_TEXT_TOKENS, Engine
from ...errors import InvalidRequestError
from ...gallery import (
    SCORE_KINDS,
    CombinedQuery,
    Gallery,
    above_minimum,
    hits_record,
    read_archive,
    write_archive,
)
from ...prompts import MAX_QUERY_CHARS, clean_text
from ...retrieval import AddReport, GalleryItem, SearchHit
from .. import sessions
from ..components import ResultGallery, image_files, named_number, safe_image
from ..downloads import download_path, write_download
from ..engine_view import LoadedModels
from ..errors import escaped, guarded, user_error
from ..guard import request_address
from ..sessions import MAX_GALLERY_IMAGES, GalleryBudget, GallerySession, session_bound
from ..validation import flag, one_image, whole_number
from ..zerogpu import gpu
from .common import IMAGE_SOURCES, UI_ONLY, UI_QUEUED, TabContext

MAX_TOP_K = 30
MAX_FILES_PER_REQUEST = MAX_GALLERY_IMAGES  # default; the limit is the gallery's size (--max-gallery-images)

Results = list[tuple[Any, str]]


@dataclass(frozen=True)
class SearchView:
    """A session's minimum score (/set_min_score): results under it are hidden, and counted."""

    minimum: float = 0.0
    kind: str = "cosine"  # "cosine" or "p"


@dataclass(frozen=True)
class SearchReport:
    """The session's last search: what is shown, how many were hidden, and what was asked."""

    hits: tuple[SearchHit, ...]
    hidden: int
    view: SearchView
    query: dict[str, Any] = field(default_factory=dict)


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

    @session_bound
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
        paths = self.file_list(files)
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

    def file_list(self, files: Any) -> list[Any]:
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

    def _text_hits(
        self, query: Any, top_k: Any, rerank: Any, rerank_k: Any, session: Any
    ) -> tuple[list[SearchHit], GallerySession]:
        gallery = self._require_gallery(session)
        text, count, reranked = self.text_query(query, top_k, rerank, rerank_k)
        with self.galleries.use(gallery):
            self._require_gallery(gallery)  # evicted while this request waited?
            return Gallery(self.engine, gallery.index, images=gallery).search_text(
                text, count, reranked
            ), gallery

    def text_query(self, query: Any, top_k: Any, rerank: Any, rerank_k: Any) -> tuple[str, int, int]:
        """A text search's checked inputs: the text, top_k, and how many to re-rank by ITM (0: none)."""
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
        return text, count, reranked

    def _image_hits(self, image: Any, top_k: Any, session: Any) -> tuple[list[SearchHit], GallerySession]:
        gallery = self._require_gallery(session)
        count = whole_number(top_k, "top_k", 1, MAX_TOP_K)
        prepared = one_image(self.engine, image)
        with self.galleries.use(gallery):
            self._require_gallery(gallery)
            hits = Gallery(self.engine, gallery.index).search_image(prepared, count)
            if not hits:
                gr.Warning("The gallery holds only this image: add other images to compare it with.")
            return hits, gallery

    def search_text(
        self,
        query: str,
        top_k: float = 5,
        rerank: bool = False,
        rerank_k: float = 10,
        session: GallerySession | None = None,
    ) -> Results:
        """/search_text's results alone, as (image, "#rank name · cosine · p · ITM") pairs."""
        return self.text_search(query, top_k, rerank, rerank_k, session)[0]

    def search_image(self, image: Any, top_k: float = 5, session: GallerySession | None = None) -> Results:
        """/search_image's results alone (the query image itself is left out)."""
        return self.image_search(image, top_k, session)[0]

    # ----------------------------------------------------------------- the search events
    # Public endpoints; their parameters are the API's. The session's minimum score (`view`, set by
    # /set_min_score) hides weak results; the last search (`SearchReport`) is kept for the note
    # under the results, "more like this" on a selected result and the JSON download.
    @session_bound
    @gpu(seconds=60)
    @guarded("searching the gallery")
    def text_search(
        self,
        query: str,
        top_k: float = 6,
        rerank: bool = False,
        rerank_k: float = 10,
        session: GallerySession | None = None,
        view: SearchView | None = None,
    ) -> tuple[Results, SearchReport]:
        """Search this session's gallery by a text description.

        Args:
            query: what to look for, e.g. "a red circle on the left".
            top_k: how many results to return (1-30).
            rerank: re-sort the best rerank_k results by the image-text matching (ITM) head.
            rerank_k: how many of the best results to re-rank (1-30).

        Returns:
            Ranked gallery images, each captioned "#rank name · cosine · p · ITM · stored caption".
        """
        hits, gallery = self._text_hits(query, top_k, rerank, rerank_k, session)
        return self._shown(hits, gallery, view, {"text": query})

    @session_bound
    @gpu(seconds=60)
    @guarded("searching the gallery")
    def image_search(
        self,
        image: Any,
        top_k: float = 6,
        session: GallerySession | None = None,
        view: SearchView | None = None,
    ) -> tuple[Results, SearchReport]:
        """Search this session's gallery for images like an example image (itself left out).

        Args:
            image: the example image.
            top_k: how many results to return (1-30).

        Returns:
            Ranked gallery images, each captioned "#rank name · cosine · p".
        """
        hits, gallery = self._image_hits(image, top_k, session)
        return self._shown(
            hits, gallery, view, {"image": display_name(image) if isinstance(image, str) else "image"}
        )

    @session_bound
    @gpu(seconds=30)
    @guarded("searching the gallery")
    def more_like_this(
        self,
        item: str,
        top_k: float = 6,
        session: GallerySession | None = None,
        view: SearchView | None = None,
    ) -> tuple[Results, SearchReport]:
        """Search this session's gallery for images like one of its own images (itself left out).

        Args:
            item: the gallery image's name as results show it, or its sha256.
            top_k: how many results to return (1-30).
        """
        gallery = self._require_gallery(session)
        count = whole_number(top_k, "top_k", 1, MAX_TOP_K)
        with self.galleries.use(gallery):
            chosen = self._item(gallery, item)
            hits = Gallery(self.engine, gallery.index).more_like(chosen.content_hash, count)
            return self._shown(hits, gallery, view, {"more_like": chosen.name, "sha256": chosen.content_hash})

    @session_bound
    @gpu(seconds=60)
    @guarded("searching the gallery")
    def caption_search(
        self,
        item: str,
        top_k: float = 6,
        session: GallerySession | None = None,
        view: SearchView | None = None,
    ) -> tuple[Results, SearchReport]:
        """Search this session's gallery with the stored caption of one of its images.

        Args:
            item: the gallery image's name as results show it, or its sha256 (indexed with captions).
            top_k: how many results to return (1-30).
        """
        gallery = self._require_gallery(session)
        chosen = self._item(gallery, item)
        if not chosen.caption:
            raise user_error(
                f"{chosen.name} has no stored caption: index with “Also caption each image” to search by it."
            )
        hits, gallery = self._text_hits(chosen.caption, top_k, False, 1, gallery)
        return self._shown(hits, gallery, view, {"text": chosen.caption, "caption_of": chosen.name})

    @session_bound
    @gpu(seconds=60)
    @guarded("searching the gallery")
    def combined_search(
        self,
        query: str = "",
        image: Any = None,
        negative: str = "",
        top_k: float = 6,
        session: GallerySession | None = None,
        view: SearchView | None = None,
    ) -> tuple[Results, SearchReport]:
        """Search this session's gallery by a text and/or an example image, minus a negative text.

        Each part's score is standardised over the gallery; positives add, the negative subtracts
        (docs/retrieval.md). E.g. an image of a red circle with negative "a red shape".

        Args:
            query: what to look for (may be empty when an image is given).
            image: an example image (optional).
            negative: what the results should not look like, e.g. "snow" (optional).
            top_k: how many results to return (1-30).
        """
        gallery = self._require_gallery(session)
        for value, what in ((query, "search text"), (negative, "negative text")):
            if value is not None and not isinstance(value, str):
                raise InvalidRequestError(f"The {what} must be text.")
        count = whole_number(top_k, "top_k", 1, MAX_TOP_K)
        prepared = None if image is None or image == "" else one_image(self.engine, image)
        combined = CombinedQuery(query or "", prepared, negative or "")
        with self.galleries.use(gallery):
            self._require_gallery(gallery)
            hits = Gallery(self.engine, gallery.index).search_combined(combined, count)
        described = {"text": query or "", "image": bool(prepared), "negative": negative or ""}
        return self._shown(hits, gallery, view, described)

    @staticmethod
    @session_bound
    def set_min_score(min_score: float = 0.0, score: str = "cosine") -> tuple[str, SearchView]:
        """Set this session's minimum score: later searches hide results below it.

        Args:
            min_score: the lowest score shown (0 shows everything).
            score: what it applies to: "cosine" (the raw score) or "p" (the calibrated probability).
        """
        if score not in SCORE_KINDS:
            raise user_error(f"score must be one of {', '.join(SCORE_KINDS)}; got {score!r}.")
        if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not -1 <= min_score <= 1:
            raise user_error(f"min_score must be a number from -1 to 1; got {min_score!r}.")
        view = SearchView(float(min_score), score)
        shown = (
            "everything is shown"
            if view.minimum <= 0
            else f"results under {score} {view.minimum:.2f} are hidden"
        )
        return f"Minimum score set: {shown}.", view

    def _shown(
        self, hits: list[SearchHit], gallery: GallerySession, view: Any, query: dict[str, Any]
    ) -> tuple[Results, SearchReport]:
        view = view if isinstance(view, SearchView) else SearchView()
        kept, hidden = above_minimum(hits, view.minimum, view.kind) if view.minimum > 0 else (hits, 0)
        return self._results(kept, gallery), SearchReport(tuple(kept), hidden, view, query)

    @staticmethod
    def _item(gallery: GallerySession, item: Any) -> GalleryItem:
        """The gallery image a result names: by sha256, else by name (the first of that name)."""
        if not isinstance(item, str) or not item.strip():
            raise user_error("Select a result first (click one of the results), then use it as the query.")
        items = gallery.index.items() if gallery.index is not None else []
        for found in items:
            if item in (found.content_hash, found.name):
                return found
        raise user_error(f"No image named {item[:80]!r} is in the gallery: search again and pick a result.")

    @staticmethod
    def selected(report: Any, event: gr.SelectData) -> str:
        """UI step: the sha256 of the result just clicked (for "More like this")."""
        if not isinstance(report, SearchReport) or not isinstance(event.index, int):
            return ""
        return report.hits[event.index].content_hash if 0 <= event.index < len(report.hits) else ""

    @staticmethod
    def results_note(report: Any) -> str:
        """The line under the results: how many were hidden by the minimum score."""
        if not isinstance(report, SearchReport):
            return ""
        if not report.hidden:
            return f"{len(report.hits)} result{'s' if len(report.hits) != 1 else ''}."
        return (
            f"{len(report.hits)} shown; {report.hidden} result{'s' if report.hidden != 1 else ''} under the "
            f"minimum {report.view.kind} {report.view.minimum:.2f} hidden."
        )

    @session_bound
    @guarded("downloading the results")
    def results_json(self, report: SearchReport | None = None) -> str:
        """The last search's results as a JSON file: rank, name, sha256, scores, stored caption."""
        if not isinstance(report, SearchReport):
            raise user_error("There are no results to download yet: search first.")
        record = hits_record(report.hits, report.query, report.hidden)
        return write_download(
            "results.json", json.dumps(record, indent=2, ensure_ascii=False), self.download_ttl
        )

    # ----------------------------------------------------------------- keeping a gallery
    @property
    def download_ttl(self) -> float:
        return self.settings.upload_ttl_minutes * 60

    @session_bound
    @guarded("downloading the gallery")
    def download_gallery(self, session: GallerySession | None = None) -> str:
        """This session's gallery as one archive (index, embeddings, small image copies) to load later.

        Returns:
            A .zip file in the format `python -m blip2_app index` writes, plus the image copies.
        """
        gallery = self._require_gallery(session)
        with self.galleries.use(gallery):
            self._require_gallery(gallery)
            path = download_path("gallery.zip", self.download_ttl)
            assert gallery.index is not None  # _require_gallery: not empty
            write_archive(gallery.index, dict(gallery.images), path)
        return str(path)

    @session_bound
    @gpu(seconds=30)
    @guarded("loading the gallery")
    def load_gallery(
        self,
        archive: Any,
        session: GallerySession | None = None,
        request: gr.Request | None = None,
    ) -> tuple[str, GallerySession]:
        """Replace this session's gallery with one downloaded before (a gallery .zip archive).

        Args:
            archive: the .zip file from "Download gallery" (or a zipped `python -m blip2_app index` folder).
        """
        if isinstance(archive, dict):
            archive = archive.get("path")
        if not isinstance(archive, str) or not archive:
            raise user_error("Please choose a gallery archive (.zip) to load first.")
        index, images = read_archive(archive, self.engine, self.gallery_limit)
        fresh = GallerySession(side=self.thumbnail_side)
        if request is not None:
            fresh.owner = request_address(request)
        with self.galleries.use(fresh):
            fresh.adopt(index, images)
        if isinstance(session, GallerySession):
            self.galleries.forget(session)
        missing = len(index) - len(images)
        status = f"Loaded a gallery of {len(index)} image{'s' if len(index) != 1 else ''}."
        if missing:
            status += f" {missing} came without a picture (shown grey; no ITM re-rank for them)."
        return status, fresh

    @session_bound
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
    """The left column: upload, index, clear, keep (download / load), the status and the thumbnails."""

    files: gr.File
    describe: gr.Checkbox
    index: gr.Button
    clear: gr.Button
    status: gr.Textbox
    preview: ResultGallery
    download: gr.Button
    archive_out: gr.File
    archive_in: gr.File
    load: gr.Button


@dataclass(frozen=True)
class SearchWidgets:
    """The right column: the searches' inputs, the minimum score and the shared results."""

    query: gr.Textbox
    top_k: gr.Slider | gr.Number
    rerank: gr.Checkbox
    rerank_k: gr.Slider | gr.Number
    search: gr.Button
    query_image: gr.Image
    image_top_k: gr.Slider | gr.Number
    search_image: gr.Button
    combined_text: gr.Textbox
    combined_image: gr.Image
    combined_negative: gr.Textbox
    combined_top_k: gr.Slider | gr.Number
    search_combined: gr.Button
    min_score: gr.Slider | gr.Number
    score_kind: gr.Radio
    min_status: gr.Textbox
    results: ResultGallery
    note: gr.Markdown
    selected: gr.Textbox
    more_like: gr.Button
    by_caption: gr.Button
    download: gr.Button
    results_file: gr.File


def build(context: TabContext) -> None:
    """The tab's widgets and events (inside `gr.Tabs`)."""
    handlers = RetrievalHandlers(context.engine, context.settings)
    with gr.Tab("Retrieval", id="retrieval", elem_id="tab-retrieval"):
        state = gr.State(None, time_to_live=context.state_ttl)
        view = gr.State(SearchView(), time_to_live=context.state_ttl)
        last = gr.State(None, time_to_live=context.state_ttl)
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=300):
                gallery = _gallery_column(handlers.gallery_limit)
            with gr.Column(scale=6, min_width=300):
                search = _search_column()
        # /search_images (API-only; its module builds on these handlers, hence the late import).
        from . import search_images

        search_images.wire(context, handlers)
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
    _keep_events(context, handlers, gallery, state)
    shown: dict[str, Any] = {"outputs": [search.results, last]}
    searches = [
        gr.on(
            [search.search.click, search.query.submit],
            inputs=[search.query, search.top_k, search.rerank, search.rerank_k, state, view],
            api_name="search_text",
            api_description="Ranked gallery images for a text, with scores in each caption.",
            **shown,
            **context.model_event(handlers.text_search),
        ),
        search.search_image.click(
            inputs=[search.query_image, search.image_top_k, state, view],
            api_name="search_image",
            api_description="Gallery images most similar to an example image, with scores.",
            **shown,
            **context.model_event(handlers.image_search),
        ),
        search.search_combined.click(
            inputs=[
                search.combined_text,
                search.combined_image,
                search.combined_negative,
                search.combined_top_k,
                state,
                view,
            ],
            api_name="search_combined",
            api_description="Gallery images for a text and/or an image, minus a negative text.",
            **shown,
            **context.model_event(handlers.combined_search),
        ),
        search.more_like.click(
            inputs=[search.selected, search.image_top_k, state, view],
            api_name="more_like_this",
            api_description="Gallery images like one of its own images (given by name or sha256).",
            **shown,
            **context.model_event(handlers.more_like_this),
        ),
        search.by_caption.click(
            inputs=[search.selected, search.top_k, state, view],
            api_name="search_caption",
            api_description="Gallery images for the stored caption of one of its images.",
            **shown,
            **context.model_event(handlers.caption_search),
        ),
    ]
    for event in searches:
        event.then(handlers.results_note, last, search.note, **UI_ONLY)
    search.results.select(handlers.selected, last, search.selected, **UI_ONLY)
    gr.on(
        [search.min_score.change, search.score_kind.change],
        handlers.set_min_score,
        inputs=[search.min_score, search.score_kind],
        outputs=[search.min_status, view],
        api_name="set_min_score",
        api_description="Sets this session's minimum score: later searches hide results below it.",
        concurrency_limit=None,
    )
    search.download.click(
        handlers.results_json,
        inputs=[last],
        outputs=search.results_file,
        api_name="results_json",
        api_description="The last search's results as a JSON file.",
        concurrency_limit=None,
    )
    search.rerank.change(lambda on: gr.Slider(interactive=on), search.rerank, search.rerank_k, **UI_ONLY)


def _keep_events(
    context: TabContext, handlers: RetrievalHandlers, gallery: GalleryWidgets, state: gr.State
) -> None:
    """Download the session's gallery as an archive, and load one back."""
    gallery.download.click(
        handlers.download_gallery,
        inputs=[state],
        outputs=gallery.archive_out,
        api_name="download_gallery",
        api_description="This session's gallery as one .zip archive, to load again later.",
        **UI_QUEUED | {"api_visibility": "public"},
    )
    gallery.load.click(
        inputs=[gallery.archive_in, state],
        outputs=[gallery.status, state],
        api_name="load_gallery",
        api_description="Replaces this session's gallery with a downloaded gallery archive.",
        **context.model_event(handlers.load_gallery),
    ).then(handlers.gallery_preview, state, gallery.preview, **UI_QUEUED)


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
    with gr.Accordion("Keep this gallery", open=False, elem_id="keep-gallery"):
        download = gr.Button("Download gallery", size="sm", elem_id="download-gallery")
        archive_out = gr.File(label="Gallery archive", interactive=False, elem_id="gallery-archive")
        archive_in = gr.File(
            label="Load a gallery archive (.zip)",
            file_types=[".zip"],
            type="filepath",
            elem_id="gallery-load-file",
        )
        load = gr.Button("Load gallery", size="sm", elem_id="load-gallery")
    return GalleryWidgets(
        files, describe, index, clear, status, preview, download, archive_out, archive_in, load
    )


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
        with gr.Tab("Combined", id="combined"):
            combined_text = gr.Textbox(
                label="Text (optional)",
                placeholder="shapes like this one",
                max_length=MAX_QUERY_CHARS,
                elem_id="combined-text",
            )
            combined_image = safe_image(
                label="Example image (optional)", sources=IMAGE_SOURCES, height=160, elem_id="combined-image"
            )
            combined_negative = gr.Textbox(
                label="But not (optional)",
                placeholder="a red shape",
                max_length=MAX_QUERY_CHARS,
                elem_id="combined-negative",
            )
            combined_top_k = _top_k(6, "Results", "top_k")
            search_combined = gr.Button("Search", variant="primary", elem_id="combined-button")
    with gr.Row():
        min_score = named_number(
            gr.Slider(
                0,
                1,
                value=0,
                step=0.01,
                label="Minimum score",
                info="0 shows everything",
                elem_id="min-score",
            ),
            "min_score",
        )
        score_kind = gr.Radio(list(SCORE_KINDS), value="cosine", label="applies to", elem_id="min-score-kind")
    min_status = gr.Textbox(visible=False)
    gr.Markdown(
        "**cosine**: raw ITC score (best of the 32 query tokens; image search: Chamfer "
        "similarity; combined: the sum of standardised scores). **p**: calibrated probability "
        "(softmax at BLIP-2's temperature 0.07 over the best matches). **ITM**: match probability "
        "from the image-text matching head, when re-ranked.",
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
    note = gr.Markdown("", elem_id="results-note")
    selected = gr.Textbox(visible=False, elem_id="selected-result")
    with gr.Row():
        more_like = gr.Button("More like this", size="sm", elem_id="more-like-this")
        by_caption = gr.Button("Search with its caption", size="sm", elem_id="search-caption")
        download = gr.Button("Download results (JSON)", size="sm", elem_id="download-results")
    results_file = gr.File(label="Results file", interactive=False, elem_id="results-file")
    return SearchWidgets(
        query,
        top_k,
        rerank,
        rerank_k,
        search,
        query_image,
        image_top_k,
        search_image,
        combined_text,
        combined_image,
        combined_negative,
        combined_top_k,
        search_combined,
        min_score,
        score_kind,
        min_status,
        results,
        note,
        selected,
        more_like,
        by_caption,
        download,
        results_file,
    )
