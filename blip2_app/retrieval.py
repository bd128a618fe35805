"""Gallery retrieval with BLIP-2 ITC semantics: faiss search, ITM re-rank, atomic save/load.

An image is stored as its 32 normalised Q-Former query projections (32 x 256). BLIP-2's
image-text score is the maximum over those 32 queries of cosine(query, text CLS projection),
so text search is a nearest-neighbour search over all query vectors, aggregated per image by
max. Decisions (the measurements behind them: README "Gallery retrieval",
benchmarks/results/retrieval_scale.md):

* Exact path (gallery < ``IndexSettings.approximate_from`` images): faiss exact inner-product
  k-NN over every query vector, max-aggregated per image.
* Approximate path (larger galleries): a faiss 4-bit PQ fast-scan index over every query vector
  proposes candidate vectors; their exact cosines shortlist images, whose scores are then
  recomputed exactly from the stored float32 embeddings: every reported score is exact, only
  recall is approximate. Chosen over HNSW (build time on 2 cores) and IVF (recall on
  unclustered data): PQ fast-scan trains in about a second and its recall does not depend on
  the data having cluster structure.
* Ties: hits are ordered by (score descending, item_id ascending), i.e. insertion order.
* ``probability``: softmax of score / temperature over the best max(top_k, probability_pool)
  images (temperature 0.07 = LAVIS' initial ITC temperature, which converted checkpoints lost).
* Image -> image score: symmetric Chamfer similarity of the two 32 x 256 query sets.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from .errors import UserFacingError

FORMAT_NAME = "blip2-studio.gallery-index"
FORMAT_VERSION = 1
_DATA_DIR = re.compile(r"^data-[0-9a-f]{32}$")
_NORM_TOLERANCE = 1e-3  # embeddings must be unit rows; fp16/bf16 round trips stay well inside this
_MIN_TRAIN_VECTORS = 1024  # below this a PQ codebook is meaningless: such galleries stay exact
_BLOCK = 2048  # images per block when scoring many: bounds temporaries to tens of MB

Method = Literal["auto", "exact", "approximate"]


class IndexFormatError(UserFacingError, ValueError):
    """A folder that is not a loadable gallery index: corrupt, foreign, or from a newer version."""


@dataclass(frozen=True)
class SearchHit:
    """One ranked result. ``rank`` starts at 1."""

    rank: int
    item_id: int
    name: str
    content_hash: str
    caption: str | None
    cosine: float  # text query: max over the 32 queries of cosine; image query: Chamfer similarity
    probability: float  # softmax(score / temperature) over the best max(top_k, probability_pool) images
    itm_probability: float | None = None  # filled by rerank_with_itm


@dataclass(frozen=True)
class GalleryItem:
    item_id: int
    name: str
    content_hash: str
    caption: str | None


@dataclass(frozen=True)
class AddReport:
    added: tuple[int, ...]  # item ids of the new images, in input order
    duplicates: tuple[tuple[str, str], ...]  # (name, content_hash) skipped: hash already indexed
    # Filled by the gallery service (gallery.py), which also reads the files:
    unreadable: tuple[tuple[str, str], ...] = ()  # (name, why) of inputs that are not images
    over_limit: tuple[str, ...] = ()  # names of new images left out because the gallery was full

    def summary(self) -> str:
        text = f"added {len(self.added)} image{'s' if len(self.added) != 1 else ''}"
        if self.duplicates:
            text += f"; skipped {len(self.duplicates)} duplicate(s): {_names(n for n, _ in self.duplicates)}"
        if self.unreadable:
            text += f"; could not read {len(self.unreadable)}: {_names(n for n, _ in self.unreadable)}"
        if self.over_limit:
            text += f"; {len(self.over_limit)} not added (gallery full): {_names(self.over_limit)}"
        return text


def _names(names: Iterable[str]) -> str:
    """At most five names, then how many more."""
    names = list(names)
    more = "" if len(names) <= 5 else f" and {len(names) - 5} more"
    return ", ".join(names[:5]) + more


@dataclass(frozen=True)
class IndexSettings:
    approximate_from: int = 10_000  # gallery size (images) from which the approximate index is used
    approximate_candidates: int = 1024  # query vectors the approximate index proposes per query
    pq_dims_per_code: int = 2  # PQ sub-vector size; 4-bit codes -> dim / 2 / 2 = 64 bytes per vector
    temperature: float = 0.07  # ITC softmax temperature (LAVIS initial value)
    probability_pool: int = 100  # softmax denominator: the best max(top_k, pool) images
    search_threads: int = 2  # the approximate index is split into this many shards searched in parallel

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "temperature":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"temperature must be a number, got {value!r}")
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"temperature must be a positive finite number, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- helpers

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _run_faiss(fn: Callable[[Any], Any], parts: list[Any]) -> list[Any]:
    """Run faiss work, one part per worker thread, with OpenMP off in those threads.

    We parallelise explicitly (one shard per thread; faiss releases the GIL). OpenMP's own
    barriers stall badly when another process shares the cores: PQ training measured 0.8 s
    single-threaded but up to 11 s with two OpenMP threads on a busy 2-core machine.
    omp_set_num_threads only affects the calling thread, so the rest of the process is untouched.
    """
    width = max(1, len(parts))
    with _POOLS_LOCK:  # one pool per width, shared by every gallery (one gallery per session)
        if width not in _POOLS:
            _POOLS[width] = ThreadPoolExecutor(
                width,
                thread_name_prefix="gallery-faiss",
                initializer=faiss.omp_set_num_threads,
                initargs=(1,),
            )
    return list(_POOLS[width].map(fn, parts))


def _merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, labels) rows of shape (nq, k_i) into the global top k per query."""
    scores = np.concatenate([r[0] for r in results], axis=1)
    labels = np.concatenate([r[1] for r in results], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(labels, order, 1)


def _unique_in_order(values: np.ndarray) -> np.ndarray:
    _, first = np.unique(values, return_index=True)
    return values[np.sort(first)]


def _first_non_unit(emb: np.ndarray) -> int:
    """Index of the first (n, Q, D) image with a non-finite or non-unit row, or -1."""
    for start in range(0, len(emb), 4096):  # chunks: no full-size temporary for big galleries
        block = emb[start : start + 4096]
        err = np.abs(np.sqrt(np.einsum("nqd,nqd->nq", block, block)) - 1)
        bad = np.flatnonzero(~(err <= _NORM_TOLERANCE).all(axis=1))  # NaN compares False: caught too
        if len(bad):
            return start + int(bad[0])
    return -1


def _chamfer(query: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Symmetric Chamfer similarity between one (Q, D) query set and (n, Q, D) image sets.

    Mean over query tokens of their best match in the image, averaged with the same in the
    other direction: 1.0 for identical sets, symmetric, invariant to token order, and (unlike
    max-over-all-pairs) not saturated by one generic token that every image shares.
    """
    n, q, d = images.shape
    sims = (query @ images.reshape(n * q, d).T).reshape(query.shape[0], n, q)
    return 0.5 * (sims.max(axis=2).mean(axis=0) + sims.max(axis=0).mean(axis=1))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """File wrapper that hashes what is written, so a save reads nothing back."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data: Any) -> int:
        self.sha.update(data)
        return self.fh.write(data)


def _write_durable(path: Path, payload: bytes | np.ndarray) -> str:
    """Write bytes or an .npy array, fsync it, return its sha256."""
    with open(path, "wb") as fh:
        writer = _HashingWriter(fh)
        if isinstance(payload, np.ndarray):
            np.lib.format.write_array(writer, payload, allow_pickle=False)
        else:
            writer.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    return writer.sha.hexdigest()


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            sha.update(block)
    return sha.hexdigest()


# Test hook: called with the name of each step of save(); the crash test makes it block there.
_save_hook: Callable[[str], None] | None = None


def _checkpoint(step: str) -> None:
    if _save_hook is not None:
        _save_hook(step)


# --------------------------------------------------------------------------- approximate index


class _ApproxIndex:
    """4-bit PQ fast-scan over all query vectors, split into shards searched in parallel.

    Labels are item_id * num_queries + token (item ids are stable across removals). Removed
    items stay in the codes until a rebuild and are filtered out after search; the index is
    rebuilt when a quarter is stale.
    """

    def __init__(self, train: np.ndarray, dim: int, dims_per_code: int, shards: int) -> None:
        base = faiss.IndexPQFastScan(dim, dim // dims_per_code, 4, faiss.METRIC_INNER_PRODUCT)
        _run_faiss(base.train, [train])
        # Bytes per vector (dim / dims_per_code 4-bit codes). faiss's type stubs leave out this
        # attribute of the C++ index, which SWIG exposes at run time.
        self.code_size = base.code_size  # type: ignore[attr-defined]
        self.shards = [faiss.IndexIDMap(faiss.clone_index(base)) for _ in range(shards)]
        self.removed_vectors = 0

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    @property
    def nbytes(self) -> int:
        return self.ntotal * (self.code_size + 8)  # codes + int64 id map

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        # Split each batch evenly (contiguous slices: no copies) so the shards stay balanced.
        bounds = np.linspace(0, len(vectors), len(self.shards) + 1).astype(int).tolist()
        jobs = [(s, a, b) for s, a, b in zip(self.shards, bounds[:-1], bounds[1:], strict=True) if b > a]
        _run_faiss(lambda job: job[0].add_with_ids(vectors[job[1] : job[2]], labels[job[1] : job[2]]), jobs)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        def one(shard: Any) -> tuple[np.ndarray, np.ndarray]:
            return shard.search(queries, min(k, shard.ntotal))

        live = [s for s in self.shards if s.ntotal]
        return _merge_topk(_run_faiss(one, live), k)[1]


# --------------------------------------------------------------------------- the index


class GalleryIndex:
    """A user's gallery: per image its (num_queries, dim) projections, content hash, name, caption."""

    def __init__(
        self,
        settings: IndexSettings = IndexSettings(),
        dim: int = 256,
        num_queries: int = 32,
        embedding_model: str | None = None,
    ):
        if not isinstance(settings, IndexSettings):
            raise TypeError(f"settings must be IndexSettings, got {type(settings).__name__}")
        for label, value in (("dim", dim), ("num_queries", num_queries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if dim % settings.pq_dims_per_code:
            raise ValueError(f"dim {dim} is not divisible by pq_dims_per_code {settings.pq_dims_per_code}")
        self.settings, self.dim, self.num_queries = settings, dim, num_queries
        # The retrieval model whose embeddings these are (saved with the index): a query embedded
        # by another model has the right size but means nothing here.
        self.embedding_model = embedding_model
        self._init_state()

    def _init_state(self) -> None:
        self._lock = threading.RLock()
        # Slots 0..count-1 are live; remove() moves the last slot into the hole (O(1)).
        self._vectors = np.empty((0, self.num_queries, self.dim), np.float32)
        self._slot_ids = np.empty(0, np.int64)  # slot -> item id
        self._slot_of_id = np.empty(0, np.int64)  # item id -> slot, -1 once removed
        self._hashes: list[str] = []
        self._names: list[str] = []
        self._captions: list[str | None] = []
        self._slot_of_hash: dict[str, int] = {}
        self._count = 0
        self._next_id = 0
        self._approx: _ApproxIndex | None = None

    # gr.State deep-copies its value: drop the lock and the derived faiss index (rebuilt lazily).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_vectors"] = self._vectors[: self._count].copy()
        state.pop("_lock")
        state["_approx"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return self._count

    # ----------------------------------------------------------------- contents

    def contains(self, content_hash: str) -> bool:
        return content_hash in self._slot_of_hash

    def missing(self, content_hashes: Sequence[str]) -> list[int]:
        """Positions of the hashes ``add`` would keep: not indexed yet, and not repeated earlier in
        the list. The one de-duplication rule: callers ask it before embedding, ``add`` applies it."""
        with self._lock:
            keep, seen = [], set()
            for i, h in enumerate(content_hashes):
                if h not in self._slot_of_hash and h not in seen:
                    seen.add(h)
                    keep.append(i)
            return keep

    def items(self) -> list[GalleryItem]:
        with self._lock:
            order = np.argsort(self._slot_ids[: self._count], kind="stable")
            return [self._item(int(s)) for s in order]

    def embeddings_of(self, content_hash: str) -> np.ndarray:
        """The stored (num_queries, dim) projections of an image, e.g. for "more like this"."""
        with self._lock:
            if content_hash not in self._slot_of_hash:
                raise KeyError(f"no image with content hash {content_hash!r} in the gallery")
            return self._vectors[self._slot_of_hash[content_hash]].copy()

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Read-only views (item ids (n,), embeddings (n, Q, D)) in storage order, for checks."""
        ids, vectors = self._slot_ids[: self._count].view(), self._vectors[: self._count].view()
        ids.flags.writeable = vectors.flags.writeable = False
        return ids, vectors

    def _item(self, slot: int) -> GalleryItem:
        return GalleryItem(
            int(self._slot_ids[slot]), self._names[slot], self._hashes[slot], self._captions[slot]
        )

    def reserve(self, capacity: int) -> None:
        """Pre-allocate room for ``capacity`` images (avoids re-allocation copies in bulk loads)."""
        with self._lock:
            if capacity > len(self._vectors):
                grown = np.empty((capacity, self.num_queries, self.dim), np.float32)
                grown[: self._count] = self._vectors[: self._count]
                self._vectors = grown
                self._slot_ids = np.resize(self._slot_ids, capacity)

    def add(
        self,
        embeddings: np.ndarray,
        content_hashes: Sequence[str],
        names: Sequence[str],
        captions: Sequence[str | None] | None = None,
    ) -> AddReport:
        """Add images; ones whose content hash is already indexed (or repeated) are skipped."""
        emb = np.asarray(embeddings)
        n = len(content_hashes)
        if emb.ndim != 3 or emb.shape[1:] != (self.num_queries, self.dim) or emb.shape[0] != n:
            raise ValueError(
                f"embeddings must have shape ({n}, {self.num_queries}, {self.dim}) to match "
                f"{n} content hashes, got {emb.shape}"
            )
        if len(names) != n or (captions is not None and len(captions) != n):
            raise ValueError("content_hashes, names and captions must have the same length")
        if not all(isinstance(h, str) and h for h in content_hashes):
            raise ValueError("every content hash must be a non-empty string")
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        bad = _first_non_unit(emb)
        if bad >= 0:
            raise ValueError(
                f"embeddings must be finite, L2-normalised rows; image {bad} ({names[bad]!r}) is not"
            )
        captions = list(captions) if captions is not None else [None] * n

        with self._lock:
            keep = self.missing(content_hashes)
            kept = set(keep)
            duplicates = [(str(names[i]), h) for i, h in enumerate(content_hashes) if i not in kept]
            start, m = self._count, len(keep)
            if len(self._vectors) < start + m:
                self.reserve(max(start + m, int(len(self._vectors) * 1.5) + 16))
            ids = np.arange(self._next_id, self._next_id + m, dtype=np.int64)
            self._vectors[start : start + m] = emb[keep]
            self._slot_ids[start : start + m] = ids
            self._slot_of_id = np.concatenate([self._slot_of_id, np.arange(start, start + m)])
            for j, i in enumerate(keep):
                self._hashes.append(content_hashes[i])
                self._names.append(str(names[i]))
                self._captions.append(captions[i])
                self._slot_of_hash[content_hashes[i]] = start + j
            self._count += m
            self._next_id += m
            if self._approx is not None and m:
                # Encoding new vectors with the existing codebook is cheap; no retraining.
                self._approx.add(
                    self._vectors[start : start + m].reshape(-1, self.dim),
                    self._vector_labels(ids),
                )
            return AddReport(tuple(int(i) for i in ids), tuple(duplicates))

    def remove(self, content_hash: str) -> bool:
        with self._lock:
            slot = self._slot_of_hash.pop(content_hash, None)
            if slot is None:
                return False
            last = self._count - 1
            self._slot_of_id[self._slot_ids[slot]] = -1
            columns: tuple[list[Any], ...] = (self._hashes, self._names, self._captions)
            if slot != last:  # move the last image into the hole
                self._vectors[slot] = self._vectors[last]
                self._slot_ids[slot] = self._slot_ids[last]
                self._slot_of_id[self._slot_ids[slot]] = slot
                for column in columns:
                    column[slot] = column[last]
                self._slot_of_hash[self._hashes[slot]] = slot
            for column in columns:
                column.pop()
            self._count -= 1
            if self._approx is not None:
                self._approx.removed_vectors += self.num_queries
                if self._approx.removed_vectors * 4 > self._approx.ntotal or not self.uses_approximate:
                    self._approx = None  # mostly stale (or no longer needed): rebuild on demand
            return True

    def clear(self) -> None:
        with self._lock:
            self._init_state()

    # ----------------------------------------------------------------- approximate index

    @property
    def uses_approximate(self) -> bool:
        """Whether a default (method="auto") search goes through the approximate index."""
        return (
            self._count >= self.settings.approximate_from
            and self._count * self.num_queries >= _MIN_TRAIN_VECTORS
        )

    @property
    def approximate_index_bytes(self) -> int:
        return self._approx.nbytes if self._approx is not None else 0

    def build_approximate(self) -> None:
        """Build the approximate index now (otherwise the first search that needs it does)."""
        with self._lock:
            if self._approx is not None or self._count * self.num_queries < _MIN_TRAIN_VECTORS:
                return
            flat = self._vectors[: self._count].reshape(-1, self.dim)
            # faiss k-means uses at most 256 points per centroid (16 x 256 per sub-quantizer): a
            # 16k sample is plenty. Fixed seed: the same gallery always gets the same codebook.
            rng = np.random.default_rng(0)
            sample = flat[np.sort(rng.choice(len(flat), min(len(flat), 16_384), replace=False))]
            approx = _ApproxIndex(
                sample, self.dim, self.settings.pq_dims_per_code, self.settings.search_threads
            )
            approx.add(flat, self._vector_labels(self._slot_ids[: self._count]))
            self._approx = approx

    def _vector_labels(self, ids: np.ndarray) -> np.ndarray:
        """Approximate-index label of each query vector: item_id * num_queries + token."""
        return (ids[:, None] * self.num_queries + np.arange(self.num_queries)).ravel()

    def _approx_candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(slot, token) of the k nearest query vectors per query by the approximate index."""
        self.build_approximate()
        assert self._approx is not None
        labels = self._approx.search(queries, k).ravel()
        labels = labels[labels >= 0]
        slots = self._slot_of_id[labels // self.num_queries]
        live = slots >= 0  # drop items removed since the build (their codes stay until a rebuild)
        return slots[live], labels[live] % self.num_queries

    def _use_approximate(self, method: Method, top_k: int) -> bool:
        if method not in ("auto", "exact", "approximate"):
            raise ValueError(f"method must be 'auto', 'exact' or 'approximate', got {method!r}")
        # Very long result lists are better served by the exact path than by a huge candidate set.
        possible = (
            self._count * self.num_queries >= _MIN_TRAIN_VECTORS
            and top_k * 8 <= self.settings.approximate_candidates
        )
        return possible and (method == "approximate" or (method == "auto" and self.uses_approximate))

    # ----------------------------------------------------------------- search

    def _check_top_k(self, top_k: int) -> int:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise ValueError(f"top_k must be an integer, got {top_k!r}")
        if top_k < 0:
            raise ValueError(f"top_k must be 0 or more, got {top_k}")
        return min(int(top_k), self._count)

    def _exact_text_slots(self, query: np.ndarray, want: int) -> np.ndarray | None:
        """Slots of the ``want`` best images (plus any tied with the last), or None for all."""
        total = self._count * self.num_queries
        kv = want * self.num_queries  # the best `want` images own at least one of these vectors
        if kv >= total:
            return None
        flat = self._vectors[: self._count].reshape(-1, self.dim)
        while True:
            scores, labels = _run_faiss(
                lambda k: faiss.knn(query[None], flat, k, faiss.METRIC_INNER_PRODUCT), [kv]
            )[0]
            slots = labels[0] // self.num_queries
            first = np.sort(np.unique(slots, return_index=True)[1])  # an image's best vector comes first
            owners, best = slots[first], scores[0][first]
            cut = best[want - 1]
            # If the last vector fetched ties the cut, more tied images may lie beyond it: fetch more.
            if scores[0, -1] < cut or kv >= total:
                return owners[best >= cut]
            kv = min(total, 2 * kv)

    def _blocks(self, slots: np.ndarray | None) -> Iterator[np.ndarray]:
        """Stored embeddings of ``slots`` (None: all, read in place) in blocks of _BLOCK images."""
        if slots is None:
            for start in range(0, self._count, _BLOCK):
                yield self._vectors[start : min(start + _BLOCK, self._count)]
        else:
            for start in range(0, len(slots), _BLOCK):
                yield self._vectors[slots[start : start + _BLOCK]]

    def _ranked(self, slots: np.ndarray, scores: np.ndarray, top_k: int) -> list[SearchHit]:
        ids = self._slot_ids[slots]
        order = np.lexsort((ids, -scores))  # score descending, then insertion order
        pool = scores[order[: max(top_k, self.settings.probability_pool)]].astype(np.float64)
        logits = pool / self.settings.temperature
        log_z = logits.max() + np.log(np.exp(logits - logits.max()).sum())
        hits = []
        for rank, o in enumerate(order[:top_k], start=1):
            s = int(slots[o])
            cos = float(scores[o])
            prob = float(np.exp(cos / self.settings.temperature - log_z))
            hits.append(
                SearchHit(rank, int(ids[o]), self._names[s], self._hashes[s], self._captions[s], cos, prob)
            )
        return hits

    def search_text(self, text_embedding: np.ndarray, top_k: int, method: Method = "auto") -> list[SearchHit]:
        """Rank images by max over their queries of cosine with the text's (dim,) CLS projection.

        An empty or all-zero query (e.g. a query of only spaces) has no direction: no hits.
        """
        query = np.asarray(text_embedding, dtype=np.float32).reshape(-1)
        if query.size == 0:
            return []
        if query.shape != (self.dim,):
            raise ValueError(f"text embedding must have {self.dim} values, got {query.size}")
        if not np.isfinite(query).all():
            raise ValueError("text embedding contains NaN or infinite values")
        with self._lock:
            top_k = self._check_top_k(top_k)
            norm = float(np.linalg.norm(query))
            if top_k == 0 or norm < 1e-12:
                return []
            if abs(norm - 1) > 1e-6:
                query = query / norm
            want = min(self._count, max(top_k, self.settings.probability_pool))
            slots = None
            if self._use_approximate(method, top_k):
                slots, tokens = self._approx_candidates(query[None], self.settings.approximate_candidates)
                # Exact cosine of just the candidate vectors (1 KB each) gives every candidate
                # image a lower bound; only the best `want` images are then scored in full (32 KB
                # each): re-scoring all ~1000 candidate images in full cost more than the scan.
                flat = self._vectors[: self._count].reshape(-1, self.dim)
                bound = flat[slots * self.num_queries + tokens] @ query
                slots = _unique_in_order(slots[np.argsort(-bound, kind="stable")])[:want]
            if slots is None or len(slots) < top_k:  # candidates ran short: answer exactly
                slots = self._exact_text_slots(query, want)
            # Scores of returned hits are always recomputed from the stored float32 embeddings.
            scores = np.concatenate([(block @ query).max(axis=1) for block in self._blocks(slots)])
            return self._ranked(np.arange(self._count) if slots is None else slots, scores, top_k)

    def search_image(
        self,
        query_embeddings: np.ndarray,
        top_k: int,
        exclude_hash: str | None = None,
        method: Method = "auto",
    ) -> list[SearchHit]:
        """Rank images by symmetric Chamfer similarity to a (num_queries, dim) query image.

        ``exclude_hash`` drops the query image itself when it is part of the gallery.
        """
        query = np.asarray(query_embeddings, dtype=np.float32)
        if query.size == 0:
            return []
        if query.shape != (self.num_queries, self.dim):
            raise ValueError(
                f"image embedding must have shape ({self.num_queries}, {self.dim}), got {query.shape}"
            )
        if not np.isfinite(query).all():
            raise ValueError("image embedding contains NaN or infinite values")
        norms = np.linalg.norm(query, axis=1, keepdims=True)
        if (norms < 1e-12).all():
            return []
        if (norms < 1e-12).any():
            raise ValueError("image embedding has all-zero query rows")
        if np.abs(norms - 1).max() > 1e-6:
            query = query / norms
        with self._lock:
            excluded = self._slot_of_hash.get(exclude_hash) if exclude_hash is not None else None
            top_k = min(self._check_top_k(top_k), self._count - (excluded is not None))
            if top_k <= 0:
                return []
            slots = None  # None: score every image (exact)
            if self._use_approximate(method, top_k):
                # ColBERT-style: each query token proposes its nearest vectors, then exact re-score.
                per_token = max(8, -(-self.settings.approximate_candidates // self.num_queries))
                slots = _unique_in_order(self._approx_candidates(query, per_token)[0])
                if len(slots) - int(excluded is not None and excluded in slots) < top_k:
                    slots = None
            scores = np.concatenate([_chamfer(query, block) for block in self._blocks(slots)])
            slots = np.arange(self._count) if slots is None else slots
            keep = slots != excluded if excluded is not None else slice(None)
            return self._ranked(slots[keep], scores[keep], top_k)

    def all_scores(
        self, text_embedding: np.ndarray | None = None, image_embeddings: np.ndarray | None = None
    ) -> np.ndarray:
        """Every image's exact score (storage order, see ``snapshot``) for one query: a text's
        (dim,) CLS projection (max over the queries of cosine) or an image's (num_queries, dim)
        projections (symmetric Chamfer). For combined queries, which need every image's score."""
        if (text_embedding is None) == (image_embeddings is None):
            raise ValueError("all_scores takes a text embedding or image embeddings, not both")
        with self._lock:
            if text_embedding is not None:
                query = np.asarray(text_embedding, dtype=np.float32).reshape(-1)
                if query.shape != (self.dim,) or not np.isfinite(query).all():
                    raise ValueError(f"text embedding must be {self.dim} finite values")
                query = query / max(float(np.linalg.norm(query)), 1e-12)
                parts = [(block @ query).max(axis=1) for block in self._blocks(None)]
            else:
                images = np.asarray(image_embeddings, dtype=np.float32)
                if images.shape != (self.num_queries, self.dim) or not np.isfinite(images).all():
                    raise ValueError(f"image embedding must have shape ({self.num_queries}, {self.dim})")
                images = images / np.maximum(np.linalg.norm(images, axis=1, keepdims=True), 1e-12)
                parts = [_chamfer(images, block) for block in self._blocks(None)]
            return np.concatenate(parts) if parts else np.empty(0, np.float32)

    def rank_scores(
        self,
        scores: np.ndarray,
        top_k: int,
        exclude_hash: str | None = None,
        temperature: float | None = None,
    ) -> list[SearchHit]:
        """Hits for scores given per image in storage order (``all_scores`` or a combination of
        them); ``probability`` is their softmax at ``temperature`` (default: the index's)."""
        with self._lock:
            scores = np.asarray(scores, dtype=np.float64)
            if scores.shape != (self._count,):
                raise ValueError(f"rank_scores needs one score per image ({self._count}), got {scores.shape}")
            slots = np.arange(self._count)
            if exclude_hash is not None and exclude_hash in self._slot_of_hash:
                keep = slots != self._slot_of_hash[exclude_hash]
                slots, scores = slots[keep], scores[keep]
            top_k = min(self._check_top_k(top_k), len(slots))
            if top_k == 0:
                return []
            if temperature is None:
                return self._ranked(slots, scores, top_k)
            hits = self._ranked(slots, scores * (self.settings.temperature / temperature), top_k)
            return [replace(h, cosine=h.cosine * temperature / self.settings.temperature) for h in hits]

    # ----------------------------------------------------------------- persistence

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write the gallery to ``folder`` atomically: a crash leaves the previous save loadable.

        Layout: ``manifest.json`` names a ``data-<uuid>/`` folder (embeddings.npy, items.json)
        and their sha256. New data goes to a fresh folder; replacing the manifest (rename) is
        the single commit point; older data folders are deleted afterwards.
        """
        folder = Path(folder)
        check_save_target(folder)
        folder.mkdir(parents=True, exist_ok=True)
        manifest_path = folder / "manifest.json"
        with self._lock:
            n = self._count
            items = [
                {
                    "item_id": int(self._slot_ids[s]),
                    "content_hash": self._hashes[s],
                    "name": self._names[s],
                    "caption": self._captions[s],
                }
                for s in range(n)
            ]
            data_name = f"data-{uuid.uuid4().hex}"
            tmp = folder / f".{data_name}.tmp"
            tmp.mkdir()
            shas = {
                "items.json": _write_durable(
                    tmp / "items.json", json.dumps(items, ensure_ascii=False).encode()
                ),
                "embeddings.npy": _write_durable(tmp / "embeddings.npy", self._vectors[:n]),
            }
            next_id = self._next_id
        _checkpoint("data-written")
        _fsync_dir(tmp)
        os.rename(tmp, folder / data_name)
        _fsync_dir(folder)
        _checkpoint("data-renamed")
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "data": data_name,
            "count": n,
            "dim": self.dim,
            "num_queries": self.num_queries,
            "embedding_model": self.embedding_model,
            "next_item_id": next_id,
            "sha256": shas,
        }
        tmp_manifest = folder / f".manifest.json.{uuid.uuid4().hex}.tmp"
        _write_durable(tmp_manifest, json.dumps(manifest, indent=2).encode())
        _checkpoint("manifest-written")
        os.replace(tmp_manifest, manifest_path)  # the commit point
        _fsync_dir(folder)
        _checkpoint("manifest-replaced")
        for p in folder.iterdir():  # leftovers of this or of interrupted saves
            if p.name != data_name and (
                _DATA_DIR.match(p.name) or p.name.startswith((".data-", ".manifest"))
            ):
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    @classmethod
    def load(cls, folder: str | os.PathLike[str], settings: IndexSettings = IndexSettings()) -> GalleryIndex:
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR, "a file, not a folder, so not a gallery index", str(folder)
            )
        if not folder.is_dir():
            raise FileNotFoundError(errno.ENOENT, "not a folder, so not a gallery index", str(folder))
        m = _read_manifest(folder)
        data = folder / m["data"]
        try:
            for name, expected in m["sha256"].items():
                if _sha256_file(data / name) != expected:
                    raise IndexFormatError(f"gallery index in {folder} is corrupt: {name} fails its checksum")
            vectors = np.load(data / "embeddings.npy", allow_pickle=False)
            items = json.loads((data / "items.json").read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise IndexFormatError(f"gallery index in {folder} is corrupt: missing {exc.filename}") from exc
        except (OSError, ValueError) as exc:
            if isinstance(exc, IndexFormatError):
                raise
            raise IndexFormatError(f"gallery index in {folder} is corrupt: {exc}") from exc
        n, q, d = m["count"], m["num_queries"], m["dim"]
        if (
            vectors.dtype != np.float32
            or vectors.shape != (n, q, d)
            or not isinstance(items, list)
            or len(items) != n
        ):
            raise IndexFormatError(f"gallery index in {folder} is corrupt: data does not match its manifest")
        model = m.get("embedding_model")  # absent in indexes saved before it was recorded
        index = cls(settings, dim=d, num_queries=q, embedding_model=model if isinstance(model, str) else None)
        try:
            ids = [int(it["item_id"]) for it in items]
            hashes = [str(it["content_hash"]) for it in items]
            names = [str(it["name"]) for it in items]
            captions = [it["caption"] for it in items]
            if not all(c is None or isinstance(c, str) for c in captions):
                raise TypeError("caption is neither text nor null")
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"gallery index in {folder} is corrupt: bad item record ({exc})") from exc
        if len(set(ids)) != n or (n and (min(ids) < 0 or max(ids) >= m["next_item_id"])):
            raise IndexFormatError(f"gallery index in {folder} is corrupt: invalid item ids")
        if len(set(hashes)) != n or _first_non_unit(vectors) >= 0:
            raise IndexFormatError(
                f"gallery index in {folder} is corrupt: duplicate hashes or invalid embeddings"
            )
        # Adopt the loaded arrays as they are (no copy: a 100k gallery is 3.3 GB).
        index._vectors, index._count, index._next_id = vectors, n, m["next_item_id"]
        index._slot_ids = np.asarray(ids, dtype=np.int64)
        index._slot_of_id = np.full(index._next_id, -1, np.int64)
        index._slot_of_id[index._slot_ids] = np.arange(n)
        index._hashes, index._names, index._captions = hashes, names, captions
        index._slot_of_hash = {h: i for i, h in enumerate(hashes)}
        return index


def check_save_target(folder: str | os.PathLike[str]) -> None:
    """Raise unless ``GalleryIndex.save`` may write into ``folder``: a gallery index, an empty
    folder, or a path that can be created. Lets a caller refuse before hours of embedding."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        what = "a file, not a folder" if existing == folder else f"inside {existing}, which is a file"
        raise NotADirectoryError(
            errno.ENOTDIR, f"{what}: a gallery index is saved into a folder", str(folder)
        )
    if existing != folder:
        return  # save creates it
    if (folder / "manifest.json").exists():
        _read_manifest(folder)  # refuses to overwrite something that is not ours
    elif any(not p.name.startswith((".data-", ".manifest")) for p in folder.iterdir()):
        raise IndexFormatError(f"refusing to save into {folder}: it is not empty and not a gallery index")


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        raise IndexFormatError(f"{folder} is not a BLIP-2 Studio gallery index (no manifest.json)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexFormatError(
            f"gallery index in {folder} is corrupt: unreadable manifest.json ({exc})"
        ) from exc
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        found = m.get("format") if isinstance(m, dict) else None
        raise IndexFormatError(f"{folder} is not a BLIP-2 Studio gallery index (manifest format {found!r})")
    version = m.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise IndexFormatError(f"gallery index in {folder} is corrupt: invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise IndexFormatError(
            f"gallery index in {folder} was written by a newer BLIP-2 Studio (format version {version}); "
            f"this version reads up to {FORMAT_VERSION}: upgrade, or rebuild the index"
        )
    ints = ("count", "dim", "num_queries", "next_item_id")
    valid = (
        all(isinstance(m.get(k), int) and not isinstance(m.get(k), bool) and m[k] >= 0 for k in ints)
        and isinstance(m.get("data"), str)
        and _DATA_DIR.match(m["data"]) is not None  # also rules out paths outside the folder
        and isinstance(m.get("sha256"), dict)
        and set(m["sha256"]) == {"items.json", "embeddings.npy"}
    )
    if not valid:
        raise IndexFormatError(f"gallery index in {folder} is corrupt: manifest.json is missing fields")
    return m


# --------------------------------------------------------------------------- re-rank


def rerank_with_itm(
    hits: Sequence[SearchHit], itm_scorer: Callable[[list[str]], Sequence[float]], k: int
) -> list[SearchHit]:
    """Re-sort the top ``k`` hits by ITM match probability, as LAVIS does after ITC retrieval.

    ``itm_scorer`` maps content hashes to ITM probabilities. Hits after the top k keep their
    ITC order (and ``itm_probability=None``); ties keep ITC order; ranks are renumbered from 1.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"re-rank k must be 0 or more, got {k!r}")
    hits = sorted(hits, key=lambda h: h.rank)
    head, tail = hits[:k], hits[k:]
    if head:
        probs = [float(p) for p in itm_scorer([h.content_hash for h in head])]
        if len(probs) != len(head) or not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"ITM scorer must return {len(head)} probabilities in [0, 1], got {probs!r}")
        scored = sorted(zip(head, probs, strict=True), key=lambda hp: -hp[1])  # stable: ties keep ITC order
        head = [replace(h, itm_probability=p) for h, p in scored]
    return [replace(h, rank=i) for i, h in enumerate(head + tail, start=1)]
