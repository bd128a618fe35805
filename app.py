"""BLIP-2 Studio: `python app.py [--model NAME] [--precision P] [--host H] [--port N] ...`.

Thin on purpose: flags and BLIP2_* variables -> Settings -> load_engine -> build_demo -> launch.

Importing this module loads nothing. `app.demo` (what Hugging Face Spaces, `gradio app.py` and
tests look up) is built on first access from the BLIP2_* environment variables, so a test can set
BLIP2_MODEL=tiny-random before touching it and no import ever pulls a 15 GB checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

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
    from blip2_app.errors import UserFacingError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings, demo = create_demo(argv)
    except (UserFacingError, ValueError) as error:
        print(f"blip2-studio: {error}", file=sys.stderr)
        return 1
    from blip2_app.ui import launch_options
    from blip2_app.ui.memory import start_heap_trimmer

    options = launch_options(settings, on_space=on_space())
    start_heap_trimmer()  # a busy server's resident memory stays flat (see ui/memory.py)
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
