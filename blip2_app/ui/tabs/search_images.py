"""`/search_images`: index a list of images and search them in one call, keeping nothing.

The gallery search an agent can call (issue 18, `--mcp`). Gradio's MCP server calls every tool
with a session state's default value, so the Retrieval tab's gallery, kept in the session, cannot
outlive one tool call (ui/sessions.py, `session_bound`). This endpoint takes the images with the
query instead: they are indexed into a gallery that lives for this call only, through the same
gallery service (gallery.py) and the same input checks as `/index_gallery`, `/search_text`,
`/search_image` and `/search_combined`, and the ranked results come back as the Retrieval tab's
JSON download writes them, plus each image's position in the list.

API-only (docs/api.md says why): on the page, the Retrieval tab does the same in two steps with a
gallery that stays. The event is wired to hidden widgets in that tab, in the model's queue group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import gradio as gr

from ...engine import PreparedImage
from ...gallery import SCORE_KINDS, CombinedQuery, Gallery, above_minimum, hits_record
from ...images import is_data_url
from ...retrieval import SearchHit
from ..components import image_list, named_choice, named_number, safe_image
from ..errors import guarded, user_error
from ..sessions import GallerySession
from ..validation import flag, one_image, whole_number
from ..zerogpu import gpu
from .common import TabContext
from .retrieval import MAX_TOP_K, PROGRESS_LABELS, RetrievalHandlers, SearchView, display_name

DESCRIPTION = (
    "Rank a list of images (1 to {limit}, each a data: URL or an uploaded file) by a text description "
    "and/or an example image, with BLIP-2's image-text contrastive (ITC) scores, and optionally "
    "re-rank the best by its image-text matching (ITM) head. The images are indexed for this call "
    "only: nothing is kept between calls. Returns the ranked results: rank, index (the image's "
    "position in the list, from 0), name, cosine, p, itm."
)


class StatelessSearch:
    """`/search_images`' handler: the Retrieval tab's checks and gallery service, without a session."""

    def __init__(self, retrieval: RetrievalHandlers):
        self.retrieval = retrieval
        self.engine = retrieval.engine

    @gpu(seconds=180)  # indexing up to --max-gallery-images images, as /index_gallery
    @guarded("searching the images")
    def search_images(
        self,
        images: list[str],
        query: str = "",
        top_k: float = 6,
        min_score: float = 0.0,
        score: str = "cosine",
        rerank: bool = False,
        rerank_k: float = 10,
        image: str | None = None,
        negative: str = "",
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's documented idiom)
    ) -> dict[str, Any]:
        """Rank a list of images by a text and/or an example image, in one call that keeps nothing.

        Args:
            images: the images to search, each a data: URL (base64) or an uploaded file.
            query: what to look for, e.g. "a red circle" (may be empty when an example image is given).
            top_k: how many results to return (1-30).
            min_score: results whose score is below this (0-1) are left out and counted (0 keeps all).
            score: what min_score applies to: "cosine" (the raw ITC score) or "p" (calibrated probability).
            rerank: re-sort the best rerank_k results of a text query by ITM match probability.
            rerank_k: how many of the best results to re-rank (1-30).
            image: an example image to search by (optional; that image itself is left out of the results).
            negative: what the results should not look like, e.g. "snow" (optional).

        Returns:
            {"results": [{"rank", "index", "name", "sha256", "cosine", "p", "itm", "caption"}],
            "hidden_below_minimum", "query"}, best first; index is the image's position in images.
        """
        paths = self.retrieval.file_list(images)
        _, view = RetrievalHandlers.set_min_score(min_score, score)
        text = "" if query is None or (isinstance(query, str) and not query.strip()) else query
        asked = self._query(text, top_k, rerank, rerank_k, image, negative)
        hits, hidden = asked.ranked(self._indexed(paths, progress), view)
        described = {"text": asked.text, "image": asked.example is not None, "negative": asked.negative}
        record = hits_record(
            [replace(hit, name=_name(paths, int(hit.name))) for hit in hits],
            described | {"images": len(paths)},
            hidden,
        )
        for hit, result in zip(hits, record["results"], strict=True):
            result["index"] = int(hit.name)
        return record

    def _query(self, text: Any, top_k: Any, rerank: Any, rerank_k: Any, image: Any, negative: Any) -> _Query:
        if negative is not None and not isinstance(negative, str):
            raise user_error("The negative text must be text.")
        example = None if image is None or image == "" else one_image(self.engine, image)
        if text == "" and example is None:
            raise user_error("Give a search text, an example image, or both.")
        if text:
            text, count, reranked = self.retrieval.text_query(text, top_k, rerank, rerank_k)
        else:  # an example image alone: no text to check, nothing to re-rank
            count, reranked = whole_number(top_k, "top_k", 1, MAX_TOP_K), int(flag(rerank, "rerank"))
        if reranked and (example is not None or (negative or "").strip()):
            raise user_error("rerank applies to a text query alone (no example image, no negative text).")
        return _Query(text, count, reranked, example, (negative or "").strip())

    def _indexed(self, paths: list[Any], progress: Any) -> Gallery:
        """The images in a gallery of their own; names are their positions. Unreadable: refused."""
        kept = GallerySession(side=self.retrieval.thumbnail_side)  # the copies ITM re-ranks with
        gallery = Gallery(self.engine, images=kept)
        report = gallery.add(
            paths,
            [str(i) for i in range(len(paths))],
            progress=lambda stage, done, total: progress((done, total), desc=PROGRESS_LABELS[stage]),
        )
        if report.unreadable:
            position, reason = report.unreadable[0]
            more = len(report.unreadable) - 1
            raise user_error(
                f"images[{position}] ({_name(paths, int(position))}) could not be read: {reason}"
                + (f" ({more} more could not be read either)" if more else "")
            )
        return gallery


@dataclass(frozen=True)
class _Query:
    """A checked query: text, top_k, how many to re-rank by ITM (0: none), example image, negative."""

    text: str
    count: int
    reranked: int
    example: PreparedImage | None
    negative: str

    def ranked(self, gallery: Gallery, view: SearchView) -> tuple[list[SearchHit], int]:
        """The hits, as the Retrieval tab's searches rank them, and how many the minimum score hid."""
        if self.example is None and not self.negative:
            hits = gallery.search_text(self.text, self.count, self.reranked)
        elif not self.text and not self.negative:
            assert self.example is not None  # checked in StatelessSearch._query
            hits = gallery.search_image(self.example, self.count)
        else:
            hits = gallery.search_combined(CombinedQuery(self.text, self.example, self.negative), self.count)
        return above_minimum(hits, view.minimum, view.kind) if view.minimum > 0 else (hits, 0)


def _name(paths: list[Any], position: int) -> str:
    """An image's name in the results: its file name, or `image <position>` for a data: URL."""
    path = paths[position]
    return f"image {position}" if is_data_url(path) else display_name(path)


def wire(context: TabContext, retrieval: RetrievalHandlers) -> None:
    """The hidden widgets and the public `/search_images` event (call inside the Retrieval tab)."""
    handlers = StatelessSearch(retrieval)
    with gr.Group(visible=False):
        images = image_list(label="Images to search")
        query = gr.Textbox(value="", label="Search text")
        top_k = named_number(gr.Slider(1, MAX_TOP_K, value=6, step=1, label="Results"), "top_k")
        min_score = named_number(gr.Slider(0, 1, value=0, step=0.01, label="Minimum score"), "min_score")
        score = named_choice(gr.Radio(list(SCORE_KINDS), value="cosine", label="applies to"), "score")
        rerank = gr.Checkbox(value=False, label="Re-rank with ITM")
        rerank_k = named_number(gr.Slider(1, MAX_TOP_K, value=10, step=1, label="Re-rank top k"), "rerank_k")
        example = safe_image(label="Example image")
        negative = gr.Textbox(value="", label="But not")
        run = gr.Button("Search the images")
        results = gr.JSON(label="Results")
    run.click(
        inputs=[images, query, top_k, min_score, score, rerank, rerank_k, example, negative],
        outputs=results,
        api_name="search_images",
        api_description=DESCRIPTION.format(limit=retrieval.gallery_limit),
        **context.model_event(handlers.search_images),
    )
