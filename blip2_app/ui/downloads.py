"""Files the app writes for a visitor to download (chat export, search results, gallery archive).

They go to a folder under Gradio's temporary folder (the app's per-process upload folder, see
upload_folder.py, removed when the process ends), one fresh sub-folder per file so two visitors'
files never share a name; files older than the upload time-to-live are removed on each write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path


def downloads_root() -> Path:
    return Path(os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()) / "blip2-studio-downloads"


def download_path(name: str, ttl_s: float) -> Path:
    """A fresh path named `name` to write a download to; older downloads are pruned first."""
    root = downloads_root()
    root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in root.iterdir():
        try:
            if now - old.stat().st_mtime > ttl_s:
                shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:  # another request pruned it first
            continue
    folder = root / uuid.uuid4().hex
    folder.mkdir()
    return folder / name


def write_download(name: str, data: bytes | str, ttl_s: float) -> str:
    path = download_path(name, ttl_s)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return str(path)
