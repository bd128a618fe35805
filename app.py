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
    from blip2_app.ui import build_demo

    settings = Settings.from_sources(argv, env)
    engine = load_engine(settings)
    return settings, build_demo(settings, engine)


def on_space(env: dict[str, str] | None = None) -> bool:
    return bool((env if env is not None else os.environ).get("SPACE_ID"))


def main(argv: Sequence[str] | None = None) -> int:
    from blip2_app.errors import UserFacingError
    from blip2_app.ui import launch_options

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings, demo = create_demo(argv)
    except (UserFacingError, ValueError) as error:
        print(f"blip2-studio: {error}", file=sys.stderr)
        return 1
    demo.launch(**launch_options(settings, on_space=on_space()))
    return 0


def __getattr__(name: str) -> Any:  # PEP 562: build `demo` lazily, once
    if name == "demo":
        _, demo = create_demo([])
        globals()["demo"] = demo
        return demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
