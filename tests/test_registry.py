"""The registry is data: names, user files, local folders and hub ids resolve without code changes."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from blip2_app.errors import ModelLoadError
from blip2_app.loading import checkpoint_location
from blip2_app.registry import REPO_ROOT, Example, Registry
from blip2_app.training import examples as examples_module


def test_builtin_names_and_families():
    registry = Registry.load()
    expected = {
        "blip2-opt-2.7b": "blip2-opt",
        "blip2-opt-6.7b": "blip2-opt",
        "blip2-opt-2.7b-coco": "blip2-opt",
        "blip2-opt-6.7b-coco": "blip2-opt",
        "blip2-flan-t5-xl": "blip2-t5",
        "blip2-flan-t5-xxl": "blip2-t5",
        "blip2-flan-t5-xl-coco": "blip2-t5",
        "instructblip-flan-t5-xl": "instructblip-t5",
        "instructblip-flan-t5-xxl": "instructblip-t5",
        "instructblip-vicuna-7b": "instructblip-vicuna",
        "instructblip-vicuna-13b": "instructblip-vicuna",
        "blip2-itm-vit-g": "blip2-itm",
        "blip2-itm-vit-g-coco": "blip2-itm",
    }
    for name, family in expected.items():
        assert registry.resolve(name).family.name == family
    entry = registry.resolve("blip2-opt-2.7b")
    assert entry.checkpoint == "Salesforce/blip2-opt-2.7b"
    assert entry.retrieval == "blip2-itm-vit-g"
    assert (entry.decoding.num_beams, entry.decoding.max_new_tokens, entry.decoding.min_new_tokens) == (
        5,
        30,
        1,
    )
    assert (entry.decoding.top_p, entry.decoding.temperature) == (0.9, 1.0)
    assert registry.resolve("Salesforce/blip2-flan-t5-xl").name == "blip2-flan-t5-xl"


def test_user_file_adds_a_model_and_overrides_templates(tmp_path):
    user = tmp_path / "models.json"
    user.write_text(
        json.dumps(
            {
                "models": {
                    "my-captioner": {
                        "checkpoint": "tiny:blip2-opt",
                        "family": "blip2-opt",
                        "precision": "fp32",
                        "templates": {"vqa_short": "Q: {question} A:"},
                        "decoding": {"num_beams": 3},
                    }
                }
            }
        )
    )
    entry = Registry.load([user]).resolve("my-captioner")
    assert entry.templates.vqa_short == "Q: {question} A:"
    assert entry.decoding.num_beams == 3
    assert "my-captioner" not in Registry.load().models


def test_local_folder_family_is_read_from_config(load_tiny, tmp_path):
    registry = Registry.load()
    for name, family in [("tiny-random-t5", "blip2-t5"), ("tiny-random-itm", "blip2-itm")]:
        folder = checkpoint_location(registry.resolve(name))
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        assert registry.resolve(str(copy)).family.name == family


def test_clear_errors(tmp_path):
    registry = Registry.load()
    with pytest.raises(ModelLoadError, match="Unknown model 'blip2-opt-99b'.*Known names: blip2-flan-t5-xl"):
        registry.resolve("blip2-opt-99b")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        registry.resolve(str(tmp_path))
    with pytest.raises(ModelLoadError, match="--model tiny-random"):
        registry.resolve("nobody/not-a-model")  # HF_HUB_OFFLINE=1 in tests: unreachable
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(ModelLoadError, match="must be a JSON object"):
        Registry.load([bad])
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="not a BLIP-2 model we know"):
        registry.resolve(str(tmp_path))


# --------------------------------------------------------------------------- example pictures
def test_the_demo_model_names_its_own_example_pictures():
    registry = Registry.load()
    examples = registry.resolve("shapes-demo").examples
    assert 4 <= len(examples) <= 6
    for example in examples:
        path = Path(example.image)
        # relative in registry.json, resolved against the repository root, and there
        assert path.is_absolute() and path.is_file() and path.parent == REPO_ROOT / "assets" / "shapes-paint"
        assert example.question.endswith("?")
    assert any(e.question == "what colour is the triangle?" for e in examples)
    # the others keep the photos
    assert registry.resolve("tiny-random").examples == () == registry.resolve("blip2-opt-2.7b").examples


def test_the_demo_pictures_are_the_paint_renderers_and_can_be_made_again():
    """registry.json lists what blip2_app.training.examples makes, and the PNGs are its renders."""
    raw = json.loads((REPO_ROOT / "blip2_app" / "registry.json").read_text())["models"]["shapes-demo"]
    assert raw["examples"] == examples_module.registry_examples()
    assert examples_module.main(["--check"]) == 0
    for picture in examples_module.pictures():
        assert picture.scene.style == "paint"  # the independent renderer, never used for training
        assert all(obj.colour in picture.name for obj in picture.scene.objects)


def test_a_users_models_file_names_examples_relative_to_itself(tmp_path):
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "pics" / "red.png")
    models = tmp_path / "models.json"
    spec = {
        "checkpoint": "tiny:blip2-opt",
        "family": "blip2-opt",
        "examples": ["pics/red.png", {"image": "pics/red.png", "question": "what colour is it?"}],
    }
    models.write_text(json.dumps({"models": {"mine": spec}}))
    examples = Registry.load([models]).resolve("mine").examples
    assert examples == (
        Example(str(tmp_path / "pics" / "red.png")),
        Example(str(tmp_path / "pics" / "red.png"), "what colour is it?"),
    )


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        (["pics/missing.png"], "model 'mine': example image .*missing.png does not exist"),
        ("pics/red.png", "model 'mine': examples must be a list"),
        ([{"picture": "pics/red.png"}], "each example is an image path or"),
        ([{"image": "pics/red.png", "question": 3}], "an example's question must be text"),
        ([""], "an example's image must be a file path"),
    ],
)
def test_bad_examples_are_refused_on_load(tmp_path, examples, message):
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "pics" / "red.png")
    models = tmp_path / "models.json"
    models.write_text(
        json.dumps(
            {
                "models": {
                    "mine": {"checkpoint": "tiny:blip2-opt", "family": "blip2-opt", "examples": examples}
                }
            }
        )
    )
    with pytest.raises(ModelLoadError, match=message):
        Registry.load([models])
