"""Uploads do not outlive the app process (threat model, finding 7)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from blip2_app.ui.upload_folder import FOLDER_NAME, claim_upload_folder, release_upload_folder


def test_a_crashed_process_leaves_nothing_after_the_next_start(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / FOLDER_NAME / dead.stdout.strip()  # that pid has exited: like a kill -9
    (stale / "abc").mkdir(parents=True)
    (stale / "abc" / "photo.png").write_bytes(b"x")
    alive = tmp_path / FOLDER_NAME / str(os.getppid())  # a running app's folder stays
    alive.mkdir()
    mine = claim_upload_folder(tmp_path)
    assert not stale.exists() and alive.exists()
    assert mine == tmp_path / FOLDER_NAME / str(os.getpid()) and mine.is_dir()
    assert os.environ["GRADIO_TEMP_DIR"] == str(mine)
    release_upload_folder(mine)
    assert not mine.exists()


def test_sigterm_runs_the_cleanup(tmp_path):
    # `docker stop` sends SIGTERM; before, the process died without removing its uploads.
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from blip2_app.ui.upload_folder import claim_upload_folder, release_upload_folder, stop_on_sigterm
        folder = claim_upload_folder({str(tmp_path)!r})
        (folder / "upload.png").write_bytes(b"x")
        stop_on_sigterm()
        try:
            print(folder, flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            pass
        finally:
            release_upload_folder(folder)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    folder = Path(process.stdout.readline().strip())
    assert (folder / "upload.png").exists()
    process.terminate()
    assert process.wait(timeout=30) == 0
    assert not folder.exists()
