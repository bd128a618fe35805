"""The command line shares the engine; failures are one line on stderr and a non-zero exit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

PHOTOS = Path(__file__).parent / "data" / "photos"
HOSTILE = Path(__file__).parent / "data" / "hostile"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blip2_app", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_caption_json_matches_the_engine(load_tiny):
    image = str(PHOTOS / "skimage_coffee.png")
    result = run(
        "caption", "--model", "tiny-random", "--decoding", "greedy", "--max-new-tokens", "6", "--json", image
    )
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip())
    from blip2_app.generation import GenerationSettings

    engine = load_tiny("tiny-random", retrieval_model="none")
    expected = engine.caption([image], generation=GenerationSettings(decoding="greedy", max_new_tokens=6))
    assert line["image"] == image
    assert line["captions"][0]["generated_text"] == expected[0][0].text


def test_custom_prompt_and_several_captions():
    image = str(PHOTOS / "skimage_camera.png")
    result = run("caption", "--model", "tiny-random", "--prompt", "a photo of", "--num-captions", "3", image)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(image + "\t") for line in lines)


def test_ask(load_tiny):
    image = str(PHOTOS / "skimage_rocket.jpg")
    result = run("ask", "--model", "tiny-random", "--json", image, "what is this?")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["prompt"] == "Question: what is this? Short answer:"
    assert (
        answer["generated_text"]
        == load_tiny("tiny-random", retrieval_model="none").answer(image, "what is this?").text
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("caption", "--model", "tiny-random", str(HOSTILE / "pillow_truncated_jpeg.jpg")), "truncated JPEG"),
        (
            ("caption", "--model", "no-such-model", str(PHOTOS / "skimage_camera.png")),
            "Unknown model 'no-such-model'",
        ),
        (
            ("caption", "--model", "tiny-random", "--num-beams", "1000", str(PHOTOS / "skimage_camera.png")),
            "num_beams",
        ),
        (("ask", "--model", "tiny-random", str(PHOTOS / "skimage_camera.png"), "   "), "question is empty"),
        (
            ("caption", "--model", "nobody/offline-model", str(PHOTOS / "skimage_camera.png")),
            "--model tiny-random",
        ),
    ],
)
def test_failures_are_one_line(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]


def test_index_and_search_round_trip(tmp_path, load_tiny):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in PHOTOS.glob("*.*"):
        if photo.suffix != ".tsv":
            (folder / photo.name).write_bytes(photo.read_bytes())
    (folder / "broken.jpg").write_bytes((HOSTILE / "pillow_truncated_jpeg.jpg").read_bytes())
    out = tmp_path / "index"
    result = run("index", str(folder), "--out", str(out), "--model", "tiny-random")
    assert result.returncode == 0, result.stderr
    assert "Indexed 3 images" in result.stdout
    assert "broken.jpg" in result.stderr and "truncated JPEG" in result.stderr
    result = run("search", str(out), "a cup of coffee", "--top-k", "2", "--model", "tiny-random", "--json")
    assert result.returncode == 0, result.stderr
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2]
    engine = load_tiny("tiny-random-itm")
    names = sorted(p.name for p in folder.iterdir() if p.name != "broken.jpg")
    scores = engine.itc([str(folder / n) for n in names], ["a cup of coffee"])[:, 0]
    best = [names[i] for i in scores.argsort(descending=True)[:2].tolist()]
    assert [h["name"] for h in hits] == best
    assert abs(hits[0]["cosine"] - float(scores.max())) < 1e-4
    result = run("search", str(tmp_path), "x")
    assert result.returncode == 2 and "error: " in result.stderr
    result = run("search", str(out), "   ", "--model", "tiny-random")
    assert result.returncode == 2 and "The search text is empty" in result.stderr, result.stderr
    result = run("search", str(out), "a cup", "--top-k", "-1", "--model", "tiny-random")
    assert result.returncode == 2 and "1 or more" in result.stderr, result.stderr
    # Another retrieval model: its query embeddings would not compare with this index's.
    result = run("search", str(out), "a cup", "--model", "shapes-demo")
    assert result.returncode == 2, result.stderr
    assert "indexed with tiny-random-itm" in result.stderr and "shapes-demo-itm" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_hub_fails_fast_with_one_paragraph():
    """No HF_HUB_OFFLINE, a hub that refuses connections: seconds, not huggingface_hub's retries."""
    import os
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # discard port: nothing listens, refused at once
    env["HF_HOME"] = str(Path(__file__).parent / "no-such-hf-home")
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "blip2_app",
            "caption",
            "--model",
            "blip2-opt-2.7b",
            str(PHOTOS / "skimage_camera.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert time.monotonic() - started < 60
    assert "Could not load the model 'Salesforce/blip2-opt-2.7b'" in result.stderr
    assert "--model tiny-random" in result.stderr and "Traceback" not in result.stderr


def test_search_can_rerank_with_itm(tmp_path, load_tiny, capsys):
    """In process (cli.main): `search --rerank K --images FOLDER` re-sorts the ITC top K by ITM."""
    from blip2_app import cli

    folder = tmp_path / "photos"
    folder.mkdir()
    names = sorted(p.name for p in PHOTOS.glob("*.*") if p.suffix != ".tsv")
    for name in names:
        (folder / name).write_bytes((PHOTOS / name).read_bytes())
    out, query = tmp_path / "index", "a cup of coffee"
    assert cli.main(["index", str(folder), "--out", str(out), "--model", "tiny-random"]) == 0
    capsys.readouterr()
    search = ["search", str(out), query, "--top-k", "2", "--model", "tiny-random", "--json"]
    assert cli.main([*search, "--rerank", "3", "--images", str(folder)]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    engine = load_tiny("tiny-random-itm")
    itc = engine.itc([str(folder / n) for n in names], [query])[:, 0]
    shortlist = [names[i] for i in itc.argsort(descending=True, stable=True)[:3].tolist()]
    itm = engine.itm([str(folder / n) for n in shortlist], [query] * 3)
    expected = [shortlist[i] for i in itm.argsort(descending=True, stable=True)[:2].tolist()]
    assert [h["name"] for h in hits] == expected
    assert [h["rank"] for h in hits] == [1, 2]
    assert abs(hits[0]["itm_probability"] - float(itm.max())) < 1e-5

    assert cli.main([*search, "--rerank", "3"]) == 2
    assert capsys.readouterr().err.startswith("error: --rerank reads the images again")
    (folder / shortlist[0]).write_bytes((PHOTOS / shortlist[1]).read_bytes())  # changed since indexing
    assert cli.main([*search, "--rerank", "3", "--images", str(folder)]) == 2
    assert "has changed since it was indexed" in capsys.readouterr().err


# --------------------------------------------------------------------------- one-shot precision
def one_shot(images=1, cpu_default="auto", device="cpu", **changes):
    from blip2_app import cli
    from blip2_app.config import Settings

    return cli.one_shot_precision(Settings(**changes), cpu_default, images, device)


def test_a_small_job_at_auto_on_a_cpu_runs_weight_only():
    assert one_shot(images=1) == "int8-weight-only"
    assert one_shot(images=2, cpu_default="dynamic-int8") == "int8-weight-only"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (dict(images=3), "auto"),  # more images: packing once pays (decision 0009)
        (dict(images=0), "auto"),  # a folder job, count unknown
        (dict(device="cuda"), "auto"),
        (dict(cpu_default="fp32"), "auto"),  # the registry's own choice for this model (tiny-random)
        (dict(cpu_default="bf16"), "auto"),
        (dict(precision="dynamic-int8"), "dynamic-int8"),  # the user's choice stays
        (dict(precision="fp32"), "fp32"),
        (dict(llm_precision="bf16"), "auto"),  # a component chosen by hand: the preset stays auto
        (dict(weight_cache="off"), "auto"),  # without the cache every run would quantize again
        (dict(backend="vllm", vllm_url="http://127.0.0.1:1/v1"), "auto"),
    ],
)
def test_other_jobs_keep_their_precision(case, expected):
    assert one_shot(**case) == expected


def test_the_cli_asks_the_registry_for_the_models_cpu_default(tmp_path):
    """A checkpoint folder's CPU default is auto (dynamic-int8): a one-photo job goes weight-only;
    tiny-random's registry default is fp32: it stays."""
    from blip2_app import cli
    from blip2_app.config import Settings
    from blip2_app.registry import Registry
    from blip2_app.testing import ensure_tiny_checkpoint

    registry = Registry.load()
    folder = str(ensure_tiny_checkpoint("blip2-opt"))

    def one_shot_of(model, images):
        return cli._one_shot(Settings(model=model, device="cpu"), registry, images).precision

    assert one_shot_of(folder, 1) == "int8-weight-only"
    assert one_shot_of(folder, 5) == "auto"
    assert one_shot_of("tiny-random", 1) == "auto"
    assert one_shot_of(str(tmp_path / "missing"), 1) == "auto"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["caption", "photo.jpg"], "int8-weight-only"),
        (["caption", "a.jpg", "b.jpg", "c.jpg"], "auto"),
        (["caption", "--precision", "dynamic-int8", "photo.jpg"], "dynamic-int8"),
        (["ask", "photo.jpg", "what is it?"], "int8-weight-only"),
    ],
)
def test_caption_and_ask_load_the_engine_at_the_one_shot_precision(monkeypatch, argv, expected):
    """The commands hand load_engine the precision `one_shot_precision` chose (checkpoint folder:
    CPU default auto, so dynamic-int8)."""
    from blip2_app import cli, startup
    from blip2_app.testing import ensure_tiny_checkpoint

    loaded = []

    class Stop(Exception):
        pass

    def capture(settings, registry=None):
        loaded.append(settings)
        raise Stop

    monkeypatch.setattr(startup, "load_engine", capture)
    monkeypatch.setattr(cli, "_image_files", lambda paths: None)
    folder = str(ensure_tiny_checkpoint("blip2-opt"))
    args = cli._parser().parse_args([argv[0], "--model", folder, "--device", "cpu", *argv[1:]])
    with pytest.raises(Stop):
        {"caption": cli._caption, "ask": cli._ask}[argv[0]](args)
    assert loaded[0].precision == expected and loaded[0].retrieval_model == "none"


@pytest.mark.parametrize("amx", [True, False])
def test_a_one_shot_job_reads_the_apps_weight_cache_entry(monkeypatch, amx):
    """The CLI's one-photo precision (int8-weight-only) keeps the vision precision the app's auto
    gives (bf16 with AMX): both are keyed to one cache entry, else each start would write its own
    and drop the other's (weight_cache: one entry per checkpoint)."""
    import torch

    from blip2_app import cli, loading
    from blip2_app.config import Settings
    from blip2_app.precisions import cache_key_precisions
    from blip2_app.registry import Registry
    from blip2_app.startup import resolve_model
    from blip2_app.testing import ensure_tiny_checkpoint

    monkeypatch.setattr(loading, "cpu_has_amx_bf16", lambda: amx)
    registry = Registry.load()
    folder = str(ensure_tiny_checkpoint("blip2-opt"))
    entry = resolve_model(registry, folder, "--model")
    cpu = torch.device("cpu")
    app, _ = loading.resolve_precisions("auto", entry, cpu)
    one = cli._one_shot(Settings(model=folder, device="cpu"), registry, 1)
    job, _ = loading.resolve_precisions(one.precision, entry, cpu, one.precision_overrides)
    assert job.llm == "int8-weight-only" and app.llm == "dynamic-int8"
    assert app.vision == ("bf16" if amx else "dynamic-int8")
    assert job.vision == ("bf16" if amx else "int8-weight-only")
    assert cache_key_precisions(job) == cache_key_precisions(app)
