"""The gallery service: a `GalleryIndex` and the `Engine` that embeds into it.

The Retrieval tab and the command line (`index`, `search`) both go through `Gallery`, so indexing
(read, skip what is already indexed, embed in batches, caption on request), text and image search
and the ITM re-rank are written once. De-duplication itself is `GalleryIndex.missing`; the index
math (faiss, scores, save / load) stays in retrieval.py, which knows nothing of models.

Indexing reads and embeds `CHUNK_IMAGES` images at a time: a folder of thousands of photos never
holds more than one chunk of decoded images in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from .engine import Engine, ImageInput, PreparedImage
from .errors import InvalidRequestError, UserFacingError
from .images import ImageDecodeError
from .prompts import MAX_QUERY_CHARS, clean_text
from .retrieval import AddReport, GalleryIndex, IndexSettings, SearchHit, rerank_with_itm

CHUNK_IMAGES = 32  # images decoded at once while indexing (up to 48 MB each at the 4096 px bound)
CAPTION_BATCH = 4  # images captioned per generate call when indexing with captions

# progress(stage, done, total); stage is "reading", "embedding" or "captioning". While indexing
# in chunks, "embedding" and "captioning" count up to an estimate that shrinks as duplicates and
# unreadable files turn up (it is exact once the last chunk has been read).
Progress = Callable[[str, int, int], None]


class ImageStore(Protocol):
    """Where a gallery's images live after indexing: ITM re-ranking reads them again.

    The UI keeps a small copy per session (`ui.sessions.GallerySession`); the CLI reads the
    indexed folder (`FolderImages`).
    """

    def keep_image(self, prepared: PreparedImage) -> None: ...

    def prepared(self, content_hash: str) -> PreparedImage: ...


class IndexMismatchError(UserFacingError):
    """A saved index was embedded by another retrieval model than the engine's."""


def new_index(engine: Engine, settings: IndexSettings | None = None) -> GalleryIndex:
    """An empty index sized and labelled for the engine's retrieval model (its query count,
    embedding size and name: the metadata a saved index carries)."""
    if engine.matcher is None:
        raise InvalidRequestError("This app has no retrieval model, so it cannot keep a gallery.")
    config = engine.matcher.model.config
    return GalleryIndex(
        settings or IndexSettings(),
        dim=int(config.image_text_hidden_size),
        num_queries=int(config.num_query_tokens),
        embedding_model=engine.matcher.entry.name,
    )


class Gallery:
    """Index and search one gallery with one engine. Cheap to create: one per request is fine."""

    def __init__(
        self,
        engine: Engine,
        index: GalleryIndex | None = None,
        images: ImageStore | None = None,
        chunk: int = CHUNK_IMAGES,
    ):
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.engine = engine
        self.index = index if index is not None else new_index(engine)
        self.images = images
        self.chunk = chunk
        model = engine.matcher.entry.name if engine.matcher is not None else None
        if self.index.embedding_model and model and self.index.embedding_model != model:
            raise IndexMismatchError(
                f"This gallery was indexed with {self.index.embedding_model}, and this search would embed the "
                f"query with {model}: their embeddings do not compare. Search with --model "
                f"{self.index.embedding_model}, or index the folder again with --model {model}."
            )

    def __len__(self) -> int:
        return len(self.index)

    # ----------------------------------------------------------------- indexing
    def add(
        self,
        images: Sequence[ImageInput],
        names: Sequence[str],
        describe: bool = False,
        limit: int | None = None,
        progress: Progress | None = None,
    ) -> AddReport:
        """Read, de-duplicate, embed and add `images` (shown as `names`); at most `limit` new ones.

        Files that are not images are reported, not raised; `describe` captions each new image
        with the engine's captioning model (stored with it, shown under search results).
        """
        if len(names) != len(images):
            raise ValueError("Gallery.add needs one name per image.")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be 0 or more, got {limit}")
        report = _Tally(len(images), limit, progress)
        for start in range(0, len(images), self.chunk):
            end = min(start + self.chunk, len(images))
            prepared, kept_names = self._read(images, names, start, end, report)
            new = self.index.missing([p.content_hash for p in prepared])
            fresh = set(new)
            report.duplicates += [
                (kept_names[i], p.content_hash) for i, p in enumerate(prepared) if i not in fresh
            ]
            new = report.within_limit(new, kept_names)
            report.pending = report.embedded + len(new) + (len(images) - end)
            if new:
                self._embed([prepared[i] for i in new], [kept_names[i] for i in new], describe, report)
        return report.result()

    def _read(
        self, images: Sequence[ImageInput], names: Sequence[str], start: int, end: int, report: _Tally
    ) -> tuple[list[PreparedImage], list[str]]:
        prepared, kept = [], []
        for i in range(start, end):
            report.step("reading", i, len(images))
            try:
                prepared.append(self.engine.prepare(images[i])[0])
            except ImageDecodeError as error:
                report.unreadable.append((names[i], str(error)))
                continue
            kept.append(names[i])
        return prepared, kept

    def _embed(self, images: list[PreparedImage], names: list[str], describe: bool, report: _Tally) -> None:
        before = report.embedded
        features = self.engine.image_features(
            images, progress=lambda done, _: report.step("embedding", before + done, report.pending)
        )
        captions = self._describe(images, report) if describe else None
        added = self.index.add(features.projections.numpy(), features.content_hashes, names, captions)
        report.added += added.added
        report.embedded += len(images)
        if self.images is not None:
            for image in images:
                self.images.keep_image(image)

    def _describe(self, images: list[PreparedImage], report: _Tally) -> list[str | None]:
        captions: list[str | None] = []
        for start in range(0, len(images), CAPTION_BATCH):
            report.step("captioning", report.embedded + start, report.pending)
            for results in self.engine.caption(images[start : start + CAPTION_BATCH], "short"):
                captions.append(None if results[0].empty else " ".join(results[0].text.split()))
        return captions

    # ----------------------------------------------------------------- search
    def search_text(self, query: str, top_k: int, rerank_k: int = 0) -> list[SearchHit]:
        """The `top_k` best images for a text by ITC; with `rerank_k`, the best `rerank_k` of them
        re-sorted by ITM match probability first (LAVIS' protocol: ITC shortlist, ITM re-rank)."""
        text = clean_text(query, "search text", MAX_QUERY_CHARS)
        embedding = self.engine.text_features([text])[0].numpy()
        hits = self.index.search_text(embedding, max(top_k, rerank_k))
        if rerank_k:
            hits = rerank_with_itm(hits, lambda hashes: self._itm(hashes, text), rerank_k)
        return hits[:top_k]

    def _itm(self, content_hashes: list[str], text: str) -> list[float]:
        if self.images is None:
            raise InvalidRequestError(
                "Re-ranking reads the gallery's images again, and they are not at hand."
            )
        images = [self.images.prepared(h) for h in content_hashes]
        return self.engine.itm(images, [text] * len(images)).tolist()

    def search_image(self, image: ImageInput, top_k: int) -> list[SearchHit]:
        """The `top_k` gallery images most like `image` (the image itself left out, if indexed)."""
        prepared = self.engine.prepare(image)[0]
        features = self.engine.image_features([prepared])
        return self.index.search_image(
            features.projections[0].numpy(), top_k, exclude_hash=prepared.content_hash
        )


class FolderImages:
    """The images of an index built from a folder (`python -m blip2_app index`): names are paths
    relative to that folder. Read on demand, for ITM re-ranking."""

    def __init__(self, folder: str | Path, index: GalleryIndex, engine: Engine):
        self.folder, self.engine = Path(folder), engine
        self._names = {item.content_hash: item.name for item in index.items()}

    def keep_image(self, prepared: PreparedImage) -> None:
        """Nothing to keep: the files stay where they are."""

    def prepared(self, content_hash: str) -> PreparedImage:
        path = self.folder / self._names[content_hash]
        try:
            image = self.engine.prepare(str(path))[0]
        except ImageDecodeError as error:
            raise ImageDecodeError(f"{path}: {error}") from error
        if image.content_hash != content_hash:
            raise UserFacingError(f"{path} has changed since it was indexed: index {self.folder} again.")
        return image


class _Tally:
    """What `Gallery.add` has done so far, and its progress reports."""

    def __init__(self, total: int, limit: int | None, progress: Progress | None):
        self.total, self.room, self.progress = total, limit, progress
        self.added: tuple[int, ...] = ()
        self.duplicates: list[tuple[str, str]] = []
        self.unreadable: list[tuple[str, str]] = []
        self.over_limit: list[str] = []
        self.embedded = 0
        self.pending = total  # images embedded or still to embed, as far as known now

    def step(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def within_limit(self, new: list[int], names: list[str]) -> list[int]:
        """The positions of `new` that still fit in the gallery; the rest are noted as left out."""
        if self.room is None:
            return new
        self.over_limit += [names[i] for i in new[self.room :]]
        new = new[: self.room]
        self.room -= len(new)
        return new

    def result(self) -> AddReport:
        return AddReport(self.added, tuple(self.duplicates), tuple(self.unreadable), tuple(self.over_limit))
