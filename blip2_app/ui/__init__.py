"""Gradio UI for BLIP-2 Studio: `build_demo(settings, engine)` and the launch options.

layout.py wires components to events, handlers.py holds the (browser-free, testable) handlers,
sessions.py the per-visitor state (and the bound on galleries in memory), components.py the
widgets that leave decoding to `blip2_app.images` and refuse bad values by name, guard.py the
HTTP middleware (no URL fetching, bounded request bodies), report.py
the Model tab, theme.py the look, health.py the loading page and /healthz, zerogpu.py `spaces.GPU`.
"""

from .handlers import StudioHandlers
from .layout import build_demo, launch_options

__all__ = ["StudioHandlers", "build_demo", "launch_options"]
