"""Gallery retrieval at scale: build time, query latency, memory and recall of GalleryIndex.

Synthetic galleries of L2-normalised 32 x 256 query embeddings per image (BLIP-2's layout),
1k / 10k / 100k images. Each size runs in a fresh subprocess so memory numbers are its own.
In the same run, per size: a brute-force numpy baseline (max-over-queries cosine of every
image), the exact faiss path and the approximate path (PQ fast-scan + exact re-score).

Data: i.i.d. random unit vectors, the worst case for any approximate index (no cluster
structure; the best images beat the rest by tiny margins). Two kinds of text queries:
"random" (another random unit vector: no image really matches) and "matching" (a noisy copy
of one query token of a random image, cosine about 0.5, like a caption of that image).

    .venv/bin/python benchmarks/retrieval_scale.py                 # 1k, 10k, 100k (~5 min)
    .venv/bin/python benchmarks/retrieval_scale.py --sizes 1000    # quick look

Writes benchmarks/results/retrieval_scale.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blip2_app.retrieval import GalleryIndex, IndexSettings  # noqa: E402

Q, D, TOP_K = 32, 256, 10
CHUNK = 4096  # images generated and added per batch
RAM_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
    }


def timed(fn, queries: np.ndarray, warmup: int = 2) -> tuple[dict[str, float], list]:
    for q in queries[:warmup]:
        fn(q)
    seconds, results = [], []
    for q in queries:
        start = time.perf_counter()
        results.append(fn(q))
        seconds.append(time.perf_counter() - start)
    return percentiles(seconds), results


def brute_force_top(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    """Baseline: score every image (max over its queries of the cosine), keep the best k."""
    scores = (vectors.reshape(-1, D) @ query).reshape(len(vectors), Q).max(axis=1)
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return ids[top[np.lexsort((ids[top], -scores[top]))]].tolist()


def ground_truth(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> list[set[int]]:
    """Exact top-k item ids for many queries at once (blocked matrix product)."""
    best = np.full((len(queries), len(vectors)), -np.inf, np.float32)
    for start in range(0, len(vectors), CHUNK):
        block = vectors[start : start + CHUNK]
        sims = (block.reshape(-1, D) @ queries.T).reshape(len(block), Q, len(queries))
        best[:, start : start + len(block)] = sims.max(axis=1).T
    top = np.argsort(-best, axis=1, kind="stable")[:, :k]
    return [set(ids[row].tolist()) for row in top]


def recall(hits: list[list[int]], truth: list[set[int]]) -> float:
    return float(np.mean([len(set(h) & t) / len(t) for h, t in zip(hits, truth, strict=True)]))


def run_size(n: int, n_queries: int, n_slow: int, settings: IndexSettings) -> dict:
    load_before = os.getloadavg()[0]  # another process on the same cores shows up here
    rng = np.random.default_rng(n)
    index = GalleryIndex(settings)
    index.reserve(n)
    add_s = 0.0
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        emb = unit(rng, m, Q, D)  # generation is not timed
        hashes = [f"{i:08x}" for i in range(start, start + m)]
        t0 = time.perf_counter()
        index.add(emb, hashes, [f"img{i}.jpg" for i in range(start, start + m)])
        add_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    index.build_approximate()
    build_s = time.perf_counter() - t0
    ids, vectors = index.snapshot()

    random_q = unit(rng, n_queries, D)
    owners, tokens = rng.integers(n, size=n_queries), rng.integers(Q, size=n_queries)
    matching_q = vectors[owners, tokens] + 1.7 * unit(rng, n_queries, D)  # cosine ~ 1/sqrt(1+1.7^2) = 0.5
    matching_q /= np.linalg.norm(matching_q, axis=1, keepdims=True)

    def hit_ids(method: str):
        return lambda q: [h.item_id for h in index.search_text(q, TOP_K, method=method)]

    slow_q = random_q[:n_slow]  # brute force and exact faiss scan everything: fewer queries
    brute, brute_ids = timed(lambda q: brute_force_top(vectors, ids, q, TOP_K), slow_q)
    exact, exact_ids = timed(hit_ids("exact"), slow_q)
    approx, _ = timed(hit_ids("approximate"), random_q)
    truth_random = ground_truth(vectors, ids, random_q, TOP_K)
    truth_matching = ground_truth(vectors, ids, matching_q, TOP_K)
    approx_random = [hit_ids("approximate")(q) for q in random_q]
    approx_matching = [hit_ids("approximate")(q) for q in matching_q]

    # Image -> image (symmetric Chamfer): a lightly perturbed copy of a gallery image as query.
    sources = rng.integers(n, size=20)
    image_q = vectors[sources] + 0.05 * unit(rng, 20, Q, D)
    image_q /= np.linalg.norm(image_q, axis=-1, keepdims=True)
    image_approx, image_hits = timed(lambda q: index.search_image(q, TOP_K, method="approximate"), image_q)
    return {
        "images": n,
        "query_vectors": n * Q,
        "add_s": round(add_s, 2),
        "approx_build_s": round(build_s, 2),
        "store_mb": round(vectors.nbytes / 2**20, 1),
        "approx_index_mb": round(index.approximate_index_bytes / 2**20, 1),
        "rss_mb": round(rss_mb(), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "latency_queries": {"bruteforce_exact": len(slow_q), "approximate": len(random_q)},
        "bruteforce_numpy": brute,
        "exact_faiss": exact,
        "approximate": approx,
        "exact_equals_bruteforce": all(a == b for a, b in zip(exact_ids, brute_ids, strict=True)),
        "recall_at_10_random_queries": round(recall(approx_random, truth_random), 4),
        "recall_at_10_matching_queries": round(recall(approx_matching, truth_matching), 4),
        "image_query_approximate": image_approx,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "image_query_self_at_rank_1": float(
            np.mean([hits[0].item_id == ids[s] for hits, s in zip(image_hits, sources, strict=True)])
        ),
    }


def markdown(results: dict) -> str:
    rows = [
        "| images | query vectors | add s | approx build s | store MB | approx index MB | RSS MB "
        "| numpy brute force p50 / p95 ms | exact faiss p50 / p95 ms | approximate p50 / p95 ms "
        "| recall@10 random q | recall@10 matching q | image query approx p50 / p95 ms |",
        "|" + "---|" * 13,
    ]
    for r in results["sizes"]:
        if "skipped" in r:
            rows.append(f"| {r['images']:,} | {r['images'] * Q:,} | skipped: {r['skipped']} |" + " |" * 10)
            continue
        pair = lambda m: f"{m['p50_ms']:.1f} / {m['p95_ms']:.1f}"
        rows.append(
            f"| {r['images']:,} | {r['query_vectors']:,} | {r['add_s']:.1f} | {r['approx_build_s']:.1f} "
            f"| {r['store_mb']:,.0f} | {r['approx_index_mb']:,.1f} | {r['rss_mb']:,.0f} "
            f"| {pair(r['bruteforce_numpy'])} | {pair(r['exact_faiss'])} | {pair(r['approximate'])} "
            f"| {r['recall_at_10_random_queries']:.3f} | {r['recall_at_10_matching_queries']:.3f} "
            f"| {pair(r['image_query_approximate'])} |"
        )
    m = results["machine"]
    s = results["settings"]
    lines = [
        "# Gallery retrieval at scale",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GiB RAM; faiss {m['faiss']}, numpy {m['numpy']}.",
        f"Settings: {s}. top_k = {TOP_K}. Data: i.i.d. random unit vectors, 32 x 256 per image.",
        "",
        *rows,
        "",
        f"Target (100k images: approximate p95 < 50 ms and recall@10 >= 0.95): {results['target']}",
        "",
        "1-minute load average at start / end of each size (2 cores; above ~1 another process was "
        "competing for them): "
        + ", ".join(
            f"{r['images']:,}: {r['load_average_1min'][0]} / {r['load_average_1min'][1]}"
            for r in results["sizes"]
            if "skipped" not in r
        ),
        "",
        "Exact faiss top-10 equals the numpy brute force at every size: "
        + ", ".join(
            f"{r['images']:,}: {r['exact_equals_bruteforce']}" for r in results["sizes"] if "skipped" not in r
        ),
        "",
        "Image queries (symmetric Chamfer, approximate path): the gallery image a query was perturbed from "
        "ranks first in "
        + ", ".join(
            f"{r['images']:,}: {r['image_query_self_at_rank_1']:.0%}"
            for r in results["sizes"]
            if "skipped" not in r
        )
        + " of queries.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--queries", type=int, default=200, help="approximate-path latency and recall queries"
    )
    parser.add_argument("--slow-queries", type=int, default=30, help="brute-force / exact latency queries")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    args = parser.parse_args()
    settings = IndexSettings()

    if args.one:
        print(json.dumps(run_size(args.one, args.queries, args.slow_queries, settings)))
        return

    import faiss

    results = {
        "machine": {
            "cpu": platform.processor() or _cpu_model(),
            "cores": os.cpu_count(),
            "ram_gb": round(RAM_BYTES / 2**30, 1),
            "faiss": faiss.__version__,
            "numpy": np.__version__,
        },
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "sizes": [],
    }
    for n in args.sizes:
        need = n * Q * D * 4  # the float32 store alone, needed for exact re-scoring
        if need > 0.6 * RAM_BYTES:
            reason = (
                f"the float32 store alone is {need / 2**30:.1f} GiB, more than this machine's "
                f"{RAM_BYTES / 2**30:.0f} GiB RAM allows"
            )
            print(f"{n:>9,} images: skipped ({reason})", flush=True)
            results["sizes"].append({"images": n, "skipped": reason})
            continue
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--one", str(n), "--queries", str(args.queries)]
        cmd += ["--slow-queries", str(args.slow_queries)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        results["sizes"].append(r)
        print(
            f"{n:>9,} images: approx p95 {r['approximate']['p95_ms']} ms, recall@10 "
            f"{r['recall_at_10_random_queries']} / {r['recall_at_10_matching_queries']}, "
            f"exact p95 {r['exact_faiss']['p95_ms']} ms, numpy p95 {r['bruteforce_numpy']['p95_ms']} ms, "
            f"build {r['add_s'] + r['approx_build_s']:.1f} s ({r['wall_s']} s wall)",
            flush=True,
        )
    big = [r for r in results["sizes"] if r["images"] == 100_000 and "skipped" not in r]
    if big:
        ok = big[0]["approximate"]["p95_ms"] < 50 and big[0]["recall_at_10_random_queries"] >= 0.95
        results["target"] = "met" if ok else "NOT met"
    else:
        results["target"] = "not measured (100k not in --sizes)"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retrieval_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "retrieval_scale.md").write_text(markdown(results))
    print(f"wrote {args.out / 'retrieval_scale.json'} and .md")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
