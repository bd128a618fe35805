"""The gallery service (gallery.py): de-duplication before embedding, batched indexing with
progress, text / image search equal to the engine's own ITC, ITM re-rank, index metadata."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from blip2_app.engine import PreparedImage
from blip2_app.errors import InvalidRequestError
from blip2_app.gallery import Gallery, IndexMismatchError, new_index
from blip2_app.retrieval import GalleryIndex, rerank_with_itm

PHOTOS = sorted((Path(__file__).parent / "data" / "photos").glob("*.*"))
PHOTOS = [p for p in PHOTOS if p.suffix != ".tsv"]
HOSTILE = Path(__file__).parent / "data" / "hostile"


class MemoryImages:
    """An ImageStore that keeps the prepared images themselves."""

    def __init__(self) -> None:
        self.kept: dict[str, PreparedImage] = {}

    def keep_image(self, prepared: PreparedImage) -> None:
        self.kept[prepared.content_hash] = prepared

    def prepared(self, content_hash: str) -> PreparedImage:
        return self.kept[content_hash]


@pytest.fixture
def engine(load_tiny):
    return load_tiny("tiny-random-itm")


@pytest.fixture
def embedded(engine, monkeypatch):
    """Content hashes of every image the engine embeds, call by call."""
    calls: list[list[str]] = []
    original = engine.image_features

    def spy(images, progress=None):
        features = original(images, progress)
        calls.append(list(features.content_hashes))
        return features

    monkeypatch.setattr(engine, "image_features", spy)
    return calls


def test_new_index_carries_the_retrieval_models_metadata(engine):
    index = new_index(engine)
    config = engine.matcher.model.config
    assert (index.num_queries, index.dim) == (config.num_query_tokens, config.image_text_hidden_size)
    assert index.embedding_model == "tiny-random-itm" and len(index) == 0


def test_duplicates_are_skipped_before_embedding(engine, embedded, images):
    gallery = Gallery(engine, images=MemoryImages())
    report = gallery.add([images[0], images[1], images[0]], ["a", "b", "a-again"])
    assert len(report.added) == 2 and [name for name, _ in report.duplicates] == ["a-again"]
    assert sum(len(c) for c in embedded) == 2, "the repeat is not embedded"
    embedded.clear()
    again = gallery.add([images[1], images[2]], ["b-again", "c"])
    assert [name for name, _ in again.duplicates] == ["b-again"] and len(again.added) == 1
    assert embedded == [[engine.prepare(images[2])[0].content_hash]], "only the new image is embedded"
    assert [item.name for item in gallery.index.items()] == ["a", "b", "c"]
    assert set(gallery.images.kept) == {item.content_hash for item in gallery.index.items()}


def test_chunks_progress_unreadable_files_and_limit(engine, embedded, images):
    gallery = Gallery(engine, chunk=2)
    events: list[tuple[str, int, int]] = []
    inputs = [images[0], str(HOSTILE / "made_random_bytes.jpg"), images[1], images[0], images[2], images[3]]
    names = ["a", "broken", "b", "a-again", "c", "d"]
    report = gallery.add(inputs, names, limit=3, progress=lambda *e: events.append(e))
    assert [len(c) for c in embedded] == [1, 1, 1], "one embedding call per chunk with new images"
    assert [gallery.index.items()[i].name for i in report.added] == ["a", "b", "c"]
    assert [name for name, _ in report.unreadable] == ["broken"] and report.unreadable[0][1]
    assert [name for name, _ in report.duplicates] == ["a-again"] and report.over_limit == ("d",)
    assert [e for e in events if e[0] == "reading"] == [("reading", i, 6) for i in range(6)]
    embedding = [(done, total) for stage, done, total in events if stage == "embedding"]
    assert embedding[-1] == (3, 3), "the estimate is exact once everything is read"
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(embedding)), "progress never goes back"
    assert all(done <= total for done, total in embedding)
    with pytest.raises(ValueError, match="one name per image"):
        gallery.add([images[4]], [])


def test_text_search_ranks_like_the_engines_itc(engine, images):
    gallery = Gallery(engine)
    gallery.add(images, [f"img{i}" for i in range(len(images))])
    query = "a red square"
    scores = engine.itc(images, [query])[:, 0].numpy()
    hits = gallery.search_text(f"  {query}\n", 3)  # cleaned as everywhere: one space, no edges
    assert [h.name for h in hits] == [f"img{i}" for i in np.argsort(-scores, kind="stable")[:3]]
    np.testing.assert_allclose([h.cosine for h in hits], np.sort(scores)[::-1][:3], atol=1e-5)
    with pytest.raises(InvalidRequestError, match="search text is empty"):
        gallery.search_text("   ", 3)


def test_itm_rerank_in_one_place(engine, images):
    gallery = Gallery(engine, images=MemoryImages())
    gallery.add(images, [f"img{i}" for i in range(len(images))])
    query = "a blue rectangle"
    reranked = gallery.search_text(query, 2, rerank_k=4)
    itc = gallery.search_text(query, 5)

    def itm(hashes: list[str]) -> list[float]:
        chosen = [gallery.images.prepared(h) for h in hashes]
        return engine.itm(chosen, [query] * len(chosen)).tolist()

    assert reranked == rerank_with_itm(itc[:4], itm, 4)[:2]
    assert all(h.itm_probability is not None for h in reranked)
    without_images = Gallery(engine, gallery.index)
    assert without_images.search_text(query, 2) == itc[:2]
    with pytest.raises(InvalidRequestError, match="Re-ranking reads the gallery's images"):
        without_images.search_text(query, 2, rerank_k=3)


def test_image_search_leaves_the_query_out(engine, images):
    gallery = Gallery(engine)
    gallery.add(images, [f"img{i}" for i in range(len(images))])
    projections = engine.image_features(images).projections.numpy()
    hits = gallery.search_image(images[1], 10)
    assert "img1" not in [h.name for h in hits] and len(hits) == len(images) - 1
    query = projections[1]
    expected = [
        0.5 * ((query @ p.T).max(axis=1).mean() + (query @ p.T).max(axis=0).mean())
        for i, p in enumerate(projections)
        if i != 1
    ]
    np.testing.assert_allclose(
        sorted((h.cosine for h in hits), reverse=True), sorted(expected)[::-1], atol=1e-5
    )


def test_an_index_of_another_model_is_refused(engine):
    other = GalleryIndex(embedding_model="shapes-demo-itm")
    with pytest.raises(IndexMismatchError, match="indexed with shapes-demo-itm.*tiny-random-itm"):
        Gallery(engine, other)
    Gallery(engine, GalleryIndex())  # an index that recorded no model is not checked


def test_describe_captions_the_new_images(load_tiny, images):
    engine = load_tiny("tiny-random")  # captioning model with its retrieval partner
    gallery = Gallery(engine)
    events: list[tuple[str, int, int]] = []
    gallery.add(images[:2], ["a", "b"], describe=True, progress=lambda *e: events.append(e))
    expected = [
        None if r[0].empty else " ".join(r[0].text.split()) for r in engine.caption(images[:2], "short")
    ]
    assert [item.caption for item in gallery.index.items()] == expected
    assert ("captioning", 0, 2) in events


def test_the_retrieval_partner_rule():
    from blip2_app.registry import Registry
    from blip2_app.startup import retrieval_model_for

    registry = Registry.load()
    captioner, matcher = registry.resolve("tiny-random"), registry.resolve("tiny-random-itm")
    assert retrieval_model_for(captioner) == captioner.retrieval == "tiny-random-itm"
    assert retrieval_model_for(captioner, "auto") == "tiny-random-itm"
    assert retrieval_model_for(captioner, "none") is None
    assert retrieval_model_for(captioner, "/models/my-itm") == "/models/my-itm"
    for requested in ("auto", "none", "other-itm"):
        assert retrieval_model_for(matcher, requested) == "tiny-random-itm", "its own partner"
