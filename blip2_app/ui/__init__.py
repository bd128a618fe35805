"""Gradio UI for BLIP-2 Studio: `build_demo(settings, engine)` and the launch options.

layout.py wires components to events, handlers.py holds the (browser-free, testable) handlers,
sessions.py the per-visitor state, components.py the upload widgets that leave decoding to
`blip2_app.images`, report.py the Model tab, theme.py the look.
"""

from .handlers import StudioHandlers
from .layout import build_demo, launch_options

__all__ = ["StudioHandlers", "build_demo", "launch_options"]
