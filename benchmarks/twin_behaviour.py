"""What the search and Explain tabs do with a retrieval twin of the demo model (issue 19): the
counts behind tests/test_search_chat.py's, tests/test_explain.py's and test_demo_model.py's ranking
and matching tests, on the same held-out scenes, plus the same questions in words the twin was
never trained on. `--scenes 1000 --pairs 1000` tells a twin's rates from one draw's luck.

    python benchmarks/twin_behaviour.py                                   # the bundled twin
    python benchmarks/twin_behaviour.py assets/models/blip2-shapes-itm /tmp/run/out/blip2-shapes-itm \
        --name shipped --name candidate --out benchmarks/results/twin_behaviour

Per twin (fp32), about 30 seconds: "more like this" from each red circle of six galleries of 120
single-shape pictures (first result a red circle), an example image of a red shape with a
negative text (no red shape in the top 3; first result a non-red look-alike), heatmap peaks in
the named shape, a caption's match above that of an absent shape, zero-shot labels of one
shape's colour and shape, and ITM of an object's phrase above its false twin ("the blue circle"
for a red one) on both renderers. Stage 1 is trained on some forms of "a red shape" / "a photo of {}"
(`shapes_data.COLOUR_FORMS`, `SHAPE_FORMS`); "anything red", "a drawing of {}", "this shape is {}"
and "this is a {}" are not among them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blip2_app import explain  # noqa: E402
from blip2_app.config import Settings  # noqa: E402
from blip2_app.startup import load_engine  # noqa: E402
from blip2_app.training import synthetic  # noqa: E402
from blip2_app.training.shapes_data import phrase_pair  # noqa: E402
from blip2_app.ui.tabs.retrieval import RetrievalHandlers, SearchView  # noqa: E402

FIRST_GALLERY_SEED = 777  # tests/test_search_chat.py's six galleries: seeds 777-782, 120 pictures
NEGATIVES = ("a red shape", "red", "anything red")
LABEL_TEMPLATES = {
    "colour": ("a photo of {}", "a drawing of {}", "this shape is {}"),
    "shape": ("a photo of {}", "a drawing of a {}", "this is a {}"),
}


def _kind(name: str) -> tuple[str, str]:
    _, colour, shape = Path(name).stem.split("-")
    return colour, shape


def search_counts(engine, folder: Path, galleries_count: int, size: int) -> dict[str, tuple[int, int]]:
    """(count, out of) for each search measure over the galleries."""
    searches = RetrievalHandlers(engine, Settings(model="shapes-demo"))
    galleries = []
    for seed in range(FIRST_GALLERY_SEED, FIRST_GALLERY_SEED + galleries_count):
        shown = synthetic.single_shape_gallery(folder / str(seed), seed, size)
        galleries.append((shown, searches.index_gallery([p for p, _, _ in shown], False, None)[1]))
    # Each test's rows together, in the order of the report.
    measures = [
        "more like this",
        *(f"but not red: {negative!r}" for negative in NEGATIVES),
        *(f"look-alike first: {negative!r}" for negative in NEGATIVES),
        "look-alike first: image alone",
    ]
    counts = {measure: [0, 0] for measure in measures}

    def add(measure: str, hit: bool) -> None:
        counts[measure][0] += bool(hit)
        counts[measure][1] += 1

    for shown, session in galleries:
        for path, colour, shape in shown:
            if (colour, shape) == ("red", "circle"):
                _, report = searches.more_like_this(Path(path).name, 5, session, SearchView())
                add("more like this", _kind(report.hits[0].name) == ("red", "circle"))
            if colour != "red":
                continue
            for negative in NEGATIVES:
                _, report = searches.combined_search("", path, negative, 5, session, SearchView())
                found = [_kind(hit.name) for hit in report.hits]
                add(f"but not red: {negative!r}", all(c != "red" for c, _ in found[:3]))
                add(f"look-alike first: {negative!r}", found[0][0] != "red" and found[0][1] == shape)
            _, alone = searches.combined_search("", path, "", 5, session, SearchView())
            first = _kind(alone.hits[0].name)
            add("look-alike first: image alone", first[0] != "red" and first[1] == shape)
    return {measure: (hit, total) for measure, (hit, total) in counts.items()}


def explain_counts(engine, scenes: int) -> dict[str, tuple[int, int]]:
    """(count, out of) for each Explain measure over `scenes` held-out scenes (tests/test_explain.py: 50)."""
    counts = {}
    peaks = colour_peaks = lower = 0

    def peak_inside(obj: synthetic.ShapeObject, grid) -> bool:
        """The centre of the map's hottest patch lies in the object's box (as the tests count)."""
        y, x = explain.peak_cell(grid)
        cell = synthetic.IMAGE_SIZE / grid.shape[0]
        return obj.box_contains((x + 0.5) * cell, (y + 0.5) * cell)

    for index in range(scenes):
        scene = synthetic.make_scene(31337, "test", index, count=2 + index % 2)
        obj = scene.objects[index % len(scene.objects)]
        heatmap = explain.explain(engine, scene.render(), f"the {obj.colour} {obj.shape}")
        peaks += peak_inside(obj, heatmap.grid)
        colour_peaks += peak_inside(obj, dict(heatmap.words)[obj.colour])
        other = synthetic.make_scene(31338, "test", index, count=2 + index % 2)
        image, first = other.render(), other.objects[0]
        absent = next(s for s in synthetic.SHAPES if s not in {o.shape for o in other.objects})
        wrong = explain.match(engine, image, f"the {first.colour} {absent}")
        lower += wrong.itm < explain.match(engine, image, other.caption).itm
    counts["heatmap: peak in the named shape"] = (peaks, scenes)
    counts["heatmap: colour word's peak in the named shape"] = (colour_peaks, scenes)
    counts["match: caption above an absent shape"] = (lower, scenes)
    for kind, templates in LABEL_TEMPLATES.items():
        labels = list(synthetic.COLOURS if kind == "colour" else synthetic.SHAPES)
        for template in templates:
            right = 0
            for index in range(scenes):
                scene = synthetic.make_scene(4242, "test", index, count=1)
                ranked = explain.classify(engine, scene.render(), labels, template)
                right += ranked[0].label == getattr(scene.objects[0], kind)
            counts[f"zero-shot {kind}: {template!r}"] = (right, scenes)
    return counts


def false_twin_counts(engine, scenes: int, batch: int = 50) -> dict[str, tuple[int, int]]:
    """(count, out of) of ITM scoring an object's phrase above its false twin on the same image, per
    renderer: tests/test_demo_model.py's pairs (seed 20266, the phrase generator seeded 0; 40 there)."""
    counts = {}
    for renderer in ("random", "paint"):
        rng = np.random.default_rng(0)
        drawn = [synthetic.make_scene(20266, "test", i, style=renderer) for i in range(scenes)]
        pairs = [phrase_pair(scene, rng) for scene in drawn]
        above = 0
        for start in range(0, scenes, batch):
            images = [scene.render() for scene in drawn[start : start + batch]]
            true = engine.itm(images, [t for t, _ in pairs[start : start + batch]])
            false = engine.itm(images, [f for _, f in pairs[start : start + batch]])
            above += int((np.asarray(true) > np.asarray(false)).sum())
        counts[f"ITM: named object above its false twin ({renderer})"] = (above, scenes)
    return counts


def measure(
    twin: str, galleries: int = 6, gallery_size: int = 120, scenes: int = 50, pairs: int = 40
) -> dict[str, tuple[int, int]]:
    engine = load_engine(Settings(model=twin, precision="fp32", retrieval_model="none"))
    with tempfile.TemporaryDirectory() as folder:
        return {
            **search_counts(engine, Path(folder), galleries, gallery_size),
            **explain_counts(engine, scenes),
            **false_twin_counts(engine, pairs),
        }


def markdown(results: dict[str, dict[str, tuple[int, int]]]) -> str:
    names = list(results)
    lines = [
        "# What the search and Explain tabs do with each retrieval twin",
        "",
        "`benchmarks/twin_behaviour.py`, fp32; counts of held-out pictures. The tests",
        "(tests/test_search_chat.py, tests/test_explain.py) ask the first row of each group (look-alike",
        "first: on the first gallery only). Stage 1's attribute forms (decision 0014) include 'red',",
        "'a red shape' and 'a photo of {}', not 'anything red', 'a drawing of {}', 'this shape is {}'",
        "or 'this is a {}'.",
        "",
        "| measure | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key in results[names[0]]:
        cells = [f"{results[n][key][0]} / {results[n][key][1]}" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("twins", nargs="*", default=["shapes-demo-itm"], help="registry names or folders")
    parser.add_argument("--name", action="append", help="a column label for each twin (default: its path)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--galleries", type=int, default=6, help="galleries of single-shape pictures")
    parser.add_argument("--gallery-size", type=int, default=120)
    parser.add_argument("--scenes", type=int, default=50, help="scenes per Explain measure")
    parser.add_argument("--pairs", type=int, default=40, help="scenes per false-twin ITM measure")
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    names = args.name or args.twins
    if len(names) != len(args.twins):
        parser.error("give one --name per twin")
    torch.set_num_threads(args.threads)
    results = {
        name: measure(twin, args.galleries, args.gallery_size, args.scenes, args.pairs)
        for name, twin in zip(names, args.twins, strict=True)
    }
    text = markdown(results)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"twins": dict(zip(names, args.twins, strict=True)), "counts": results}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
