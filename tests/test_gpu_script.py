"""benchmarks/gpu_static_cache.py in its CPU form, on the tiny BLIP-2 OPT checkpoint.

The script is meant for a lent GPU (bash benchmarks/gpu.sh static-cache); here it runs its whole
path but torch.compile (--no-compile): every variant and batch size measured, the static cache
really used, its greedy tokens equal to the dynamic cache's, and the floor from the language
model's weight bytes. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_static_cache.py"
VARIANTS = ("naive-fp32", "dynamic", "static-reused", "static")
BATCHES = (1, 3)

pytestmark = pytest.mark.slow  # one subprocess of about 30 s: 4 variants x 2 batches x ~13 generates


def run_script(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def tiny_opt() -> Path:
    from blip2_app.testing import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint("blip2-opt")


@pytest.fixture(scope="module")
def results(tiny_opt, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-script")
    run = run_script(
        "--model", str(tiny_opt), "--device", "cpu", "--dtype", "fp32", "--no-compile",
        "--repeats", "1", "--warmup", "0", "--batches", ",".join(map(str, BATCHES)),
        "--copy-gib", "0.01", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / "gpu_static_cache.md").read_text().startswith("# Static cache and compiled decoding")
    return json.loads((out / "gpu_static_cache.json").read_text())


def rows_by_key(results: dict) -> dict[tuple[str, int], dict]:
    return {(row["variant"], row["batch"]): row for row in results["rows"]}


def test_every_variant_and_batch_has_its_figures(results):
    rows = rows_by_key(results)
    assert set(rows) == {(variant, batch) for variant in VARIANTS for batch in BATCHES}
    for key, row in rows.items():
        assert "error" not in row, (key, row.get("error"))
        assert row["caption_s"] > 0 and row["first_call_s"] > 0, key
        for field in ("decode_s_per_token", "x_floor", "speedup_vs_naive"):
            assert field in row, (key, field)
        assert row["new_tokens_per_s"] == pytest.approx(row["batch"] * 20 / row["caption_s"], rel=0.01)
        assert row["speedup_vs_naive"] == pytest.approx(
            rows[("naive-fp32", row["batch"])]["caption_s"] / row["caption_s"], rel=0.01
        )
    assert results["machine"]["copy_bandwidth_gbs"] > 0
    assert results["machine"]["compile"] is False
    assert set(results["targets"]) == {
        "judged_on",
        "decode_within_3x_floor",
        "caption_3x_faster_than_naive",
        "greedy_equal_to_dynamic",
    }


def test_static_cache_is_used_and_greedy_tokens_equal_the_dynamic_caches(results):
    rows = rows_by_key(results)
    for batch in BATCHES:
        dynamic = rows[("dynamic", batch)]
        assert dynamic["cache_class"] == "DynamicCache"
        assert len(dynamic["tokens"]) == batch and all(len(seq) == 20 for seq in dynamic["tokens"])
        for variant in ("static", "static-reused"):
            row = rows[(variant, batch)]
            assert row["cache_class"] == "StaticCache", variant
            assert row["tokens"] == dynamic["tokens"], variant
            assert row["tokens_equal_dynamic"] is True and row["mismatched_sequences"] == 0
            assert row["compiled"] is False and row["compiled_graphs"] == 0  # --no-compile
    # Different images give different captions: the comparison above is not between constants.
    assert len({tuple(seq) for seq in rows[("dynamic", 3)]["tokens"]}) > 1
    assert results["targets"]["greedy_equal_to_dynamic"] is True


def test_floor_is_the_language_models_weight_bytes_over_the_bandwidth(results, tiny_opt):
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(tiny_opt)
    weight_bytes = sum(
        m.weight.numel() * 4 for m in model.language_model.modules() if isinstance(m, torch.nn.Linear)
    )
    bandwidth = results["machine"]["copy_bandwidth_gbs"] * 1e9
    for row in results["rows"]:
        assert row["lm_weight_bytes"] == weight_bytes
        assert row["floor_s_per_token"] == pytest.approx(weight_bytes / bandwidth, rel=0.02)


def test_a_token_mismatch_is_reported_with_its_place():
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_static_cache import compare_tokens

    assert compare_tokens([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == {
        "tokens_equal_dynamic": False,
        "mismatched_sequences": 1,
        "first_mismatch": {"sequence": 1, "position": 1},
    }
    assert compare_tokens([[1, 2]], [[1, 2]]) == {"tokens_equal_dynamic": True, "mismatched_sequences": 0}


def test_a_cpu_run_must_name_its_results_folder(tiny_opt):
    run = run_script("--model", str(tiny_opt), "--device", "cpu")
    assert run.returncode == 2
    assert "--out is required on CPU" in run.stderr
