"""Batch captioning (blip2_app/batch.py): safe zip reading, rows for unreadable files, batches equal
to single calls, exports that parse back, and the CLI's `caption --format ... --out`."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from blip2_app import batch
from blip2_app.errors import InvalidRequestError
from blip2_app.generation import GenerationSettings

DATA = Path(__file__).parent / "data"
PHOTOS = sorted(p for p in (DATA / "photos").iterdir() if p.suffix in {".png", ".jpg"})
HOSTILE = DATA / "hostile"
GREEDY = GenerationSettings(decoding="greedy", max_new_tokens=6)
LIMITS = batch.BatchLimits(max_images=20, max_zip_members=50, max_zip_bytes=5 * 2**20)


def _zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return str(path)


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize(
    ("members", "symlink", "message"),
    [
        ({"../../evil.png": b"x"}, None, "points outside the archive"),
        ({"/etc/evil.png": b"x"}, None, "points outside the archive"),
        ({"a/../../evil.png": b"x"}, None, "points outside the archive"),
        ({"ok.png": PHOTOS[0].read_bytes()}, "link.png", "symbolic link"),
        ({f"{i}.png": b"x" for i in range(60)}, None, "at most 50"),
        ({"bomb.png": b"\0" * (6 * 2**20)}, None, "at most 5 MB"),
    ],
    ids=["traversal", "absolute", "climbing", "symlink", "members", "bomb"],
)
def test_a_malicious_zip_is_refused_with_a_sentence_and_writes_nothing(tmp_path, members, symlink, message):
    upload = tmp_path / "upload"
    upload.mkdir()
    archive = _zip(upload / "evil.zip", members, symlink)
    before, cwd_before = _listing(tmp_path), set(os.listdir(os.getcwd()))
    with pytest.raises(InvalidRequestError, match=message):
        batch.from_paths([archive], ["evil.zip"], LIMITS)
    assert _listing(tmp_path) == before and set(os.listdir(os.getcwd())) == cwd_before


def test_a_member_that_inflates_past_its_declared_size_is_cut_off(tmp_path):
    """A zip bomb that lies about its size: never more than the declared bytes are inflated."""
    archive = tmp_path / "lying.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("big.png", b"\0" * 10_000_000)
    raw = bytearray(archive.read_bytes())
    # Shrink the declared size in the central directory (the one zipfile trusts) to 1000 bytes.
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 24 : central + 28] = (1000).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    (item,) = batch.from_zip(str(archive), "lying.zip", LIMITS)
    assert item.error == "This archive member could not be unpacked." or len(item.source) <= 1000


def test_a_zip_gives_its_images_in_memory_and_skips_the_rest(tmp_path):
    archive = _zip(
        tmp_path / "set.zip",
        {
            "a.png": PHOTOS[0].read_bytes(),
            "sub/b.jpg": PHOTOS[1].read_bytes(),
            "notes.txt": b"hello",
            "__MACOSX/._a.png": b"junk",
        },
    )
    items = batch.from_paths([archive], ["set.zip"], LIMITS)
    assert [i.name for i in items] == ["set.zip/a.png", "set.zip/sub/b.jpg"]
    assert items[0].source == PHOTOS[0].read_bytes()
    with pytest.raises(InvalidRequestError, match="not a readable .zip"):
        batch.from_paths([str(HOSTILE / "made_random_bytes.jpg")], ["x.zip"], LIMITS)
    with pytest.raises(InvalidRequestError, match="at most 1"):
        batch.from_paths([archive], ["set.zip"], batch.BatchLimits(max_images=1))


def test_a_batch_gives_the_captions_of_single_calls_and_rows_for_bad_files(load_tiny):
    engine = load_tiny("tiny-random", retrieval_model="none")
    names = [p.name for p in PHOTOS] + ["random.jpg", "truncated.jpg"]
    sources = [str(p) for p in PHOTOS] + [
        str(HOSTILE / "made_random_bytes.jpg"),
        str(HOSTILE / "pillow_truncated_jpeg.jpg"),
    ]
    items = [batch.BatchItem(n, s) for n, s in zip(names, sources, strict=True)]
    seen: list[tuple[int, int]] = []
    chunks = list(
        batch.caption_rows(
            engine,
            items,
            "short",
            None,
            GREEDY,
            "what is it?",
            batch_size=3,
            progress=lambda d, t: seen.append((d, t)),
        )
    )
    rows = [row for chunk in chunks for row in chunk]
    assert [len(c) for c in chunks] == [3, 2] and seen == [(3, 5), (5, 5)]
    assert [r.file for r in rows] == names
    for row, path in zip(rows[: len(PHOTOS)], PHOTOS, strict=True):
        single = engine.caption([str(path)], generation=GREEDY)[0][0].text
        assert row.status == batch.OK and row.caption == " ".join(single.split())
        assert row.answer == " ".join(engine.answer(str(path), "what is it?").text.split())
    assert rows[3].status == "This file is not a recognised image format." and rows[3].caption == ""
    assert "truncated" in rows[4].status.lower()


def test_stopping_keeps_the_rows_done(load_tiny):
    engine = load_tiny("tiny-random", retrieval_model="none")
    items = [batch.BatchItem(p.name, str(p)) for p in PHOTOS]
    stream = batch.caption_rows(engine, items, "short", None, GREEDY, batch_size=2)
    first = next(stream)
    stream.close()  # what Gradio does when the visitor presses Stop
    assert [r.file for r in first] == [p.name for p in PHOTOS[:2]] and all(r.caption for r in first)


ROWS = [
    batch.Row("a.png", 'a "quoted", comma caption', "yes"),
    batch.Row("sub/b.jpg", "ünïcode ✓ caption", ""),
    batch.Row("sub/b.png", "same stem", ""),
    batch.Row("bad.jpg", "", "", "This file is not a recognised image format."),
]


def test_exports_parse_back_to_the_same_rows(tmp_path):
    paths = [Path(p) for p in batch.write_all(ROWS, tmp_path)]
    with paths[0].open(newline="", encoding="utf-8") as handle:
        parsed = list(csv.reader(handle))
    assert parsed[0] == list(batch.COLUMNS) and parsed[1:] == [r.as_list() for r in ROWS]
    lines = [json.loads(line) for line in paths[1].read_text(encoding="utf-8").splitlines()]
    assert [batch.Row(**line) for line in lines] == ROWS
    with zipfile.ZipFile(paths[2]) as archive:
        texts = {name: archive.read(name).decode() for name in archive.namelist()}
    # sidecars for the captioned rows only; the second "sub/b" gets a number
    assert texts == {
        "a.txt": ROWS[0].caption + "\n",
        "sub/b.txt": ROWS[1].caption + "\n",
        "sub/b-2.txt": "same stem\n",
    }
    buffer = io.StringIO()
    batch.write_csv(ROWS, buffer)
    assert buffer.getvalue() == paths[0].read_bytes().decode("utf-8")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blip2_app", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_cli_captions_folders_into_csv_jsonl_and_txt(tmp_path, load_tiny):
    folder = tmp_path / "photos"
    (folder / "deeper").mkdir(parents=True)
    (folder / "one.png").write_bytes(PHOTOS[0].read_bytes())
    (folder / "deeper" / "two.png").write_bytes(PHOTOS[1].read_bytes())
    (folder / "broken.jpg").write_bytes((HOSTILE / "made_random_bytes.jpg").read_bytes())
    common = ("--model", "tiny-random", "--decoding", "greedy", "--max-new-tokens", "6")
    out = tmp_path / "out.csv"
    result = run_cli("caption", *common, "--format", "csv", "--out", str(out), "--recursive", str(folder))
    assert result.returncode == 0, result.stderr
    with out.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == ["broken.jpg", "deeper/two.png", "one.png"]
    engine = load_tiny("tiny-random", retrieval_model="none")
    assert rows[2]["caption"] == " ".join(
        engine.caption([str(PHOTOS[0])], generation=GREEDY)[0][0].text.split()
    )
    assert rows[0]["status"] != "ok" and "skipped broken.jpg" in result.stderr

    flat = run_cli("caption", *common, "--format", "jsonl", str(folder))  # no --recursive: top level only
    assert [json.loads(line)["file"] for line in flat.stdout.splitlines()] == ["broken.jpg", "one.png"]

    sidecars = tmp_path / "sidecars"
    result = run_cli(
        "caption", *common, "--format", "txt", "--out", str(sidecars), "--recursive", str(folder)
    )
    assert result.returncode == 0, result.stderr
    assert sorted(_listing(sidecars)) == ["deeper", "deeper/two.txt", "one.txt"]
    assert (sidecars / "one.txt").read_text() == rows[2]["caption"] + "\n"

    refused = run_cli("caption", *common, "--format", "txt", str(folder))
    assert refused.returncode == 2 and "pass the folder with --out" in refused.stderr
    plain = run_cli("caption", *common, str(folder))  # the plain form takes image files only
    assert plain.returncode == 2 and "pass --format csv|jsonl|txt to caption folders" in plain.stderr
