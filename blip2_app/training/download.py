"""Fetch dataset files when a network exists: resumable, checksum-verified, atomic.

The partial file is `<dest>.part`; a later call continues it with an HTTP Range request (or a
seek, for file:// URLs) and starts over if the server ignores the range. Only when the SHA-256
matches is the file renamed to `dest`, so `dest` existing means "complete and verified".
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from tqdm.auto import tqdm

CHUNK = 1 << 20
TIMEOUT_S = 60


class ChecksumError(ValueError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    progress: bool = True,
    opener: Callable[..., object] = urllib.request.urlopen,
) -> Path:
    """Download `url` to `dest` (resuming `dest.part`), verify `sha256` if given, return `dest`.

    An existing `dest` whose checksum matches is returned without a request."""
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256_of(dest) == sha256.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    parsed = urlparse(url)
    if parsed.scheme == "file":
        _copy_local(Path(unquote(parsed.path)), part, have, progress)
    elif parsed.scheme in {"http", "https"}:
        _fetch_http(url, part, have, progress, opener)
    else:
        raise ValueError(f"Unsupported URL scheme in {url!r} (use http, https or file).")
    if sha256 is not None:
        actual = sha256_of(part)
        if actual != sha256.lower():
            part.unlink()
            raise ChecksumError(f"{url}: SHA-256 is {actual}, expected {sha256}; the download was removed.")
    os.replace(part, dest)
    return dest


def _copy_local(source: Path, part: Path, have: int, progress: bool) -> None:
    total = source.stat().st_size
    if have > total:  # not a prefix of this file: start again
        have = 0
    with open(source, "rb") as src, open(part, "ab" if have else "wb") as out:
        src.seek(have)
        with tqdm(total=total, initial=have, unit="B", unit_scale=True, disable=not progress) as bar:
            for block in iter(lambda: src.read(CHUNK), b""):
                out.write(block)
                bar.update(len(block))


def _fetch_http(url: str, part: Path, have: int, progress: bool, opener) -> None:
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = opener(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # asked past the end: the partial file is already whole
            return
        raise
    with response:
        resumed = have and getattr(response, "status", 200) == 206
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else None
        with (
            open(part, "ab" if resumed else "wb") as out,
            tqdm(
                total=total, initial=have if resumed else 0, unit="B", unit_scale=True, disable=not progress
            ) as bar,
        ):
            while block := response.read(CHUNK):
                out.write(block)
                bar.update(len(block))
