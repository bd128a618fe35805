"""GalleryIndex: faiss search equals brute force, approximate recall, persistence, crash safety."""

from __future__ import annotations

import copy
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from blip2_app.retrieval import (
    FORMAT_VERSION,
    GalleryIndex,
    IndexFormatError,
    IndexSettings,
    SearchHit,
    check_save_target,
    rerank_with_itm,
)

REPO = Path(__file__).resolve().parents[1]
Q, D = 32, 256


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_index(emb: np.ndarray, **settings) -> GalleryIndex:
    index = GalleryIndex(IndexSettings(**settings))
    n = len(emb)
    index.add(emb, [f"h{i}" for i in range(n)], [f"img{i}.jpg" for i in range(n)])
    return index


def brute_force(emb: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Reference: per image, max over its query vectors of the cosine with the text vector."""
    return (emb.reshape(-1, D) @ query).reshape(len(emb), -1).max(axis=1)


def reference_ranking(scores: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    ids = np.arange(len(scores)) if ids is None else ids
    return ids[np.lexsort((ids, -scores))]  # documented tie rule: score desc, then item id asc


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    sims = a @ b.T
    return float(0.5 * (sims.max(axis=1).mean() + sims.max(axis=0).mean()))


# ----------------------------------------------------------------------------- exact path


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 7), (2, 300), (3, 600)])
def test_exact_search_equals_brute_force(seed, n):
    rng = np.random.default_rng(seed)
    emb = unit(rng, n, Q, D)
    index = make_index(emb, probability_pool=5)  # small pool: faiss k-NN path, not full scoring
    assert not index.uses_approximate
    for query in unit(rng, 5, D):
        ref = brute_force(emb, query)
        order = reference_ranking(ref)
        for top_k in (1, 10, n, n + 3):
            hits = index.search_text(query, top_k)
            assert [h.rank for h in hits] == list(range(1, min(top_k, n) + 1))
            assert [h.item_id for h in hits] == order[:top_k].tolist()
            np.testing.assert_allclose([h.cosine for h in hits], ref[order[:top_k]], rtol=0, atol=1e-6)
            assert all(h.name == f"img{h.item_id}.jpg" and h.content_hash == f"h{h.item_id}" for h in hits)


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 6), (2, 20)])
def test_tiny_itm_gallery_search_equals_brute_force(load_tiny, seed, n):
    """End to end on the tiny ITM checkpoint: random images through the engine, then text and image
    search over faiss equal numpy's max-over-queries cosine (and Chamfer), ranks included, and the
    text scores equal the engine's own ITC."""
    from PIL import Image

    engine = load_tiny("tiny-random-itm")
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (24 + i % 5, 30, 3), dtype=np.uint8)) for i in range(n)]
    features = engine.image_features(images)
    emb = features.projections.numpy()
    index = GalleryIndex(IndexSettings(), dim=emb.shape[2], num_queries=emb.shape[1])
    index.add(emb, features.content_hashes, [f"img{i}.png" for i in range(n)])
    texts = ["a red square", "two dogs on a beach at night", "x"]
    queries = engine.text_features(texts).numpy()
    itc = engine.itc(images, texts).numpy()
    for t, query in enumerate(queries):
        reference = (emb @ query).max(axis=1)
        order = reference_ranking(reference)
        for top_k in (1, 5, n):
            hits = index.search_text(query, top_k)
            assert [h.item_id for h in hits] == order[:top_k].tolist()
            assert [h.rank for h in hits] == list(range(1, min(top_k, n) + 1))
            np.testing.assert_allclose([h.cosine for h in hits], reference[order[:top_k]], atol=1e-6)
            np.testing.assert_allclose([h.cosine for h in hits], itc[order[:top_k], t], atol=1e-5)
    reference = np.array([chamfer(emb[0], other) for other in emb])
    order = reference_ranking(reference)
    hits = index.search_image(emb[0], n)
    assert [h.item_id for h in hits] == order.tolist()
    np.testing.assert_allclose([h.cosine for h in hits], reference[order], atol=1e-6)


def test_ties_are_broken_by_insertion_order_including_at_the_cut():
    rng = np.random.default_rng(4)
    emb = unit(rng, 400, Q, D)
    query = unit(rng, D)
    best = int(np.argmax(brute_force(emb, query)))
    # Four identical copies of the best image under other hashes: exactly tied scores.
    copies = np.repeat(emb[best : best + 1], 4, axis=0)
    index = make_index(emb, probability_pool=1)
    index.add(copies, ["c0", "c1", "c2", "c3"], ["c0", "c1", "c2", "c3"])
    hits = index.search_text(query, 3)  # the cut falls inside the group of five tied images
    assert [h.item_id for h in hits] == [best, 400, 401]
    assert len({h.cosine for h in hits}) == 1
    assert [h.item_id for h in index.search_text(query, 5)] == [best, 400, 401, 402, 403]


def test_ties_beyond_the_fetched_vectors_are_resolved_by_item_id():
    rng = np.random.default_rng(20)
    emb = unit(rng, 300, Q, D)
    query = unit(rng, D)
    index = make_index(emb, probability_pool=1)
    # Five images whose 32 rows all equal the query: 160 vectors tie for first place, more
    # than the 3 x 32 vectors a top-3 search fetches first.
    tied = np.repeat(query[None, None, :], 5, axis=0).repeat(Q, axis=1)
    index.add(tied, [f"t{i}" for i in range(5)], [f"t{i}" for i in range(5)])
    index.remove("h0")  # moves item 304 into slot 0: storage order is no longer id order
    hits = index.search_text(query, 3)
    assert [h.item_id for h in hits] == [300, 301, 302]
    assert [h.cosine for h in hits] == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_probability_is_temperature_softmax_over_the_pool():
    rng = np.random.default_rng(5)
    emb = unit(rng, 50, Q, D)
    query = unit(rng, D)
    index = make_index(emb)  # 50 images <= default pool of 100: softmax over the whole gallery
    hits = index.search_text(query, 50)
    cos = np.array([h.cosine for h in hits], dtype=np.float64)
    expected = np.exp(cos / 0.07) / np.exp(cos / 0.07).sum()
    np.testing.assert_allclose([h.probability for h in hits], expected, rtol=1e-9)
    top3 = index.search_text(query, 3)
    assert [h.probability for h in top3] == [h.probability for h in hits[:3]]  # independent of top_k
    sharper = make_index(emb, temperature=0.01).search_text(query, 1)[0].probability
    assert sharper > hits[0].probability  # lower temperature, less flat


# ----------------------------------------------------------------------------- approximate path


def test_approximate_path_recall_and_exact_scores():
    rng = np.random.default_rng(6)
    n = 1500
    emb = unit(rng, n, Q, D)
    index = make_index(emb, approximate_from=1000, approximate_candidates=512)
    assert index.uses_approximate
    found = total = 0
    for query in unit(rng, 20, D):
        ref = brute_force(emb, query)
        hits = index.search_text(query, 10)
        assert len(hits) == 10
        ids = np.array([h.item_id for h in hits])
        # Returned scores are exact (recomputed from float32 embeddings) and correctly ordered.
        np.testing.assert_allclose([h.cosine for h in hits], ref[ids], rtol=0, atol=1e-6)
        assert all(a.cosine >= b.cosine for a, b in itertools.pairwise(hits))
        found += len(set(ids.tolist()) & set(reference_ranking(ref)[:10].tolist()))
        total += 10
    assert index.approximate_index_bytes > 0
    assert found / total >= 0.95


def test_approximate_path_planted_match_and_incremental_updates():
    rng = np.random.default_rng(7)
    emb = unit(rng, 1200, Q, D)
    index = make_index(emb, approximate_from=1000)
    index.build_approximate()
    # A text close to one query token of a new image: found after an incremental add.
    new = unit(rng, 3, Q, D)
    index.add(new, ["n0", "n1", "n2"], ["n0", "n1", "n2"])
    text = new[1, 5] + 0.5 * unit(rng, D)
    text /= np.linalg.norm(text)
    hit = index.search_text(text, 1)[0]
    assert hit.content_hash == "n1"
    assert hit.cosine == pytest.approx(float((new[1] @ text).max()), abs=1e-6)
    # Removed items never come back, even though the PQ codes still hold them (tombstones).
    assert index.remove("n1")
    assert index.uses_approximate and index.approximate_index_bytes > 0
    assert all(h.content_hash != "n1" for h in index.search_text(text, 20))


def test_large_top_k_falls_back_to_exact_on_the_approximate_path():
    rng = np.random.default_rng(8)
    emb = unit(rng, 1100, Q, D)
    index = make_index(emb, approximate_from=1000)
    query = unit(rng, D)
    hits = index.search_text(query, 10**6)
    assert [h.item_id for h in hits] == reference_ranking(brute_force(emb, query)).tolist()


# ----------------------------------------------------------------------------- edge cases


def test_empty_gallery_zero_query_and_top_k_bounds():
    rng = np.random.default_rng(9)
    empty = GalleryIndex()
    assert len(empty) == 0
    assert empty.search_text(unit(rng, D), 10) == []
    assert empty.search_image(unit(rng, Q, D), 10) == []
    index = make_index(unit(rng, 12, Q, D))
    query = unit(rng, D)
    assert index.search_text(np.zeros(D, np.float32), 5) == []  # e.g. a query of only spaces
    assert index.search_text(np.zeros(0, np.float32), 5) == []
    assert index.search_image(np.zeros((Q, D), np.float32), 5) == []
    assert index.search_text(query, 0) == []
    assert len(index.search_text(query, 10**6)) == 12
    assert len(index.search_image(unit(rng, Q, D), 10**6)) == 12
    # An unnormalised query gives the same cosines as its unit version.
    assert [h.cosine for h in index.search_text(3 * query, 4)] == pytest.approx(
        [h.cosine for h in index.search_text(query, 4)], abs=1e-6
    )
    with pytest.raises(ValueError, match="top_k"):
        index.search_text(query, -1)
    with pytest.raises(ValueError, match="top_k"):
        index.search_text(query, 2.5)
    with pytest.raises(ValueError, match="256"):
        index.search_text(unit(rng, 128), 3)
    with pytest.raises(ValueError, match="NaN"):
        index.search_text(np.full(D, np.nan, np.float32), 3)
    with pytest.raises(ValueError, match="shape"):
        index.search_image(unit(rng, 8, D), 3)


def test_add_validates_input():
    rng = np.random.default_rng(10)
    index = GalleryIndex()
    with pytest.raises(ValueError, match="shape"):
        index.add(unit(rng, 2, Q, 128), ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="shape"):
        index.add(unit(rng, 3, Q, D), ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="same length"):
        index.add(unit(rng, 2, Q, D), ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="normalised"):
        index.add(2 * unit(rng, 2, Q, D), ["a", "b"], ["a", "b"])
    bad = unit(rng, 2, Q, D)
    bad[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"image 1 \('b'\)"):
        index.add(bad, ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="content hash"):
        index.add(unit(rng, 1, Q, D), [""], ["a"])
    assert len(index) == 0  # nothing half-added
    with pytest.raises(ValueError, match="approximate_from"):
        IndexSettings(approximate_from=0)
    with pytest.raises(ValueError, match="temperature"):
        IndexSettings(temperature=0.0)
    with pytest.raises(ValueError, match="search_threads"):
        IndexSettings(search_threads=True)


# ----------------------------------------------------------------------------- add / remove / dedupe


def test_deduplicate_by_content_hash_and_incremental_add():
    rng = np.random.default_rng(11)
    emb = unit(rng, 6, Q, D)
    index = GalleryIndex()
    first = index.add(emb[:3], ["a", "b", "a"], ["a.jpg", "b.jpg", "a-again.jpg"], ["cat", None, "dup"])
    assert first.added == (0, 1)
    assert first.duplicates == (("a-again.jpg", "a"),)
    assert "skipped 1 duplicate" in first.summary() and "a-again.jpg" in first.summary()
    second = index.add(emb[3:], ["b", "c", "d"], ["b2.jpg", "c.jpg", "d.jpg"])
    assert second.added == (2, 3) and second.duplicates == (("b2.jpg", "b"),)
    assert len(index) == 4 and index.contains("c") and not index.contains("zzz")
    assert [(i.item_id, i.name, i.caption) for i in index.items()] == [
        (0, "a.jpg", "cat"),
        (1, "b.jpg", None),
        (2, "c.jpg", None),
        (3, "d.jpg", None),
    ]
    np.testing.assert_array_equal(index.embeddings_of("c"), emb[4])
    # Adding in batches ranks exactly like adding at once.
    whole = GalleryIndex()
    whole.add(emb[[0, 1, 4, 5]], ["a", "b", "c", "d"], ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    query = unit(rng, D)
    assert [(h.item_id, h.cosine) for h in index.search_text(query, 4)] == [
        (h.item_id, h.cosine) for h in whole.search_text(query, 4)
    ]


def test_remove_keeps_results_exact():
    rng = np.random.default_rng(12)
    emb = unit(rng, 300, Q, D)
    index = make_index(emb, probability_pool=3)
    removed = set(range(0, 300, 7))
    for i in removed:
        assert index.remove(f"h{i}")
    assert not index.remove("h0") and not index.remove("never-added")
    assert len(index) == 300 - len(removed)
    keep = np.array(sorted(set(range(300)) - removed))
    for query in unit(rng, 3, D):
        ref = brute_force(emb[keep], query)
        hits = index.search_text(query, 15)
        expected = reference_ranking(ref, keep)[:15]
        assert [h.item_id for h in hits] == expected.tolist()
    report = index.add(emb[:1], ["h0"], ["back.jpg"])  # a removed hash can come back, with a new id
    assert report.added == (300,)


# ----------------------------------------------------------------------------- image -> image


def test_image_search_uses_symmetric_chamfer_similarity():
    rng = np.random.default_rng(13)
    emb = unit(rng, 40, Q, D)
    index = make_index(emb)
    query = emb[7]
    hits = index.search_image(query, 40)
    assert hits[0].item_id == 7 and hits[0].cosine == pytest.approx(1.0, abs=1e-6)
    by_id = {h.item_id: h.cosine for h in hits}
    for i in (0, 12, 39):
        assert by_id[i] == pytest.approx(chamfer(query, emb[i]), abs=1e-6)
        # Symmetric: searching from the other image gives the same score.
        back = {h.item_id: h.cosine for h in index.search_image(emb[i], 40)}
        assert back[7] == pytest.approx(by_id[i], abs=1e-6)
    # The order of the 32 query tokens does not matter.
    shuffled = index.search_image(query[rng.permutation(Q)], 5)
    assert [h.item_id for h in shuffled] == [h.item_id for h in hits[:5]]
    # exclude_hash drops the query image itself; ranks restart at 1.
    without = index.search_image(query, 3, exclude_hash="h7")
    assert [h.item_id for h in without] == [h.item_id for h in hits[1:4]]
    assert [h.rank for h in without] == [1, 2, 3]
    assert len(index.search_image(query, 10**6, exclude_hash="h7")) == 39


def test_image_search_approximate_finds_near_duplicates_with_exact_scores():
    rng = np.random.default_rng(14)
    emb = unit(rng, 1100, Q, D)
    index = make_index(emb, approximate_from=1000)
    for target in (3, 555, 1099):
        noisy = emb[target] + 0.05 * unit(rng, Q, D)
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        hits = index.search_image(noisy, 5)
        assert hits[0].item_id == target
        for h in hits:
            assert h.cosine == pytest.approx(chamfer(noisy, emb[h.item_id]), abs=1e-6)


# ----------------------------------------------------------------------------- re-rank, batching


def test_rerank_with_itm_reorders_top_k_only():
    rng = np.random.default_rng(15)
    index = make_index(unit(rng, 8, Q, D))
    hits = index.search_text(unit(rng, D), 6)
    itm = {h.content_hash: p for h, p in zip(hits, [0.1, 0.9, 0.5, 0.9, 0.99, 0.0], strict=True)}
    seen: list[list[str]] = []

    def scorer(hashes: list[str]) -> list[float]:
        seen.append(hashes)
        return [itm[h] for h in hashes]

    out = rerank_with_itm(hits, scorer, k=4)
    assert seen == [[h.content_hash for h in hits[:4]]]  # only the top k are scored
    # Top 4 by ITM (the 0.9 tie keeps ITC order), then the rest in ITC order, unscored.
    assert [h.item_id for h in out] == [hits[i].item_id for i in (1, 3, 2, 0, 4, 5)]
    assert [h.itm_probability for h in out] == [0.9, 0.9, 0.5, 0.1, None, None]
    assert [h.rank for h in out] == [1, 2, 3, 4, 5, 6]
    assert [h.cosine for h in out[4:]] == [h.cosine for h in hits[4:]]
    assert [h.item_id for h in rerank_with_itm(hits, scorer, k=100)][:2] == [hits[4].item_id, hits[1].item_id]
    assert rerank_with_itm(hits, scorer, k=0) == hits
    assert rerank_with_itm([], scorer, k=5) == []
    with pytest.raises(ValueError, match="probabilities"):
        rerank_with_itm(hits, lambda hs: [0.5], k=3)
    with pytest.raises(ValueError, match="probabilities"):
        rerank_with_itm(hits, lambda hs: [2.0] * len(hs), k=3)


def test_missing_is_the_rule_add_applies():
    rng = np.random.default_rng(19)
    emb = unit(rng, 5, Q, D)
    index = GalleryIndex()
    index.add(emb[:2], ["a", "b"], ["a.jpg", "b.jpg"])
    hashes = ["b", "c", "a", "c", "d"]
    assert index.missing(hashes) == [1, 4], "indexed ones and repeats within the list are left out"
    assert index.missing([]) == []
    report = index.add(emb, hashes, [f"{h}{i}.jpg" for i, h in enumerate(hashes)])
    assert [index.items()[i].content_hash for i in report.added] == ["c", "d"]
    assert report.duplicates == (("b0.jpg", "b"), ("a2.jpg", "a"), ("c3.jpg", "c"))
    assert index.missing(hashes) == []


def test_deepcopy_for_per_session_state():
    rng = np.random.default_rng(16)
    index = make_index(unit(rng, 40, Q, D), approximate_from=40)
    index.build_approximate()
    assert index.approximate_index_bytes > 0
    clone = copy.deepcopy(index)  # gr.State deep-copies its initial value per session
    query = unit(rng, D)
    assert clone.search_text(query, 5) == index.search_text(query, 5)
    clone.remove("h1")
    assert len(clone) == 39 and len(index) == 40


# ----------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(17)
    emb = unit(rng, 30, Q, D)
    index = make_index(emb)
    index.remove("h3")
    index.add(unit(rng, 1, Q, D), ["new"], ["nouveau été.png"], ["un chat"])
    index.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx")
    assert loaded.items() == index.items()
    query = unit(rng, D)
    assert loaded.search_text(query, 31) == index.search_text(query, 31)
    assert loaded.search_image(emb[5], 4) == index.search_image(emb[5], 4)
    assert loaded.add(unit(rng, 1, Q, D), ["later"], ["later"]).added == (31,)  # ids continue
    loaded.save(tmp_path / "idx")  # overwrite: only the newest data folder is kept
    assert len([p for p in (tmp_path / "idx").iterdir() if p.name.startswith("data-")]) == 1
    assert len(GalleryIndex.load(tmp_path / "idx")) == 31
    empty = GalleryIndex(embedding_model="blip2-itm-vit-g")
    empty.save(tmp_path / "empty")
    assert len(GalleryIndex.load(tmp_path / "empty")) == 0
    assert GalleryIndex.load(tmp_path / "empty").embedding_model == "blip2-itm-vit-g"
    assert GalleryIndex.load(tmp_path / "idx").embedding_model is None  # not recorded: not checked


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_corrupt_foreign_and_future_folders_give_clear_errors(tmp_path):
    rng = np.random.default_rng(18)
    good = tmp_path / "good"
    make_index(unit(rng, 5, Q, D)).save(good)

    with pytest.raises(FileNotFoundError, match="not a folder") as missing:
        GalleryIndex.load(tmp_path / "missing")
    assert missing.value.filename == str(tmp_path / "missing")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError, match="a file, not a folder") as file:
        GalleryIndex.load(tmp_path / "a-file")
    assert file.value.filename == str(tmp_path / "a-file")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8not really")
    with pytest.raises(IndexFormatError, match="not a BLIP-2 Studio gallery index"):
        GalleryIndex.load(foreign)
    with pytest.raises(IndexFormatError, match="refusing to save"):
        GalleryIndex().save(foreign)  # never clobbers somebody else's folder
    with pytest.raises(IndexFormatError, match="refusing to save"):
        check_save_target(foreign)  # what save checks, asked before the work
    check_save_target(good)  # an index may be saved again
    check_save_target(tmp_path / "new" / "deeper")  # save creates it
    assert not (tmp_path / "new").exists()
    for target in (foreign / "cat.jpg", foreign / "cat.jpg" / "sub"):
        with pytest.raises(NotADirectoryError, match="gallery index is saved into a folder"):
            GalleryIndex().save(target)
    assert (foreign / "cat.jpg").exists()
    (foreign / "manifest.json").write_text(json.dumps({"name": "some other tool"}))
    with pytest.raises(IndexFormatError, match="not a BLIP-2 Studio gallery index"):
        GalleryIndex.load(foreign)

    def tampered(name: str, edit) -> Path:
        folder = tmp_path / name
        make_index(unit(rng, 5, Q, D)).save(folder)
        edit(folder)
        return folder

    future = tampered(
        "future",
        lambda f: (f / "manifest.json").write_text(
            json.dumps({**_manifest(f), "version": FORMAT_VERSION + 1})
        ),
    )
    with pytest.raises(IndexFormatError, match="newer BLIP-2 Studio"):
        GalleryIndex.load(future)
    with pytest.raises(IndexFormatError, match="newer"):
        GalleryIndex().save(future)  # nor overwrites an index it cannot read

    def flip_byte(folder: Path) -> None:
        path = folder / _manifest(folder)["data"] / "embeddings.npy"
        raw = bytearray(path.read_bytes())
        raw[-100] ^= 0xFF
        path.write_bytes(bytes(raw))

    with pytest.raises(IndexFormatError, match="checksum"):
        GalleryIndex.load(tampered("bitflip", flip_byte))
    truncated = tampered("truncated", lambda f: (f / "manifest.json").write_text('{"format": "blip2'))
    with pytest.raises(IndexFormatError, match="corrupt: unreadable manifest"):
        GalleryIndex.load(truncated)
    gone = tampered("gone", lambda f: [p.unlink() for p in (f / _manifest(f)["data"]).iterdir()])
    with pytest.raises(IndexFormatError, match="corrupt: missing"):
        GalleryIndex.load(gone)
    escape = tampered(
        "escape", lambda f: (f / "manifest.json").write_text(json.dumps({**_manifest(f), "data": "../good"}))
    )
    with pytest.raises(IndexFormatError, match="missing fields"):
        GalleryIndex.load(escape)
    assert len(GalleryIndex.load(good)) == 5


SAVE_IN_SUBPROCESS = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from blip2_app import retrieval

    folder, stop_at = sys.argv[1], sys.argv[2]

    def hook(step):
        if step == stop_at:
            print("PAUSED", flush=True)
            time.sleep(120)

    retrieval._save_hook = hook
    index = retrieval.GalleryIndex.load(folder)
    rng = np.random.default_rng(1)
    extra = rng.standard_normal((5, 32, 256)).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=-1, keepdims=True)
    index.add(extra, [f"v2-{i}" for i in range(5)], [f"v2-{i}" for i in range(5)])
    index.save(folder)
    """
)


@pytest.mark.parametrize(
    "stop_at,expect_version",
    [("data-written", 1), ("data-renamed", 1), ("manifest-written", 1), ("manifest-replaced", 2)],
)
def test_kill_9_during_save_leaves_a_loadable_index(tmp_path, stop_at, expect_version):
    rng = np.random.default_rng(19)
    folder = tmp_path / "idx"
    first = make_index(unit(rng, 10, Q, D))
    first.save(folder)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVE_IN_SUBPROCESS, str(folder), stop_at],
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "PAUSED"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    loaded = GalleryIndex.load(folder)
    if expect_version == 1:  # the interrupted save left the first version in place
        assert loaded.items() == first.items()
        query = unit(rng, D)
        assert loaded.search_text(query, 10) == first.search_text(query, 10)
    else:  # killed after the commit point: the new version is complete
        assert len(loaded) == 15 and loaded.contains("v2-4")
    # The next save succeeds and sweeps the debris of the interrupted one.
    loaded.save(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and names[1] == "manifest.json" and names[0].startswith("data-")
    assert GalleryIndex.load(folder).items() == loaded.items()


def test_search_hit_is_frozen():
    hit = SearchHit(1, 0, "a", "h", None, 0.5, 0.5)
    with pytest.raises(AttributeError):
        hit.rank = 2  # type: ignore[misc]
