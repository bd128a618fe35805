"""The bundled shapes demo model as the app uses it: registry entries, loading by name, what it
answers, the opt-in offline fallback with its banner, and `python -m blip2_app evaluate`.

Skipped only when the bundled checkpoint is missing (train it with
`python -m blip2_app.training.train --config shapes-demo`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from blip2_app.config import Settings
from blip2_app.errors import CheckpointUnreachableError, ModelLoadError
from blip2_app.prompts import ChatTurn
from blip2_app.registry import REPO_ROOT, Registry
from blip2_app.startup import load_engine
from blip2_app.training import synthetic
from blip2_app.training.shapes_data import phrase_pair
from blip2_app.ui.layout import _header

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "assets" / "models" / "blip2-shapes"
# Never on the hub nor in any cache; with HF_HUB_OFFLINE=1 (conftest) it fails in milliseconds.
UNREACHABLE = "someone/blip2-never-downloaded"

pytestmark = pytest.mark.skipif(
    not (BUNDLED / "config.json").exists(), reason=f"{BUNDLED} is missing: train it first"
)


@pytest.fixture(scope="module")
def demo_engine():
    return load_engine(Settings(model="shapes-demo"))


def test_registry_entries_point_at_the_bundled_folders():
    registry = Registry.load()
    demo, itm = registry.resolve("shapes-demo"), registry.resolve("shapes-demo-itm")
    # relative in registry.json, resolved against the repository root (any working directory)
    raw = json.loads((ROOT / "blip2_app" / "registry.json").read_text())["models"]
    assert raw["shapes-demo"]["checkpoint"] == "assets/models/blip2-shapes"
    assert Path(demo.checkpoint) == REPO_ROOT / "assets/models/blip2-shapes" == BUNDLED
    assert Path(itm.checkpoint) == BUNDLED.with_name("blip2-shapes-itm")
    assert (demo.family.name, demo.image_size, demo.retrieval) == ("instructblip-opt", 64, "shapes-demo-itm")
    assert demo.precision == {"cpu": "fp32", "cuda": "fp32"} == itm.precision
    assert itm.family.name == "blip2-itm" and itm.retrieval is None
    assert demo.notice and "--model blip2-opt-2.7b" in demo.notice


def test_a_users_models_file_resolves_relative_folders_against_itself(tmp_path):
    models = tmp_path / "models.json"
    spec = {"checkpoint": "./mine/blip2", "family": "blip2-opt"}
    models.write_text(json.dumps({"models": {"mine": spec}}))
    assert Registry.load([models]).resolve("mine").checkpoint == str(tmp_path / "mine" / "blip2")


def test_loads_by_name_through_the_apps_loader(demo_engine):
    assert demo_engine.text.entry.name == "shapes-demo"
    assert demo_engine.matcher.entry.name == "shapes-demo-itm"
    assert demo_engine.text.loaded.precisions.as_dict() == {
        "vision": "fp32",
        "qformer": "fp32",
        "llm": "fp32",
    }
    assert any("Vision encoder shared" in note for note in demo_engine.matcher.notes)


def test_names_the_colour_of_freshly_drawn_shapes(demo_engine):
    """40 single-shape images from a seed training never used: only a colour to see. >= 90%
    (36 of 40) leaves room for a retrained model's rare slip yet fails when it stops seeing: chance
    (1/6) or a fixed colour scores about 17%. 90% is also the issue's own VQA target."""
    scenes = [synthetic.make_scene(20262, "test", i, count=1) for i in range(40)]
    answers = demo_engine.answer_batch([s.render() for s in scenes], ["what colour is the shape?"] * 40)
    pairs = [(a.text, s.objects[0].colour) for a, s in zip(answers, scenes, strict=True)]
    assert sum(got == want for got, want in pairs) >= 36, pairs


def _three_shape_scenes(seed: int, count: int, style: str = "classic"):
    return [synthetic.make_scene(seed, "test", i, count=3, style=style) for i in range(count)]


def test_answers_about_the_object_the_question_names(demo_engine):
    """Fresh images of three shapes, where an answer about *a* shape is right a third of the time
    (the second bundled model's colour answers were right half the time over all images). Its
    Q-Former now reads the question (docs/decisions/0004-question-aware-qformer-for-the-demo-model.md).
    Measured on these 60 objects: colour asked by shape 60 of 60, place asked by colour and shape 60 of 60
    (an earlier model: 46 of 60 places, its weakest kind)."""
    images, colour_questions, place_questions, colours, places = [], [], [], [], []
    for scene in _three_shape_scenes(20263, 20):
        image = scene.render()
        for obj in scene.objects:
            images.append(image)
            colour_questions.append(f"what colour is the {obj.shape}?")
            place_questions.append(f"where is the {obj.colour} {obj.shape}?")
            colours.append(obj.colour)
            places.append(obj.position)
    for questions, truth, least in ((colour_questions, colours, 57), (place_questions, places, 40)):
        got = [a.text for a in demo_engine.answer_batch(images, questions)]
        wrong = [(q, g, t) for q, g, t in zip(questions, got, truth, strict=True) if g != t]
        assert len(questions) - len(wrong) >= least, wrong


# The demo model is drawn for with both renderers (issue 19): "random", the training renderer's
# own randomised drawings, and "paint", the independent evaluation renderer training never sees
# (shapes as a person draws them in a paint program: flat fills, no outline, any size). A bundled
# model trained before that recipe (its training.json says data style "classic") is skipped here:
# it names shapes in such drawings about half the time, the bug issue 19 reports.
RENDERERS = ("random", "paint")
TRAINED_ON_RANDOMISED_DATA = (BUNDLED / "training.json").exists() and json.loads(
    (BUNDLED / "training.json").read_text()
)["config"]["data"].get("style") == "random"
randomised_model = pytest.mark.skipif(
    not TRAINED_ON_RANDOMISED_DATA, reason="the bundled model predates the randomised recipe (issue 19)"
)


@randomised_model
@pytest.mark.parametrize("renderer", RENDERERS)
def test_names_the_colour_and_shape_of_freshly_drawn_shapes(demo_engine, renderer):
    """40 single-shape images from a seed training never used. >= 90% (36 of 40) leaves room for
    a retrained model's rare slip yet fails when it stops seeing: chance (1/6 for colours, 1/4 for
    shapes) or a fixed answer scores about 17-25%. The shape question is the one the first demo
    model failed on drawings without an outline (about half right)."""
    scenes = [synthetic.make_scene(20262, "test", i, count=1, style=renderer) for i in range(40)]
    images = [s.render() for s in scenes]
    for question, truth in (("what colour is the shape?", "colour"), ("what shape is it?", "shape")):
        answers = demo_engine.answer_batch(images, [question] * 40)
        pairs = [(a.text, getattr(s.objects[0], truth)) for a, s in zip(answers, scenes, strict=True)]
        assert sum(got == want for got, want in pairs) >= 36, (question, pairs)


@randomised_model
@pytest.mark.parametrize("renderer", RENDERERS)
def test_answers_about_the_named_object_in_drawings(demo_engine, renderer):
    """Fresh images of three shapes, where an answer about *a* shape is right a third of the time
    (the second bundled model's colour answers were right half the time over all images). Its
    Q-Former reads the question (README, "Why the Q-Former reads the question"). 60 objects per
    renderer: colour asked by shape, shape asked by colour, place asked by colour and shape."""
    images, questions = [], {"colour": [], "shape": [], "place": []}
    truth = {"colour": [], "shape": [], "place": []}
    for scene in _three_shape_scenes(20263, 20, renderer):
        image = scene.render()
        for obj in scene.objects:
            images.append(image)
            questions["colour"].append(f"what colour is the {obj.shape}?")
            questions["shape"].append(f"what shape is the {obj.colour} one?")
            questions["place"].append(f"where is the {obj.colour} {obj.shape}?")
            truth["colour"].append(obj.colour)
            truth["shape"].append(obj.shape)
            truth["place"].append(obj.position)
    for kind, least in LEAST_RIGHT_OF_60[renderer].items():
        got = [a.text for a in demo_engine.answer_batch(images, questions[kind])]
        wrong = [(q, g, t) for q, g, t in zip(questions[kind], got, truth[kind], strict=True) if g != t]
        assert 60 - len(wrong) >= least, (kind, wrong)


# Right answers of 60 needed, a few under what the shipped model scored (see the results file).
LEAST_RIGHT_OF_60 = {
    "random": {"colour": 54, "shape": 54, "place": 40},
    "paint": {"colour": 54, "shape": 54, "place": 40},
}


@randomised_model
@pytest.mark.parametrize("renderer", RENDERERS)
def test_few_shot_examples_and_instructions_do_not_change_the_answer(demo_engine, renderer):
    """The chat tab's few-shot table and instruction box: two examples about other images (whose
    answers are wrong here) before the question, or an instruction, leave the answer as it was
    for the plain question on at least 36 of 40 images."""
    scenes = [synthetic.make_scene(20265, "test", i, count=2, style=renderer) for i in range(20)]
    exemplars = [
        ChatTurn("what colour is the circle?", "purple"),
        ChatTurn("how many shapes are there?", "three"),
    ]
    right = {"plain": 0, "few-shot": 0, "instruction": 0}
    for scene in scenes:
        image = scene.render()
        for obj in scene.objects:
            question = f"what shape is the {obj.colour} one?"
            right["plain"] += demo_engine.chat(image, question).text == obj.shape
            right["few-shot"] += demo_engine.chat(image, question, exemplars=exemplars).text == obj.shape
            right["instruction"] += (
                demo_engine.chat(image, question, instruction="Answer with one word.").text == obj.shape
            )
    assert min(right.values()) >= 36, right


@randomised_model
def test_an_answer_may_repeat_an_earlier_answer_or_an_examples(demo_engine):
    """With the app's default decoding (no repeated 3-grams): "is there a circle?" yes, then "is
    there a square?" must still be able to say yes, and an example answered "circle" must not
    forbid the answer circle. Before the ban counted the new tokens only: 0 of 20 follow-ups."""
    scenes = [synthetic.make_scene(20266, "test", i, count=2, style="paint") for i in range(20)]
    followups = examples = 0
    for scene in scenes:
        image, (first, second) = scene.render(), scene.objects[:2]
        history = [ChatTurn(f"is there a {first.shape}?", "yes")]
        followups += demo_engine.chat(image, f"is there a {second.shape}?", history=history).text == "yes"
        exemplars = [ChatTurn(f"what shape is the {first.colour} one?", first.shape)]
        answer = demo_engine.chat(image, f"what shape is the {first.colour} one?", exemplars=exemplars)
        examples += answer.text == first.shape
    assert followups >= 17 and examples >= 17, (followups, examples)


@randomised_model
@pytest.mark.parametrize("renderer", ["random", "paint"])
def test_itm_tells_the_named_object_from_its_false_twin(demo_engine, renderer):
    """The Explain tab's need: on one image, ITM scores "the red circle" above "the blue circle"
    when the circle is red (the false phrase changes the colour, to another object's colour or
    an absent one, or the shape). At least 36 of 40 pairs (the bundled twin: 40 on each renderer)."""
    rng = np.random.default_rng(0)
    scenes = [synthetic.make_scene(20266, "test", i, style=renderer) for i in range(40)]
    pairs = [phrase_pair(scene, rng) for scene in scenes]
    images = [scene.render() for scene in scenes]
    true = demo_engine.itm(images, [t for t, _ in pairs])
    false = demo_engine.itm(images, [f for _, f in pairs])
    assert int((true > false).sum()) >= 36, [
        (p, float(a), float(b)) for p, a, b in zip(pairs, true, false, strict=True)
    ]


def test_chat_follow_up_is_about_the_new_question(demo_engine):
    """The chat tab's second turn: the prompt holds the first question and its answer, then the
    new question (the Q-Former reads all of it). The follow-up asks the colour of another object:
    answering the first question again gives a place, mixing up the objects a wrong colour (the
    recipe trained without chat turns answered 5 of 60 random follow-ups; this model 57 of those
    60 and 11 of these 12)."""
    right, scenes = 0, _three_shape_scenes(20264, 12)
    for scene in scenes:
        image, (first, other) = scene.render(), scene.objects[:2]
        question = f"where is the {first.colour} {first.shape}?"
        history = [ChatTurn(question, demo_engine.chat(image, question).text)]
        right += demo_engine.chat(image, f"what colour is the {other.shape}?", history).text == other.colour
    assert right >= 10, right


def test_offline_fallback_is_opt_in_and_shown_on_every_tab(demo_engine):
    with pytest.raises(CheckpointUnreachableError, match="--fallback-model shapes-demo"):
        load_engine(Settings(model=UNREACHABLE))
    with pytest.raises(ModelLoadError, match="Unknown model"):  # other failures never fall back
        load_engine(Settings(model="blip2-opt-99b", fallback_model="shapes-demo"))
    engine = load_engine(Settings(model=UNREACHABLE, fallback_model="shapes-demo"))
    assert engine.text.entry.name == "shapes-demo" and engine.matcher.entry.name == "shapes-demo-itm"
    assert len(engine.notices) == 1 and UNREACHABLE in engine.notices[0]
    header = _header(engine)
    assert 'id="model-notice"' in header and UNREACHABLE in header and "--model blip2-opt-2.7b" in header
    # loaded by name (no fallback): the demo banner alone
    assert "--model blip2-opt-2.7b" in _header(demo_engine) and UNREACHABLE not in _header(demo_engine)

    from blip2_app.ui import build_demo

    demo = build_demo(Settings(model="shapes-demo"), engine)
    banners = [b for b in demo.blocks.values() if isinstance(b, gr.HTML) and "model-notice" in str(b.value)]
    assert len(banners) == 1
    # above the tabs, not inside one: every tab shows it
    parent = banners[0].parent
    while parent is not None:
        assert not isinstance(parent, gr.Tab)
        parent = parent.parent
    assert any(isinstance(b, gr.Tab) for b in demo.blocks.values())


def test_settings_take_the_fallback_from_flag_or_environment():
    assert Settings.from_sources([], env={}).fallback_model is None
    assert Settings.from_sources([], env={"BLIP2_FALLBACK_MODEL": "shapes-demo"}).fallback_model == (
        "shapes-demo"
    )
    assert Settings.from_sources(["--fallback-model", "shapes-demo"], env={}).fallback_model == "shapes-demo"


def test_evaluate_command_runs_on_a_tiny_limit(tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "blip2_app",
            "evaluate",
            "--model",
            "shapes-demo",
            "--dataset",
            "shapes:size=4",
            "--limit",
            "4",
            "--threads",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # the registry's relative folders do not depend on the working directory
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model"] == "shapes-demo" and report["retrieval_model"] == "shapes-demo-itm"
    assert report["captioning"]["images"] == 4 and report["vqa"]["questions"] == 4
    assert set(json.loads(result.stdout)) >= {"vqa_accuracy", "caption_cider", "text_to_image_r1"}
    bad = subprocess.run(
        [sys.executable, "-m", "blip2_app", "evaluate", "--model", "no-such-model", "--limit", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "error: Unknown model 'no-such-model'" in bad.stderr
    assert "Traceback" not in bad.stderr
