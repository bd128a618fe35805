"""Captioning a set of images: gathering them (files, folders, .zip archives unpacked safely),
captioning them in batches through the engine, and writing the rows as CSV, JSON Lines or
`name.txt` sidecar captions. Plain Python, no Gradio: the Batch tab and the CLI share it.

A file that cannot be read is a row with its sentence in `status`, never a failure of the batch.

Zip archives are read in memory, member by member, never extracted to disk: a member name cannot
write anywhere. Still, an archive is refused whole, with a sentence, when any member name is
absolute or climbs out (`..`), when a member is a symlink or encrypted, when it holds more members
or more uncompressed bytes than `BatchLimits` allows (from the sizes its directory declares), and a
member that inflates past its declared size is cut off at it (a lying header).
"""

from __future__ import annotations

import csv
import io
import json
import stat
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .engine import Engine, PreparedImage
from .errors import InvalidRequestError, UserFacingError
from .generation import GenerationSettings
from .images import ImageDecodeError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
COLUMNS = ("file", "caption", "answer", "status")
OK = "ok"
CAPTION_SEPARATOR = " | "  # several captions of one image share its cell


@dataclass(frozen=True)
class BatchLimits:
    """What one batch may hold. `max_images` is --max-gallery-images in the app (200 by default)."""

    max_images: int = 200
    max_zip_members: int = 1000  # entries in one archive's directory, folders included
    max_zip_bytes: int = 256 * 1024 * 1024  # total uncompressed bytes one archive declares
    batch_size: int = 8  # images per generate call

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of 1 or more; got {value!r}.")


@dataclass(frozen=True)
class BatchItem:
    """One image to caption: where it came from and its source (a path or a zip member's bytes)."""

    name: str
    source: str | bytes | None
    error: str = ""  # set: the row's status, the image is not read


@dataclass(frozen=True)
class Row:
    file: str
    caption: str = ""
    answer: str = ""
    status: str = OK

    def as_list(self) -> list[str]:
        return [self.file, self.caption, self.answer, self.status]


# --------------------------------------------------------------------------- gathering
def from_paths(paths: Sequence[str], names: Sequence[str], limits: BatchLimits) -> list[BatchItem]:
    """Items for uploaded files (`names`: what the visitor called them); a .zip becomes its images."""
    items: list[BatchItem] = []
    for path, name in zip(paths, names, strict=True):
        if name.lower().endswith(".zip"):
            items.extend(from_zip(path, name, limits))
        else:
            items.append(BatchItem(name, path))
        if len(items) > limits.max_images:
            raise InvalidRequestError(
                f"Too many images for one batch: at most {limits.max_images} (zip members included)."
            )
    return items


def from_folder(folder: Path, recursive: bool) -> list[BatchItem]:
    """The images of a folder (by suffix), sorted, named by their path relative to it."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    paths = sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [BatchItem(p.relative_to(folder).as_posix(), str(p)) for p in paths]


def from_zip(path: str, name: str, limits: BatchLimits) -> list[BatchItem]:
    """The image members of an archive, read into memory after the whole directory is checked."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise InvalidRequestError(f"{name} is not a readable .zip archive.") from error
    with archive:
        members = archive.infolist()
        _check_zip(name, members, limits)
        items = []
        for member in members:
            member_name = PurePosixPath(member.filename)
            if member.is_dir() or member_name.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if any(part.startswith(".") or part == "__MACOSX" for part in member_name.parts):
                continue  # macOS resource forks and hidden files: not pictures
            label = f"{name}/{member.filename}"
            try:
                with archive.open(member) as handle:
                    data = handle.read(member.file_size + 1)
            except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, NotImplementedError):
                items.append(BatchItem(label, None, "This archive member could not be unpacked."))
                continue
            if len(data) > member.file_size:
                raise InvalidRequestError(
                    f"{name} is refused: {member.filename} unpacks to more bytes than the archive declares."
                )
            items.append(BatchItem(label, data))
        return items


def _check_zip(name: str, members: Sequence[zipfile.ZipInfo], limits: BatchLimits) -> None:
    if len(members) > limits.max_zip_members:
        raise InvalidRequestError(
            f"{name} holds {len(members)} entries; an archive may hold at most {limits.max_zip_members}."
        )
    total = sum(member.file_size for member in members)
    if total > limits.max_zip_bytes:
        raise InvalidRequestError(
            f"{name} unpacks to {total / 2**20:.0f} MB; an archive may unpack to at most "
            f"{limits.max_zip_bytes / 2**20:.0f} MB."
        )
    for member in members:
        filename = member.filename.replace("\\", "/")
        parts = PurePosixPath(filename).parts
        if (
            filename.startswith("/")
            or ".." in parts
            or (parts and parts[0].endswith(":"))
            or "\0" in filename
        ):
            raise InvalidRequestError(
                f"{name} is refused: the member name {filename!r} points outside the archive."
            )
        if stat.S_ISLNK(member.external_attr >> 16):
            raise InvalidRequestError(f"{name} is refused: {filename!r} is a symbolic link.")
        if member.flag_bits & 0x1:
            raise InvalidRequestError(f"{name} is refused: {filename!r} is encrypted.")


# --------------------------------------------------------------------------- captioning
def caption_rows(
    engine: Engine,
    items: Sequence[BatchItem],
    style: str,
    prompt: str | None,
    generation: GenerationSettings,
    question: str = "",
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[list[Row]]:
    """Rows in `items`' order, a batch at a time (each yield: the rows of one batch). Stopping the
    iteration stops after the batch in progress; the rows yielded so far stand."""
    total = len(items)
    for start in range(0, total, batch_size):
        chunk = items[start : start + batch_size]
        rows: list[Row | None] = [None] * len(chunk)
        readable: list[tuple[int, PreparedImage]] = []
        for index, item in enumerate(chunk):
            if item.error or item.source is None:
                rows[index] = Row(item.name, status=item.error or "This file could not be read.")
                continue
            try:
                readable.append((index, engine.prepare([item.source])[0]))
            except ImageDecodeError as error:
                rows[index] = Row(item.name, status=str(error))
        if readable:
            images = [image for _, image in readable]
            captions = engine.caption(images, style, prompt, generation)
            answers = engine.answer_batch(images, [question] * len(images)) if question else None
            for position, (index, _) in enumerate(readable):
                text = CAPTION_SEPARATOR.join(" ".join(c.text.split()) for c in captions[position])
                answer = " ".join(answers[position].text.split()) if answers else ""
                rows[index] = Row(chunk[index].name, text, answer)
        if progress:
            progress(min(start + batch_size, total), total)
        yield [row for row in rows if row is not None]


# --------------------------------------------------------------------------- writing
def write_csv(rows: Sequence[Row], target: Path | io.TextIOBase) -> None:
    def write(handle: Any) -> None:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(row.as_list() for row in rows)

    if isinstance(target, Path):
        with target.open("w", newline="", encoding="utf-8") as handle:
            write(handle)
    else:
        write(target)


def write_jsonl(rows: Sequence[Row], target: Path | io.TextIOBase) -> None:
    text = "".join(json.dumps(asdict(row), ensure_ascii=False) + "\n" for row in rows)
    if isinstance(target, Path):
        target.write_text(text, encoding="utf-8")
    else:
        target.write(text)


def sidecar_names(rows: Sequence[Row]) -> list[tuple[str, Row]]:
    """`name.txt` for each captioned row (its image's name with .txt), duplicates numbered."""
    taken: set[str] = set()
    named = []
    for row in rows:
        if row.status != OK:
            continue
        stem = str(PurePosixPath(row.file.replace("\\", "/")).with_suffix(""))
        candidate, number = f"{stem}.txt", 2
        while candidate in taken:
            candidate, number = f"{stem}-{number}.txt", number + 1
        taken.add(candidate)
        named.append((candidate, row))
    return named


def write_txt_zip(rows: Sequence[Row], target: Path) -> None:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, row in sidecar_names(rows):
            archive.writestr(name, row.caption + "\n")


def write_txt_folder(rows: Sequence[Row], folder: Path) -> list[Path]:
    """One `name.txt` per captioned image under `folder` (names are relative: checked above)."""
    written = []
    root = folder.resolve()
    for name, row in sidecar_names(rows):
        target = (folder / name).resolve()
        if not target.is_relative_to(root):
            raise UserFacingError(f"{name} would be written outside {folder}.")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(row.caption + "\n", encoding="utf-8")
        written.append(target)
    return written


def write_all(rows: Sequence[Row], folder: Path) -> list[str]:
    """The three downloads (CSV, JSON Lines, .zip of sidecars) in `folder`; their paths."""
    paths = [folder / "captions.csv", folder / "captions.jsonl", folder / "captions-txt.zip"]
    write_csv(rows, paths[0])
    write_jsonl(rows, paths[1])
    write_txt_zip(rows, paths[2])
    return [str(p) for p in paths]
