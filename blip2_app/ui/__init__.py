"""Gradio UI for BLIP-2 Studio: `build_demo(settings, engine)` and the launch options.

layout.py assembles the shared header and the tabs; tabs/ holds one module per tab (its handlers,
testable without a browser, and its `build`); decoding.py the decoding widgets and their values as
one `DecodingInputs`; errors.py and validation.py what every handler shares (exceptions to
sentences, checks on values); engine_view.py the only reads of the engine's insides; sessions.py
the per-visitor state (and the bound on galleries in memory); components.py the widgets that leave
decoding to `blip2_app.images` and refuse bad values by name; guard.py the HTTP middleware (no URL
fetching, bounded request bodies); report.py the Model tab's text; theme.py the look; health.py
the loading page and /healthz; zerogpu.py `@gpu` and `spaces.GPU`.
"""

from .layout import build_demo, launch_options

__all__ = ["build_demo", "launch_options"]
