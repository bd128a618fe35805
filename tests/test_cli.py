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
