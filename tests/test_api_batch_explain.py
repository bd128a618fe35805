"""`/caption_batch`, `/match`, `/explain` and `/classify` through gradio_client, on `python app.py
--model tiny-random` (parity and plumbing; what the maps mean is tested on the demo model in
test_explain.py)."""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("BLIP2_TINY_CACHE", tempfile.mkdtemp(prefix="blip2-tiny-"))

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from running_app import running_app

from blip2_app.training import synthetic

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ROOT / "tests" / "data" / "hostile"
GREEDY = {"decoding": "greedy", "max_new_tokens": 6}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("app"), ["--concurrency", "1", "--max-queue", "8"]) as app:
        yield app.url


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """50 different pictures (synthetic scenes), saved as PNG files."""
    folder = tmp_path_factory.mktemp("scenes")
    paths = []
    for index in range(50):
        path = folder / f"scene-{index:02d}.png"
        synthetic.make_scene(555, "test", index).render().save(path)
        paths.append(str(path))
    return paths


def rows_of(table) -> list[list[str]]:
    return table["data"] if isinstance(table, dict) else table


def test_fifty_images_in_one_batch_give_the_captions_of_fifty_single_calls(server, images):
    client = Client(server, verbose=False)
    files = [handle_file(p) for p in images] + [handle_file(str(HOSTILE / "made_random_bytes.jpg"))]
    table, downloads = client.predict(files, "short", "", **GREEDY, api_name="/caption_batch")
    rows = rows_of(table)
    assert [r[0] for r in rows] == [Path(p).name for p in images] + ["made_random_bytes.jpg"]
    singles = [client.predict(handle_file(p), "short", **GREEDY, api_name="/caption") for p in images]
    assert [r[1] for r in rows[:50]] == [" ".join(s.split()) for s in singles]
    assert all(r[3] == "ok" and r[2] == "" for r in rows[:50])
    assert rows[50][1:] == ["", "", "This file is not a recognised image format."]

    # The downloads parse back to the table.
    by_name = {Path(f).name: Path(f) for f in downloads}
    with by_name["captions.csv"].open(newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == [["file", "caption", "answer", "status"], *rows]
    lines = [json.loads(line) for line in by_name["captions.jsonl"].read_text(encoding="utf-8").splitlines()]
    assert [[d["file"], d["caption"], d["answer"], d["status"]] for d in lines] == rows
    with zipfile.ZipFile(by_name["captions-txt.zip"]) as archive:
        assert archive.read("scene-07.txt").decode() == rows[7][1] + "\n"
        assert len(archive.namelist()) == 50


def test_a_question_gets_its_own_column_and_a_zip_is_unpacked(server, images, tmp_path):
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path in images[:3]:
            out.write(path, f"inside/{Path(path).name}")
    client = Client(server, verbose=False)
    table, _ = client.predict(
        [handle_file(str(archive))], "short", "what is it?", **GREEDY, api_name="/caption_batch"
    )
    rows = rows_of(table)
    assert [r[0] for r in rows] == [f"set.zip/inside/{Path(p).name}" for p in images[:3]]
    answer = client.predict(handle_file(images[0]), "what is it?", api_name="/answer")
    assert rows[0][2] == " ".join(answer.split())


def test_a_malicious_zip_is_refused_with_a_sentence(server, tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("../../escape.png", b"x")
    with pytest.raises(AppError, match="points outside the archive"):
        Client(server, verbose=False).predict([handle_file(str(archive))], "short", api_name="/caption_batch")


def test_stop_keeps_the_rows_done(server, images):
    client = Client(server, verbose=False)
    job = client.submit(
        [handle_file(p) for p in images],
        "short",
        "",
        "greedy",
        max_new_tokens=40,
        min_new_tokens=40,
        api_name="/caption_batch",
    )
    deadline = time.monotonic() + 120
    while not job.outputs() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.cancel()
    time.sleep(1)
    shown = job.outputs()
    assert shown, "at least one batch arrived before Stop"
    table, downloads = shown[-1]
    rows = rows_of(table)
    assert rows and (len(rows) % 8 == 0 or len(rows) == 50)  # whole batches of 8
    assert [r[0] for r in rows] == [Path(p).name for p in images[: len(rows)]]
    csv_file = next(Path(f) for f in downloads if f.endswith(".csv"))
    with csv_file.open(newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle))[1:] == rows  # the downloads hold the rows shown


def test_match_explain_and_classify(server, images):
    client = Client(server, verbose=False)
    image = handle_file(images[0])
    scores, meaning = client.predict(image, "a red circle", api_name="/match")
    assert set(scores) >= {"itm", "itc"} and 0 <= scores["itm"] <= 1 and -1 <= scores["itc"] <= 1
    assert "ITM" in meaning and "ITC" in meaning
    heatmap, words = client.predict(image, "a red circle", api_name="/explain")
    assert Image.open(heatmap).size == (384, 384)
    assert [w["caption"] for w in words] == ["a", "red", "circle"]
    label, note = client.predict(image, "red, green\nblue", api_name="/classify")
    assert label["label"] in {"red", "green", "blue"} and len(label["confidences"]) == 3
    assert sum(c["confidence"] for c in label["confidences"]) == pytest.approx(1, abs=1e-3)
    assert "0.07" in note
    with pytest.raises(AppError, match="at least two labels"):
        client.predict(image, "red", api_name="/classify")
    with pytest.raises(AppError, match="exactly one"):
        client.predict(image, "red, blue", "no slot", api_name="/classify")
    with pytest.raises(AppError, match="type a text"):
        client.predict(image, "  ", api_name="/explain")
    with pytest.raises(AppError, match="not a recognised image format"):
        client.predict(handle_file(str(HOSTILE / "made_random_bytes.jpg")), "a cat", api_name="/match")


def test_every_hostile_file_is_a_row_or_a_sentence_on_the_new_endpoints(server):
    """tests/data/hostile through /caption_batch (all at once: one row each, the batch survives) and
    through /match, /explain and /classify (the same sentences as on /caption)."""
    from test_hostile_endpoints import GENERIC, MANIFEST, REFUSED

    client = Client(server, verbose=False)
    names = sorted(row["filename"] for row in MANIFEST)
    table, _ = client.predict(
        [handle_file(str(HOSTILE / n)) for n in names], "short", **GREEDY, api_name="/caption_batch"
    )
    rows = {row[0]: row for row in rows_of(table)}
    assert sorted(rows) == names
    for name in names:
        status = rows[name][3]
        assert (REFUSED[name] in status) if name in REFUSED else status == "ok", (name, status)
        image = handle_file(str(HOSTILE / name))
        for api_name, args in (
            ("/match", ("a cat",)),
            ("/explain", ("a cat",)),
            ("/classify", ("cat, dog",)),
        ):
            try:
                client.predict(image, *args, api_name=api_name)
                assert name not in REFUSED, (api_name, name)
            except AppError as error:
                assert name in REFUSED and REFUSED[name] in str(error), (api_name, name, str(error))
                assert not any(g in str(error) for g in GENERIC)
    assert client.predict(
        handle_file(str(HOSTILE.parent / "photos" / "skimage_camera.png")), "a camera", api_name="/match"
    )
