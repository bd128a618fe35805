"""Gradio UI for BLIP-2 Studio: `build_demo(settings, engine)` and the launch options.

layout.py assembles the shared header and the tabs; tabs/ holds one module per tab (its handlers,
testable without a browser, and its `build`); decoding.py the decoding widgets and their values as
one `DecodingInputs`; errors.py and validation.py what every handler shares (exceptions to
sentences, checks on values); engine_view.py the only reads of the engine's insides; sessions.py
the per-visitor state (and the bound on galleries in memory); components.py the widgets that leave
decoding to `blip2_app.images` and refuse bad values by name; guard.py the HTTP middleware (no URL
fetching, bounded request bodies); report.py the Model tab's text; theme.py the look;
loading_page.py the page shown while the model loads; health.py /healthz once it is in;
zerogpu.py `@gpu` and `spaces.GPU`.

Importing this package imports nothing heavy: app.py starts the loading page (loading_page.py,
standard library only) before Gradio and torch are imported, so the names below are looked up on
first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .layout import build_demo, launch_options

_LAZY = {"build_demo": ".layout", "launch_options": ".layout"}

__all__ = ["build_demo", "launch_options"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:  # AttributeError lets `from blip2_app.ui import tabs` find the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
