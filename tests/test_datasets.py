"""Dataset loaders on small fixture files, the synthetic generator, and the download helper
(against file:// URLs and a local HTTP server on 127.0.0.1 only)."""

import hashlib
import http.server
import itertools
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from blip2_app.training import paint, randomised, synthetic
from blip2_app.training.datasets import DatasetSpec, load_records
from blip2_app.training.download import ChecksumError, download
from blip2_app.training.shapes_data import patch_attributes, perturb, phrase_pair

FIXTURES = Path(__file__).parent / "data" / "datasets"


def spec(kind: str, **paths: str) -> str:
    return kind + ":" + ",".join(f"{k}={FIXTURES / v if k != 'subtype' else v}" for k, v in paths.items())


# ----------------------------------------------------------------------------- loaders


def test_coco_karpathy_splits_with_restval_in_train():
    coco = spec("coco", annotations="coco_karpathy.json", images=".")
    train = load_records(coco, "train")
    assert [r.image_id for r in train] == ["101", "102"]
    assert train[0].captions == ("A red square.", "a plain red picture")
    assert train[0].image == str(FIXTURES / "images" / "red.png")
    assert train[0].load_image().getpixel((0, 0)) == (200, 30, 30)
    test = load_records(coco, "test")
    assert [(r.image_id, r.caption) for r in test] == [("103", "Something red")]
    assert len(load_records(coco, "val")) == 1
    assert len(load_records(coco, "train", limit=1)) == 1


def test_flickr30k_karpathy_json_and_token_file():
    karpathy = load_records(spec("flickr30k", annotations="flickr30k_karpathy.json", images="images"), "test")
    assert [(r.image_id, r.captions) for r in karpathy] == [("0", ("A red tile.",))]
    token = load_records(spec("flickr30k", annotations="flickr30k_results.token", images="images"), "test")
    assert [(r.image_id, r.captions) for r in token] == [
        ("red", ("A red tile on its own.", "Something red.")),
        ("blue", ("A blue tile.",)),
    ]
    assert token[0].image == str(FIXTURES / "images" / "red.png")


def test_vqav2_questions_joined_with_annotations():
    records = load_records(
        spec("vqav2", questions="vqav2_questions.json", annotations="vqav2_annotations.json", images="coco"),
        "val",
    )
    assert [r.question_id for r in records] == ["42000", "42001", "7000"]
    first = records[0]
    assert first.question == "What colour is the square?"
    assert len(first.answers) == 10 and first.answers.count("red") == 8
    assert first.image == str(FIXTURES / "coco" / "COCO_val2014_000000000042.jpg")
    assert records[2].answers == ()  # a question without annotation (test-dev style)
    only_questions = load_records(spec("vqav2", questions="vqav2_questions.json", subtype="test2015"), "test")
    assert only_questions[0].image.endswith("COCO_test2015_000000000042.jpg")


def test_jsonl_records_and_splits():
    jsonl = spec("jsonl", path="records.jsonl", images=".")
    test = load_records(jsonl, "test")
    # the test line, and the line without a split (it belongs to every split)
    assert [r.captions for r in test] == [("a blue tile", "blue"), ()]
    assert test[0].image_id == "blue"
    assert test[1].question == "what colour is it?" and test[1].answers == ("red", "red", "crimson")
    assert test[1].question_id == "5"
    val = load_records(jsonl, "val")
    assert [r.answers for r in val] == [("red", "red", "crimson"), ("yes",)]
    assert [r.image_id for r in load_records(jsonl, "train")] == ["r1", "red"]


def test_spec_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset kind"):
        DatasetSpec.parse("imagenet:path=x")
    with pytest.raises(ValueError, match="key=value"):
        DatasetSpec.parse("coco:annotations")
    with pytest.raises(ValueError, match="needs annotations"):
        load_records("coco:images=.", "test")
    with pytest.raises(FileNotFoundError):
        load_records(f"coco:annotations={tmp_path / 'missing.json'}", "test")
    with pytest.raises(ValueError, match="split"):
        load_records("shapes", "dev")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png"}\nnot json\n')
    with pytest.raises(ValueError, match="Line 2"):
        load_records(f"jsonl:path={bad}", "test")


def test_shapes_records():
    records = load_records("shapes:seed=3,size=4", "test")
    captions = [r for r in records if r.captions]
    questions = [r for r in records if r.question]
    assert len(captions) == 4
    assert len(questions) == sum(len(synthetic.make_scene(3, "test", i).qa) for i in range(4))
    assert all(len(q.answers) == 10 and len(set(q.answers)) == 1 for q in questions)
    assert {q.image_id for q in questions} == {c.image_id for c in captions}
    assert captions[0].load_image().size == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)
    only_vqa = load_records("shapes:seed=3,size=4,task=vqa", "test")
    assert all(r.question for r in only_vqa)


# ----------------------------------------------------------------------------- synthetic data


def test_generator_is_deterministic_by_seed():
    first = synthetic.generate_split(7, "train", 12)
    again = synthetic.generate_split(7, "train", 12)
    other = synthetic.generate_split(8, "train", 12)
    assert [s.captions for s in first] == [s.captions for s in again]
    assert [s.qa for s in first] == [s.qa for s in again]
    assert all(
        np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
        for a, b in zip(first, again, strict=False)
    )
    assert [s.caption for s in first] != [s.caption for s in other]
    # the splits draw from separate streams
    test = synthetic.generate_split(7, "test", 12)
    assert not {s.image_id for s in first} & {s.image_id for s in test}
    assert not any(
        np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
        for a, b in zip(first, test, strict=False)
    )


def test_scenes_are_answerable_from_the_pixels():
    for index in range(40):
        scene = synthetic.make_scene(0, "val", index)
        pixels = np.asarray(scene.render()).astype(int)
        colours = [o.colour for o in scene.objects]
        shapes = [o.shape for o in scene.objects]
        assert 1 <= len(scene.objects) <= 3
        assert len(set(colours)) == len(colours) and len(set(shapes)) == len(shapes)
        assert [o.position for o in scene.objects] == sorted(
            (o.position for o in scene.objects), key=synthetic.POSITIONS.index
        )
        for obj in scene.objects:
            x, y = obj.centre
            # the shape's colour is drawn at its centre, exactly (no noise on shapes)
            assert tuple(pixels[y, x]) == synthetic.COLOURS[obj.colour]
            assert obj.diameter in range(*{"small": (13, 15), "large": (19, 22)}[obj.size])
        for qa in scene.qa:
            if qa.kind == "colour":
                assert qa.answer in colours
            elif qa.kind == "count":
                assert qa.answer == synthetic.NUMBER_WORDS[len(scene.objects)]
        for obj in scene.objects:
            assert metrics_named(scene.caption, obj)


def metrics_named(caption: str, obj) -> bool:
    return f"{obj.size} {obj.colour} {obj.shape} {synthetic.POSITION_PHRASES[obj.position]}" in caption


def test_captions_never_repeat_a_word_trigram():
    """The app decodes with no_repeat_ngram_size=3: a caption with a repeated trigram could not be said."""
    for index in range(200):
        words = synthetic.make_scene(1, "train", index).caption.replace(",", " ,").split()
        trigrams = list(zip(words, words[1:], words[2:], strict=False))
        assert len(trigrams) == len(set(trigrams)), words


def test_unique_captions_in_evaluation_splits():
    scenes = synthetic.generate_split(0, "test", 150, unique_captions=True)
    assert len({s.caption for s in scenes}) == 150


def test_patch_labels_and_hard_negatives():
    scene = synthetic.make_scene(0, "train", 5, count=1)
    labels = patch_attributes(scene, grid=8)
    assert labels.shape == (64, 4)  # colour, shape, size, object number
    obj = scene.objects[0]
    x, y = obj.centre
    centre_patch = (y // 8) * 8 + x // 8
    assert labels[centre_patch].tolist() != [0, 0, 0]
    assert (labels == 0).all(axis=1).sum() > 40  # most patches are background
    rng = np.random.default_rng(0)
    for index in range(30):
        scene = synthetic.make_scene(2, "train", index)
        negative = perturb(scene, rng)
        assert negative != scene.caption
        assert negative not in scene.captions


# ----------------------------------------------------------------------------- randomised and paint


def test_shapes_records_by_renderer():
    """`renderer=` picks the style; classic (the default) is the original split, unchanged."""
    classic = load_records("shapes:seed=3,size=3,task=captions", "test")
    assert classic == load_records("shapes:seed=3,size=3,task=captions,renderer=classic", "test")
    assert [r.image_id for r in classic] == [f"shapes-3-test-{i:06d}" for i in range(3)]
    for style in ("random", "paint"):
        records = load_records(f"shapes:seed=3,size=3,task=captions,renderer={style}", "test")
        assert all(r.image_id.startswith(f"shapes-{style}-3-test-") for r in records)
        assert {r.caption for r in records}.isdisjoint({r.caption for r in classic}) or len(records) == 3
    with pytest.raises(ValueError, match="renderer must be one of"):
        load_records("shapes:renderer=crayon", "test")


def test_continuous_scenes_keep_every_answer_true():
    """Sizes and places are continuous, but every answer follows from the geometry with margins:
    each centre lies inside its third of the width by POSITION_MARGIN, diameters fall in the
    small / large ranges (which leave a gap), every shape lies inside the image."""
    third = synthetic.IMAGE_SIZE / 3
    for style in ("random", "paint"):
        for index in range(150):
            scene = synthetic.make_scene(4, "train", index, style=style)
            assert scene.style == style
            for obj in scene.objects:
                slot = synthetic.POSITIONS.index(obj.position)
                x = obj.centre[0]
                assert (
                    third * slot + synthetic.POSITION_MARGIN
                    <= x
                    <= third * (slot + 1) - synthetic.POSITION_MARGIN
                )
                low, high = synthetic.CONTINUOUS_DIAMETERS[obj.size]
                high = synthetic.LARGE_MAX[len(scene.objects)] if obj.size == "large" else high
                assert low <= obj.diameter <= high
                points = np.array(synthetic.outline_points(obj, 1.0))
                assert points.min() >= 0 and points.max() <= synthetic.IMAGE_SIZE
                if obj.shape == "square":
                    assert abs(obj.angle) <= 20  # beyond, it would read as a diamond
            assert synthetic.CONTINUOUS_DIAMETERS["small"][1] < synthetic.CONTINUOUS_DIAMETERS["large"][0]


def test_randomised_renderer_varies_what_names_do_not_fix():
    scenes = [synthetic.make_scene(0, "train", i, style="random") for i in range(60)]
    images = [s.render() for s in scenes]
    sizes = {im.size[0] for im in images}
    assert min(sizes) >= 64 and max(sizes) <= 512 and len(sizes) > 20
    assert all(im.size[0] == im.size[1] for im in images)
    # a pure function of the scene
    assert np.array_equal(np.asarray(scenes[3].render()), np.asarray(images[3]))
    # fills stay inside their name's ranges, which never overlap
    rng = np.random.default_rng(0)
    for name, ((h0, h1), _, _) in randomised.COLOUR_RANGES.items():
        for _ in range(50):
            r, g, b = randomised.fill_colour(rng, name)
            hue = colorsys_hue(r, g, b)
            assert h0 - 1 <= hue <= h1 + 1 or h0 - 1 <= hue - 360 <= h1 + 1, (name, (r, g, b), hue)
    spans = sorted((h0, h1) for (h0, h1), _, _ in randomised.COLOUR_RANGES.values())
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))


def colorsys_hue(r: int, g: int, b: int) -> float:
    import colorsys

    return colorsys.rgb_to_hls(r / 255, g / 255, b / 255)[0] * 360


def test_patch_labels_of_random_scenes_match_the_drawing():
    """The object map (the patch labels' source) is the scene's geometry at 64 px: each object's
    pixels span the box of its outline."""
    for index in range(12):
        scene = synthetic.make_scene(0, "train", index, count=1, style="random")
        ys, xs = np.nonzero(synthetic.object_map(scene) == 1)
        assert len(xs) > 20
        points = np.array(synthetic.outline_points(scene.objects[0], 1.0))
        assert np.allclose([xs.min(), ys.min()], points.min(axis=0), atol=1.5)
        assert np.allclose([xs.max() + 1, ys.max() + 1], points.max(axis=0), atol=1.5)
        assert patch_attributes(scene, grid=8).any(axis=1).sum() >= 1  # a small triangle: one patch


def test_paint_renderer_is_independent_and_deterministic():
    """The evaluation renderer draws with numpy distance fields, not PIL's ImageDraw (nor the
    training renderer's code), and its split shares no scene with the training streams."""
    source = Path(paint.__file__).read_text()
    assert "ImageDraw" not in source and "randomised" not in source and "outline_points" not in source
    scene = synthetic.make_scene(0, "test", 2, style="paint")
    first, again = np.asarray(scene.render()), np.asarray(scene.render())
    assert np.array_equal(first, again) and first.shape[0] in paint.SIZES
    held_out = {s.caption + str(s.objects) for s in synthetic.generate_split(0, "test", 50, style="paint")}
    random = {s.caption + str(s.objects) for s in synthetic.generate_split(0, "test", 50, style="random")}
    assert not held_out & random
    # the fill at each shape's centre is one of the palette's colours for its name
    plain = [s for s in synthetic.generate_split(0, "test", 40, style="paint")]
    for scene in plain:
        pixels = np.asarray(scene.render()).astype(int)
        scale = pixels.shape[0] / synthetic.IMAGE_SIZE
        for obj in scene.objects:
            if obj.shape == "cross" or obj.shape == "triangle":
                continue  # a thin arm or a turned triangle may leave the centre
            x, y = (int(c * scale) for c in obj.centre)
            nearest = min(
                (name for name in paint.PALETTE),
                key=lambda n: min(np.abs(pixels[y, x] - np.array(c)).sum() for c in paint.PALETTE[n]),
            )
            assert nearest == obj.colour


def test_mixed_training_split_and_phrase_pairs():
    scenes = synthetic.generate_split(0, "train", 200, style="random", classic_share=0.2)
    classic = sum(s.style == "classic" for s in scenes)
    assert 20 < classic < 60 and len({s.image_id for s in scenes}) == 200
    rng = np.random.default_rng(0)
    for scene in scenes[:60]:
        true, false = phrase_pair(scene, rng)
        pairs = {(o.colour, o.shape) for o in scene.objects}
        assert true != false
        assert any(f"{c} {s}" in true or f"{s} is {c}" in true for c, s in pairs)
        assert not any(f"{c} {s}" in false or f"{s} is {c}" in false for c, s in pairs)


# ----------------------------------------------------------------------------- download


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one payload, honouring `Range: bytes=N-` (as real file servers do)."""

    payload = b""
    ranges: ClassVar[list] = []

    def do_GET(self):
        start = 0
        header = self.headers.get("Range")
        type(self).ranges.append(header)
        if header:
            start = int(header.removeprefix("bytes=").rstrip("-"))
            if start >= len(self.payload):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
        else:
            self.send_response(200)
        body = self.payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.payload = bytes(range(256)) * 40
    RangeHandler.ranges = []
    httpd = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/file.bin"
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_the_checksum(server, tmp_path):
    payload = RangeHandler.payload
    digest = hashlib.sha256(payload).hexdigest()
    dest = download(server, tmp_path / "file.bin", sha256=digest, progress=False)
    assert dest.read_bytes() == payload
    assert not (tmp_path / "file.bin.part").exists()
    # a second call finds the verified file and makes no request
    download(server, dest, sha256=digest, progress=False)
    assert RangeHandler.ranges == [None]
    with pytest.raises(ChecksumError):
        download(server, tmp_path / "other.bin", sha256="0" * 64, progress=False)
    assert not (tmp_path / "other.bin").exists() and not (tmp_path / "other.bin.part").exists()


def test_download_resumes_a_partial_file(server, tmp_path):
    payload = RangeHandler.payload
    part = tmp_path / "file.bin.part"
    part.write_bytes(payload[:1000])
    dest = download(server, tmp_path / "file.bin", sha256=hashlib.sha256(payload).hexdigest(), progress=False)
    assert RangeHandler.ranges == ["bytes=1000-"]
    assert dest.read_bytes() == payload


def test_download_from_a_file_url_resumes_too(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"0123456789" * 100)
    part = tmp_path / "out" / "copy.bin.part"
    part.parent.mkdir()
    part.write_bytes(b"0123456789" * 30)
    dest = download(
        source.as_uri(),
        tmp_path / "out" / "copy.bin",
        sha256=hashlib.sha256(source.read_bytes()).hexdigest(),
        progress=False,
    )
    assert dest.read_bytes() == source.read_bytes()
    with pytest.raises(ValueError, match="scheme"):
        download("ftp://127.0.0.1/x", tmp_path / "x", progress=False)
