"""BLIP-2 Studio: `python app.py [--model NAME] [--precision P] [--host H] [--port N] ...`.

Thin on purpose: flags and BLIP2_* variables -> Settings -> load_engine -> build_demo -> launch.

Importing this module loads nothing. `app.demo` (what Hugging Face Spaces, `gradio app.py` and
tests look up) is built on first access from the BLIP2_* environment variables, so a test can set
BLIP2_MODEL=tiny-random before touching it and no import ever pulls a 15 GB checkpoint.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blip2_app.config import Settings

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

log = logging.getLogger("blip2_app")


def create_demo(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> tuple[Any, Any]:
    """(settings, demo) from command-line flags and BLIP2_* variables; loads the model(s)."""
    from blip2_app.config import Settings
    from blip2_app.startup import load_engine

    settings = Settings.from_sources(argv, env)
    engine = load_engine(settings)
    from blip2_app.ui import build_demo  # Gradio only once the model is there: failures come sooner

    return settings, build_demo(settings, engine)


def on_space(env: dict[str, str] | None = None) -> bool:
    return bool((env if env is not None else os.environ).get("SPACE_ID"))


def main(argv: Sequence[str] | None = None) -> int:
    # Only torch-free modules until the loading page is up: importing torch, transformers and
    # Gradio takes seconds, and the port should answer (503 on /healthz) during them too.
    from blip2_app.config import Settings
    from blip2_app.errors import UserFacingError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_sources(argv)
    except (UserFacingError, ValueError) as error:
        print(f"blip2-studio: {error}", file=sys.stderr)
        return 1
    # Uploads live in a folder of this process's own, removed when it stops (SIGTERM included)
    # and, after a crash, by the next start (see ui/upload_folder.py).
    from blip2_app.ui.upload_folder import claim_upload_folder, release_upload_folder, stop_on_sigterm

    uploads = claim_upload_folder()
    stop_on_sigterm()
    try:
        return _serve(settings)
    finally:
        release_upload_folder(uploads)


def _serve(settings: Settings) -> int:
    """Loading page, then the model, then the app; returns the exit status."""
    from blip2_app.errors import UserFacingError
    from blip2_app.ui.loading_page import LoadingServer

    host = settings.server_name(on_space()) or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    # The port answers at once: a loading page for visitors, 503 on /healthz, until the model is in.
    loading = LoadingServer(host, settings.port, settings.model)
    try:
        loading.start()
    except OSError as error:  # taken port: say so now, not after minutes of loading
        print(f"blip2-studio: cannot listen on {host}:{settings.port}: {error}", file=sys.stderr)
        return 1
    try:
        from blip2_app.ui.zerogpu import import_spaces

        import_spaces()  # on a ZeroGPU Space, before torch looks at CUDA
        from blip2_app.startup import load_engine
        from blip2_app.ui import build_demo

        engine = load_engine(settings)
        demo = build_demo(settings, engine)
    except (UserFacingError, ValueError) as error:
        print(f"blip2-studio: {error}", file=sys.stderr)
        return 1
    finally:
        loading.stop()
    from blip2_app.allocator import start_heap_trimmer
    from blip2_app.ui import launch_options

    options = launch_options(settings, on_space=on_space(), engine=engine)
    start_heap_trimmer()  # a busy server's resident memory stays flat (see allocator.py)
    # What exists now (the model's modules, transformers, Gradio's blocks) lives as long as the app:
    # out of the collector's sight, its full collections no longer stall every request thread for
    # 200-280 ms (real size), which split visitors who clicked together into two batches.
    gc.collect()
    gc.freeze()
    try:
        demo.launch(**options)
    except OSError as error:  # e.g. the port is taken: Gradio says "Cannot find empty port ..."
        where = f"{options['server_name'] or 'the default host'}:{settings.port}"
        print(f"blip2-studio: cannot listen on {where}: {error}", file=sys.stderr)
        return 1
    return 0


def __getattr__(name: str) -> Any:  # PEP 562: build `demo` lazily, once
    if name == "demo":
        _, demo = create_demo([])
        globals()["demo"] = demo
        return demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
