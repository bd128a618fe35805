"""Explaining a match (blip2_app/explain.py) on the bundled demo retrieval model, where the answers
are known: heatmaps that peak on the named shape, lower match for an absent shape, zero-shot
colour and shape labels; plus the inputs' sentences and the CLI's `match`, `explain`, `classify`.

Images: held-out scenes (seeds training never used) from `training.synthetic`, whose objects carry
their centre and diameter, so "inside the shape's box" is exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip2_app import explain
from blip2_app.config import Settings
from blip2_app.errors import InvalidRequestError
from blip2_app.startup import load_engine
from blip2_app.training import synthetic
from blip2_app.training.shapes_data import phrase_pair

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "assets" / "models" / "blip2-shapes-itm"
needs_demo = pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason=f"{BUNDLED} is missing")
SCENES = 50


@pytest.fixture(scope="module")
def demo():
    return load_engine(Settings(model="shapes-demo-itm"))


def _inside(obj: synthetic.ShapeObject, cell: tuple[int, int], grid: np.ndarray) -> bool:
    """The centre of patch `cell` lies in the object's bounding box."""
    size = synthetic.IMAGE_SIZE / grid.shape[0]
    return obj.box_contains((cell[1] + 0.5) * size, (cell[0] + 0.5) * size)


@pytest.fixture(scope="module")
def heatmaps(demo):
    """For 50 scenes of two or three shapes: (scene, named object, heatmap of "the <colour> <shape>")."""
    found = []
    for index in range(SCENES):
        scene = synthetic.make_scene(31337, "test", index, count=2 + index % 2)
        obj = scene.objects[index % len(scene.objects)]
        found.append((scene, obj, explain.explain(demo, scene.render(), f"the {obj.colour} {obj.shape}")))
    return found


# Measured with the bundled demo model (50 scenes, seed 31337): 48 of 50 and 50 of 50 (the
# twin before issue 19, which spread the evidence over every shape: 26 and 24).
@needs_demo
def test_the_heatmap_peaks_inside_the_named_shape(heatmaps):
    hits = sum(_inside(obj, explain.peak_cell(h.grid), h.grid) for _, obj, h in heatmaps)
    assert hits >= 0.8 * SCENES, hits


@needs_demo
def test_the_colour_words_map_peaks_inside_the_named_shape(heatmaps):
    hits = sum(_inside(obj, explain.peak_cell(dict(h.words)[obj.colour]), h.grid) for _, obj, h in heatmaps)
    assert hits >= 0.8 * SCENES, hits


@needs_demo
def test_heatmaps_are_well_formed_and_beat_chance(heatmaps):
    """What the maps are (8 x 8 patches for 64 px / patch 8, max 1, one map per word) and a floor far
    above chance: a box covers about 5 of 64 patches, so a random peak lands in it about 8% of the time."""
    for _, obj, heatmap in heatmaps:
        assert heatmap.grid.shape == (8, 8) and heatmap.grid.min() >= 0 and heatmap.grid.max() == 1
        assert [word for word, _ in heatmap.words] == ["the", obj.colour, obj.shape]
    hits = sum(_inside(obj, explain.peak_cell(h.grid), h.grid) for _, obj, h in heatmaps)
    assert hits >= 0.4 * SCENES, hits


@needs_demo
def test_an_absent_shape_matches_less_than_the_true_caption(demo):
    """Measured: 49 of 50."""
    lower = 0
    for index in range(SCENES):
        scene = synthetic.make_scene(31338, "test", index, count=2 + index % 2)
        image, obj = scene.render(), scene.objects[0]
        absent = next(s for s in synthetic.SHAPES if s not in {o.shape for o in scene.objects})
        truth = explain.match(demo, image, scene.caption)
        wrong = explain.match(demo, image, f"the {obj.colour} {absent}")
        lower += wrong.itm < truth.itm
    assert lower >= 0.95 * SCENES, lower


@needs_demo
@pytest.mark.parametrize(
    ("kind", "labels"), [("colour", list(synthetic.COLOURS)), ("shape", list(synthetic.SHAPES))]
)
def test_zero_shot_labels_name_the_shape(demo, kind, labels):
    """Single-shape held-out scenes; measured 50/50 colours, 50/50 shapes (chance: 1/6, 1/4)."""
    right = 0
    for index in range(SCENES):
        scene = synthetic.make_scene(4242, "test", index, count=1)
        ranked = explain.classify(demo, scene.render(), labels)
        assert sorted(s.label for s in ranked) == sorted(labels)
        assert abs(sum(s.probability for s in ranked) - 1) < 1e-5
        assert [s.probability for s in ranked] == sorted((s.probability for s in ranked), reverse=True)
        right += ranked[0].label == getattr(scene.objects[0], kind)
    assert right >= 0.9 * SCENES, right


@needs_demo
def test_classify_uses_the_template_and_itm_rerank_orders_by_itm(demo):
    image = synthetic.make_scene(4242, "test", 0, count=1).render()
    ranked = explain.classify(demo, image, ["red", "blue", "green"], "a {} shape", rerank=True)
    assert {s.text for s in ranked} == {"a red shape", "a blue shape", "a green shape"}
    itm = [s.itm for s in ranked]
    assert itm == sorted(itm, reverse=True)
    direct = demo.itm([image] * 3, [s.text for s in ranked]).tolist()
    assert itm == pytest.approx(direct, abs=1e-5)
    cosines = demo.itc([image], [s.text for s in ranked])[0].tolist()
    assert [s.itc for s in ranked] == pytest.approx(cosines, abs=1e-5)


@needs_demo
def test_the_heatmaps_match_probability_is_the_engines(demo, heatmaps):
    scene, _, heatmap = heatmaps[0]
    assert heatmap.itm == pytest.approx(float(demo.itm([scene.render()], [heatmap.text])[0]), abs=1e-4)
    assert explain.match(demo, scene.render(), heatmap.text).itm == pytest.approx(heatmap.itm, abs=1e-4)


def test_labels_and_templates_are_checked():
    assert explain.parse_labels("cat, dog\nred car ,, Cat") == ["cat", "dog", "red car"]
    with pytest.raises(InvalidRequestError, match="at least two labels"):
        explain.parse_labels("cat")
    with pytest.raises(InvalidRequestError, match="at most 20"):
        explain.parse_labels(",".join(f"l{i}" for i in range(21)))
    with pytest.raises(InvalidRequestError, match="must be text"):
        explain.parse_labels(42)
    assert explain.check_template("") == "a photo of {}"
    assert explain.check_template("a  drawing of {}") == "a drawing of {}"
    for bad in ("no slot", "{} and {}", "a {0} thing {}"):
        with pytest.raises(InvalidRequestError, match="exactly one"):
            explain.check_template(bad)
    with pytest.raises(InvalidRequestError, match="type a text"):
        explain.check_text("   ")
    with pytest.raises(InvalidRequestError, match="too long"):
        explain.check_text("x" * 301)


def test_overlay_keeps_the_aspect_and_marks_the_peak():
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    grid = np.zeros((4, 4))
    grid[0, 3] = 1.0
    drawn = np.asarray(explain.overlay(image, grid, size=200))
    assert drawn.shape == (100, 200, 3)
    assert drawn[10, 190, 0] > drawn[90, 10, 0]  # top right is the hot patch: redder


def test_dynamic_int8_qformer_is_refused_with_a_sentence(load_tiny):
    engine = load_tiny("tiny-random-itm", precision="dynamic-int8")
    with pytest.raises(InvalidRequestError, match="--qformer-precision fp32"):
        explain.explain(engine, Image.new("RGB", (32, 32)), "a cat")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blip2_app", *args], capture_output=True, text=True, timeout=300, check=False
    )


@needs_demo
def test_cli_match_explain_and_classify_use_the_retrieval_partner(tmp_path, demo):
    scene = synthetic.make_scene(31337, "test", 1, count=3)
    image = tmp_path / "scene.png"
    scene.render().save(image)
    obj = scene.objects[0]
    text = f"the {obj.colour} {obj.shape}"
    expected = explain.explain(demo, str(image), text)

    matched = run_cli("match", "--model", "shapes-demo", "--json", str(image), text)
    assert matched.returncode == 0, matched.stderr
    scores = json.loads(matched.stdout)
    assert scores["itm"] == pytest.approx(expected.itm, abs=1e-4) and -1 <= scores["itc"] <= 1

    out = tmp_path / "maps"
    explained = run_cli("explain", "--model", "shapes-demo", "--json", "--out", str(out), str(image), text)
    assert explained.returncode == 0, explained.stderr
    result = json.loads(explained.stdout)
    assert np.allclose(result["grid"], expected.grid, atol=1e-3) and result["itm"] == pytest.approx(
        expected.itm, abs=1e-4
    )
    assert all(v >= 0 for row in result["grid"] for v in row) and len(result["grid"]) == 8
    assert sorted(p.name for p in out.iterdir()) == [
        "heatmap.png",
        "word-01-the.png",
        f"word-02-{obj.colour}.png",
        f"word-03-{obj.shape}.png",
    ]
    assert Image.open(out / "heatmap.png").size == (384, 384)

    labels = list(synthetic.COLOURS)
    classified = run_cli("classify", "--model", "shapes-demo", "--json", str(image), *labels)
    assert classified.returncode == 0, classified.stderr
    ranked = [json.loads(line) for line in classified.stdout.splitlines()]
    want = explain.classify(demo, str(image), labels)
    assert [r["label"] for r in ranked] == [s.label for s in want]

    refused = run_cli("classify", "--model", "shapes-demo", str(image), "red")
    assert refused.returncode == 2 and "at least two labels" in refused.stderr


@needs_demo
def test_twin_behaviour_benchmark_counts_what_the_tests_count(demo, tmp_path):
    """benchmarks/twin_behaviour.py on a small share: its totals are the pictures asked about and
    its zero-shot count is explain.classify's on the same scenes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import twin_behaviour

    small = ["--galleries", "1", "--gallery-size", "30", "--scenes", "4", "--pairs", "6"]
    twin_behaviour.main(["shapes-demo-itm", *small, "--out", str(tmp_path / "t")])
    counts = json.loads((tmp_path / "t.json").read_text())["counts"]["shapes-demo-itm"]
    gallery = [synthetic.make_scene(777, "test", i, count=1).objects[0] for i in range(30)]
    reds = sum(o.colour == "red" for o in gallery)
    assert counts["more like this"][1] == sum((o.colour, o.shape) == ("red", "circle") for o in gallery)
    assert counts["but not red: 'a red shape'"][1] == counts["look-alike first: image alone"][1] == reds
    assert all(0 <= hit <= total for hit, total in counts.values())
    scenes = [synthetic.make_scene(4242, "test", i, count=1) for i in range(4)]
    right = sum(
        explain.classify(demo, s.render(), list(synthetic.COLOURS))[0].label == s.objects[0].colour
        for s in scenes
    )
    assert counts["zero-shot colour: 'a photo of {}'"] == [right, 4]
    rng = np.random.default_rng(0)
    drawn = [synthetic.make_scene(20266, "test", i, style="paint") for i in range(6)]
    pairs = [phrase_pair(scene, rng) for scene in drawn]  # tests/test_demo_model.py's first six
    images = [scene.render() for scene in drawn]
    true, false = demo.itm(images, [t for t, _ in pairs]), demo.itm(images, [f for _, f in pairs])
    assert counts["ITM: named object above its false twin (paint)"] == [int((true > false).sum()), 6]
    assert (tmp_path / "t.md").read_text().count("\n| ") == len(counts) + 1
