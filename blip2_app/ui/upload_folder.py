"""Where Gradio keeps uploads, and their removal when the app stops or after it crashed.

Gradio deletes an upload only once `delete_cache`'s age has passed, and only while the process
runs: after `docker stop` (SIGTERM) or a crash, the files stayed and were served again after a
restart (threat model, finding 7). Each app process therefore gets a folder of its own,
`<temp>/blip2-studio/<pid>`, set as GRADIO_TEMP_DIR before Gradio starts: it is removed when
the process ends normally or on SIGTERM, and at start-up the folders of processes that are no
longer running (a crash, a kill -9) are removed too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

FOLDER_NAME = "blip2-studio"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to clean
        return True
    return True


def claim_upload_folder(base: str | os.PathLike[str] | None = None) -> Path:
    """Creates this process's upload folder (emptied), removes dead processes' folders, and
    points GRADIO_TEMP_DIR at it. Call before Gradio creates its app."""
    root = Path(base or os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()) / FOLDER_NAME
    root.mkdir(parents=True, exist_ok=True)
    for folder in root.iterdir():
        if (
            folder.is_dir()
            and folder.name.isdigit()
            and int(folder.name) != os.getpid()
            and not _alive(int(folder.name))
        ):
            log.info("Removing the uploads of an app process that is gone: %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
    mine = root / str(os.getpid())
    shutil.rmtree(mine, ignore_errors=True)  # a reused pid's leftovers are not ours
    mine.mkdir(mode=0o700)
    os.environ["GRADIO_TEMP_DIR"] = str(mine)
    return mine


def release_upload_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    log.info("Removed the upload folder %s.", folder)


def stop_on_sigterm() -> None:
    """SIGTERM ends the app as Ctrl+C does (Gradio's launch() closes the server on
    KeyboardInterrupt), so `finally` blocks and atexit handlers run; by default it kills at once."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not in the main thread (tests): leave it alone
        signal.signal(signal.SIGTERM, interrupt)
