"""The gallery service: a `GalleryIndex` and the `Engine` that embeds into it.

The Retrieval tab and the command line (`index`, `search`) both go through `Gallery`, so indexing
(read, skip what is already indexed, embed in batches, caption on request), text and image search
and the ITM re-rank are written once. De-duplication itself is `GalleryIndex.missing`; the index
math (faiss, scores, save / load) stays in retrieval.py, which knows nothing of models.

Indexing reads and embeds `CHUNK_IMAGES` images at a time: a folder of thousands of photos never
holds more than one chunk of decoded images in memory.
"""

from __future__ import annotations

import re
import stat
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .engine import Engine, ImageInput, PreparedImage
from .errors import InvalidRequestError, UserFacingError
from .images import ImageDecodeError, load_image
from .prompts import MAX_QUERY_CHARS, clean_text
from .retrieval import AddReport, GalleryIndex, IndexFormatError, IndexSettings, SearchHit, rerank_with_itm

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

    # ----------------------------------------------------------------- "more like this", combined
    def more_like(self, content_hash: str, top_k: int) -> list[SearchHit]:
        """The `top_k` gallery images most like one of its own images (that image left out), from
        its stored embeddings: nothing is decoded or embedded again."""
        try:
            embeddings = self.index.embeddings_of(content_hash)
        except KeyError:
            raise InvalidRequestError(
                "That image is not in the gallery (any more): search again and pick a result."
            ) from None
        return self.index.search_image(embeddings, top_k, exclude_hash=content_hash)

    def search_combined(self, query: CombinedQuery, top_k: int) -> list[SearchHit]:
        """Rank by a text and/or an image, minus an optional negative text (docs/retrieval.md).

        Each part's ITC score (text: max over the queries of cosine; image: Chamfer) is
        standardised over the gallery (z-score), then positives are added and the negative
        subtracted, each with weight 1: the two kinds of score live on different scales (image
        to image 0.2-0.9, text to image 0.3-0.8 on the demo model), and a z-score puts them on
        one without a tuned weight. The hit's `cosine` is that combined score; its `probability`
        the softmax of the combined scores at temperature 1.
        """
        texts = [
            clean_text(text, what, MAX_QUERY_CHARS) if text.strip() else ""
            for text, what in ((query.text, "search text"), (query.negative, "negative text"))
        ]
        if not texts[0] and query.image is None:
            raise InvalidRequestError(
                "Give a search text, an example image, or both (a negative text alone ranks nothing)."
            )
        if len(self.index) == 0:
            return []
        embedded = [t for t in texts if t]
        features = self.engine.text_features(embedded).numpy() if embedded else np.empty((0, 0))
        by_text = dict(zip(embedded, features, strict=True))
        total = np.zeros(len(self.index))
        exclude = None
        if texts[0]:
            total += _standardised(self.index.all_scores(text_embedding=by_text[texts[0]]))
        if query.image is not None:
            prepared = self.engine.prepare(query.image)[0]
            projections = self.engine.image_features([prepared]).projections[0].numpy()
            total += _standardised(self.index.all_scores(image_embeddings=projections))
            exclude = prepared.content_hash
        if texts[1]:
            total -= _standardised(self.index.all_scores(text_embedding=by_text[texts[1]]))
        return self.index.rank_scores(total, top_k, exclude_hash=exclude, temperature=1.0)


@dataclass(frozen=True)
class CombinedQuery:
    """A text and/or an example image, and an optional negative text ("but not ...")."""

    text: str = ""
    image: ImageInput | None = None
    negative: str = ""


def _standardised(scores: np.ndarray) -> np.ndarray:
    """Scores as z-scores over the gallery; all zero when they do not vary (one image)."""
    spread = float(scores.std())
    return (scores - scores.mean()) / spread if spread > 1e-9 else np.zeros_like(scores, dtype=np.float64)


SCORE_KINDS = ("cosine", "p")


def above_minimum(
    hits: Sequence[SearchHit], minimum: float, kind: str = "cosine"
) -> tuple[list[SearchHit], int]:
    """The hits whose score (`cosine`, or `p`: the calibrated probability) is at least `minimum`,
    ranks kept, and how many were hidden."""
    if kind not in SCORE_KINDS:
        raise InvalidRequestError(
            f"The minimum score applies to one of {', '.join(SCORE_KINDS)}; got {kind!r}."
        )
    kept = [hit for hit in hits if (hit.cosine if kind == "cosine" else hit.probability) >= minimum]
    return kept, len(hits) - len(kept)


def hits_record(hits: Sequence[SearchHit], query: dict[str, Any], hidden: int = 0) -> dict[str, Any]:
    """Search results as the JSON download writes them: per hit name, rank, scores, stored caption."""
    return {
        "format": "blip2-studio.search-results",
        "version": 1,
        "query": query,
        "hidden_below_minimum": hidden,
        "results": [
            {
                "rank": hit.rank,
                "name": hit.name,
                "sha256": hit.content_hash,
                "cosine": round(hit.cosine, 6),
                "p": round(hit.probability, 6),
                "itm": None if hit.itm_probability is None else round(hit.itm_probability, 6),
                "caption": hit.caption,
            }
            for hit in hits
        ],
    }


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


# --------------------------------------------------------------------------- keeping a gallery
# A gallery archive is a zip of the index folder exactly as `GalleryIndex.save` writes it (what
# `python -m blip2_app index` writes: manifest.json, data-<uuid>/items.json, embeddings.npy),
# plus `images/<sha256>.jpg`: the small copy of each image the app shows and re-ranks with. So a
# zipped CLI index loads too (its images then show as grey placeholders). Archives are hostile
# input: names are allow-listed (no traversal, no links), sizes bounded before and while
# inflating (no bomb), the manifest's checksums and format version checked by `GalleryIndex.load`,
# the embeddings' model compared with this app's, and every image decoded again by the safe decoder.
ARCHIVE_NAME = re.compile(
    r"^(manifest\.json|data-[0-9a-f]{32}/(items\.json|embeddings\.npy)|images/[0-9a-f]{64}\.jpg"
    r"|data-[0-9a-f]{32}/|images/)$"
)
ARCHIVE_FIXED_BYTES = 1024 * 1024  # manifest and items.json beside the per-image allowances
ARCHIVE_IMAGE_BYTES = 256 * 1024  # one stored image copy (the app writes 256-364 px JPEGs: 10-60 KB)
MAX_INFLATE_RATIO = 200  # a member may inflate at most this many times its compressed size


class GalleryArchiveError(UserFacingError):
    """A gallery archive that cannot be loaded; the sentence says why. The session keeps its gallery."""


def archive_limit_bytes(max_images: int, num_queries: int, dim: int) -> int:
    """The most bytes a gallery archive of `max_images` may hold, inflated or not."""
    return ARCHIVE_FIXED_BYTES + max_images * (num_queries * dim * 4 + ARCHIVE_IMAGE_BYTES)


def write_archive(index: GalleryIndex, images: dict[str, bytes], out: str | Path) -> None:
    """Write `index` (and the JPEG copies in `images`, by content hash) as one zip archive."""
    with tempfile.TemporaryDirectory(prefix="blip2-gallery-") as tmp:
        folder = Path(tmp) / "index"
        index.save(folder)
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(folder).as_posix())
            for item in index.items():
                if item.content_hash in images:
                    archive.writestr(f"images/{item.content_hash}.jpg", images[item.content_hash])


def read_archive(
    path: str | Path, engine: Engine, max_images: int
) -> tuple[GalleryIndex, dict[str, Image.Image]]:
    """The index and images of a gallery archive, checked (see above) for `engine`'s retrieval model."""
    expected = new_index(engine)
    limit = archive_limit_bytes(max_images, expected.num_queries, expected.dim)
    path = Path(path)
    if path.stat().st_size > limit:
        raise GalleryArchiveError(
            f"This gallery archive is {path.stat().st_size / 1e6:.1f} MB; a gallery of at most "
            f"{max_images} images takes at most {limit / 1e6:.0f} MB."
        )
    try:
        with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix="blip2-gallery-") as tmp:
            members = _checked_members(archive, limit, max_images)
            folder = Path(tmp)
            for info in members:
                if not info.is_dir():
                    _extract(archive, info, folder / info.filename)  # names are allow-listed
            index = GalleryIndex.load(folder)
            _check_model(index, expected, max_images)
            images = _archive_images(folder, index, engine)
    except zipfile.BadZipFile as error:
        raise GalleryArchiveError(f"This file is not a gallery archive (a zip file): {error}.") from error
    except IndexFormatError as error:
        raise GalleryArchiveError(f"This gallery archive cannot be loaded: {_sentence(error)}") from error
    return index, images


def _checked_members(archive: zipfile.ZipFile, limit: int, max_images: int) -> list[zipfile.ZipInfo]:
    members = archive.infolist()
    if len(members) > 2 * max_images + 8:
        raise GalleryArchiveError(f"This gallery archive has {len(members)} files: too many for a gallery.")
    total = 0
    for info in members:
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise GalleryArchiveError(
                f"This gallery archive holds a link ({info.filename!r}); links are refused."
            )
        if not ARCHIVE_NAME.match(info.filename):
            raise GalleryArchiveError(
                f"This gallery archive holds {info.filename[:80]!r}, which is not part of a gallery "
                "(manifest.json, data-<id>/ and images/ only)."
            )
        if info.file_size > MAX_INFLATE_RATIO * max(info.compress_size, 1024):
            raise GalleryArchiveError(
                f"{info.filename} inflates too far: this archive looks like a zip bomb."
            )
        total += info.file_size
        if total > limit:
            raise GalleryArchiveError(f"This gallery archive inflates to more than {limit / 1e6:.0f} MB.")
    if not any(info.filename == "manifest.json" for info in members):
        raise GalleryArchiveError("This zip file is not a gallery archive: it has no manifest.json.")
    return members


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    """Copy one member out, never more bytes than its header declares (zipfile checks the CRC)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    left = info.file_size
    with archive.open(info) as source, open(target, "xb") as sink:
        while chunk := source.read(min(1 << 20, left + 1)):
            left -= len(chunk)
            if left < 0:
                raise GalleryArchiveError(f"{info.filename} is larger than its header says.")
            sink.write(chunk)


def _check_model(index: GalleryIndex, expected: GalleryIndex, max_images: int) -> None:
    model = expected.embedding_model
    if index.embedding_model != model or (index.dim, index.num_queries) != (
        expected.dim,
        expected.num_queries,
    ):
        made_by = index.embedding_model or "an unnamed retrieval model"
        raise GalleryArchiveError(
            f"This gallery was made with {made_by}; this app searches with {model}, whose embeddings do "
            f"not compare with it. Load it in an app started with that model, or index the images again here."
        )
    if len(index) > max_images:
        raise GalleryArchiveError(
            f"This gallery holds {len(index)} images; this app keeps at most {max_images}."
        )


def _archive_images(folder: Path, index: GalleryIndex, engine: Engine) -> dict[str, Image.Image]:
    images = {}
    for item in index.items():
        path = folder / "images" / f"{item.content_hash}.jpg"
        if not path.is_file():
            continue  # a zipped CLI index: no copies; the UI shows a placeholder
        try:
            images[item.content_hash] = load_image(str(path), engine.image_limits)
        except ImageDecodeError as error:
            raise GalleryArchiveError(
                f"The stored copy of {item.name} is not a usable image: {error}"
            ) from error
    return images


def _sentence(error: Exception) -> str:
    text = str(error)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")
