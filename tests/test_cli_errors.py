"""Every CLI command, given a missing path, a file where a folder is expected or a folder where a
file is expected: exit status 2 and exactly one `error:` line naming the path, no traceback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from blip2_app import cli
from blip2_app.retrieval import GalleryIndex

PHOTO = str(Path(__file__).parent / "data" / "photos" / "skimage_camera.png")


class Paths:
    def __init__(self, root: Path):
        self.missing = root / "missing"
        self.file = root / "a-file.txt"
        self.file.write_text("not a folder")
        self.folder = root / "a-folder"
        self.folder.mkdir()
        (self.folder / "cat.jpg").write_bytes(Path(PHOTO).read_bytes())
        self.index = root / "index"
        GalleryIndex().save(self.index)  # a valid (empty) index, for the cases after it is loaded


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> Paths:
    return Paths(tmp_path_factory.mktemp("cli-errors"))


# (command, what the path stands for, args given the paths, the path the error must name)
Case = tuple[str, str, Callable[[Paths], list[str]], Callable[[Paths], Path]]
TINY = ["--model", "tiny-random"]
CASES: list[Case] = []
for command, base in (
    ("caption", lambda p: [*TINY, PHOTO]),
    ("ask", lambda p: [*TINY, PHOTO, "what is this?"]),
    ("index", lambda p: [*TINY, str(p.folder), "--out", str(p.missing / "out")]),
    ("search", lambda p: [*TINY, str(p.index), "a cat"]),
    ("models", lambda p: []),
):
    # Every command that loads a model reads --model (a checkpoint folder) and --models-file.
    CASES += [
        (
            command,
            "--models-file missing",
            lambda p, b=base: [*b(p), "--models-file", str(p.missing)],
            lambda p: p.missing,
        ),
        (
            command,
            "--models-file folder",
            lambda p, b=base: [*b(p), "--models-file", str(p.folder)],
            lambda p: p.folder,
        ),
    ]
    if command != "models":
        CASES += [
            (
                command,
                "--model missing",
                lambda p, b=base: [*b(p), "--model", str(p.missing)],
                lambda p: p.missing,
            ),
            (command, "--model file", lambda p, b=base: [*b(p), "--model", str(p.file)], lambda p: p.file),
        ]
CASES += [
    ("caption", "image missing", lambda p: [*TINY, str(p.missing)], lambda p: p.missing),
    ("caption", "image folder", lambda p: [*TINY, PHOTO, str(p.folder)], lambda p: p.folder),
    ("ask", "image missing", lambda p: [*TINY, str(p.missing), "what?"], lambda p: p.missing),
    ("ask", "image folder", lambda p: [*TINY, str(p.folder), "what?"], lambda p: p.folder),
    ("index", "FOLDER missing", lambda p: [*TINY, str(p.missing), "--out", str(p.missing)], lambda p: p.missing),
    ("index", "FOLDER file", lambda p: [*TINY, str(p.file), "--out", str(p.missing)], lambda p: p.file),
    ("index", "--out file", lambda p: [*TINY, str(p.folder), "--out", str(p.file)], lambda p: p.file),
    ("index", "--out in a file", lambda p: [*TINY, str(p.folder), "--out", str(p.file / "x")], lambda p: p.file / "x"),
    ("index", "--out not an index", lambda p: [*TINY, str(p.folder), "--out", str(p.folder)], lambda p: p.folder),
    ("search", "INDEX_DIR missing", lambda p: [*TINY, str(p.missing), "x"], lambda p: p.missing),
    ("search", "INDEX_DIR file", lambda p: [*TINY, str(p.file), "x"], lambda p: p.file),
    ("search", "INDEX_DIR not an index", lambda p: [*TINY, str(p.folder), "x"], lambda p: p.folder),
    ("search", "--images file", lambda p: [*TINY, str(p.index), "x", "--rerank", "2", "--images", str(p.file)], lambda p: p.file),
    ("evaluate", "--model missing", lambda p: ["--model", str(p.missing)], lambda p: p.missing),
    ("evaluate", "--model file", lambda p: ["--model", str(p.file)], lambda p: p.file),
    ("evaluate", "annotations missing", lambda p: [*TINY, "--dataset", f"coco:annotations={p.missing}"], lambda p: p.missing),
    ("evaluate", "annotations folder", lambda p: [*TINY, "--dataset", f"coco:annotations={p.folder}"], lambda p: p.folder),
]  # fmt: skip


@pytest.mark.parametrize(("command", "what", "args", "named"), CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_a_wrong_path_is_one_error_line(paths, capsys, command, what, args, named):
    status = cli.main([command, *args(paths)])
    err = capsys.readouterr().err
    assert status == cli.EXIT_USER_ERROR, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert str(named(paths)) in errors[0]
    assert "Traceback" not in err


def test_the_real_entry_point_too(paths):
    """`python -m blip2_app search MISSING_FOLDER "x"`: a traceback and status 1 before."""
    result = subprocess.run(
        [sys.executable, "-m", "blip2_app", "search", str(paths.missing), "x"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {paths.missing}: not a folder, so not a gallery index"]


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only the errors a person can fix are one line: anything else still raises."""

    def broken(_):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_models", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["models"])
