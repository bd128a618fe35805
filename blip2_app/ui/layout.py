"""The Gradio Blocks: the shared header above the tabs, the tabs (one module each, ui/tabs/), the
queue, and the options `demo.launch()` takes.

Public endpoints (api_name, parameters in order; see README, "API"):
  /caption (tabs/caption.py), /answer and /chat (streaming; tabs/chat.py), /index_gallery,
  /search_text, /search_image, /clear_gallery (tabs/retrieval.py).
Every other event is UI plumbing: `api_visibility="private"`, and if it does not touch the model
it skips the queue (`queue=False`). Model events share one concurrency group ("model") whose
size is `--concurrency`; the queue holds at most `--max-queue` waiting requests.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from ..config import Settings
from ..engine import Engine
from .blocks import StudioBlocks
from .engine_view import LoadedModels
from .fair_share import FairShare, FairShareLimits
from .guard import RequestGuard, body_limit_bytes
from .health import HealthRoute, readiness
from .sessions import MAX_GALLERY_IMAGES
from .tabs import TABS, TabContext
from .tabs.common import unbooked_handlers
from .theme import CSS, studio_theme
from .upload_guard import UploadGuard, UploadLimits
from .zerogpu import import_spaces

MB = 1024 * 1024

TITLE = "BLIP-2 Studio"
DESCRIPTION = (
    "Caption photos, chat about them and search your own picture collection with "
    '<a href="https://arxiv.org/abs/2301.12597" target="_blank" rel="noopener">BLIP-2</a>: a frozen image '
    "encoder and a frozen language model joined by a small Querying Transformer. Prompt templates are "
    "applied for you, answers stream as they are written, every decoding knob is at hand, and your chat "
    "and your gallery stay private to this browser tab."
)
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"


def delete_cache(settings: Settings) -> tuple[int, int]:
    """Gradio's (frequency, age) in seconds: uploads and result files older than
    --upload-ttl-minutes are deleted, checked hourly (or every age, if shorter)."""
    age = max(1, round(settings.upload_ttl_minutes * 60))
    return min(3600, age), age


def example_images() -> list[str]:
    if not EXAMPLES_DIR.is_dir():
        return []
    suffixes = {".jpg", ".jpeg", ".png", ".webp"}
    return sorted(str(path) for path in EXAMPLES_DIR.iterdir() if path.suffix.lower() in suffixes)


def launch_options(
    settings: Settings, on_space: bool = False, engine: Engine | None = None
) -> dict[str, Any]:
    """Keyword arguments for `demo.launch()` (Gradio 6: theme and CSS go here, not to Blocks).

    With `engine`, GET /healthz answers 200 and what is loaded (see ui/health.py).
    """
    middleware = request_guards(settings)
    if engine is not None:
        middleware.insert(0, Middleware(HealthRoute, payload=lambda: readiness(engine)))
    return {
        "server_name": settings.server_name(on_space),
        "server_port": settings.port,
        "share": settings.share,
        "max_file_size": settings.max_upload_mb * 1024 * 1024,
        "enable_monitoring": False,
        "ssr_mode": False,
        "show_error": False,  # unexpected exceptions stay in the log; gr.Error text is still shown
        "mcp_server": settings.mcp,  # opt-in (--mcp): the public endpoints as MCP tools
        "pwa": False,
        "theme": studio_theme(),
        "css": CSS,
        "allowed_paths": [str(EXAMPLES_DIR)] if EXAMPLES_DIR.is_dir() else None,
        "footer_links": ["api", "gradio"],
        # Sessions whose gr.State (chat, gallery) is kept; the least recently used is dropped.
        "state_session_capacity": settings.max_sessions,
        # No URL proxying, bounded bodies and uploads, a fair share per client: request_guards.
        "app_kwargs": {"middleware": middleware},
    }


def request_guards(settings: Settings) -> list[Middleware]:
    """The ASGI middleware in front of Gradio, outermost first (docs/threat-model.md): no URL
    fetching and bounded JSON bodies (guard.py), uploads checked as they stream (upload_guard.py),
    then each client's share of the queue and of the session slots (fair_share.py)."""
    upload_limits = UploadLimits(
        max_file_bytes=settings.max_upload_mb * MB,
        max_files=settings.max_gallery_images or MAX_GALLERY_IMAGES,
        max_request_bytes=settings.max_upload_request_mb * MB,
        client_bytes_per_window=settings.upload_mb_per_client_hour * MB,
    )
    fair = FairShareLimits(
        max_pending=settings.max_pending_per_client, max_new_sessions=settings.max_new_sessions_per_client
    )
    return [
        Middleware(RequestGuard, max_body_bytes=body_limit_bytes(settings.max_upload_mb)),
        Middleware(UploadGuard, limits=upload_limits),
        Middleware(FairShare, limits=fair),
    ]


def _header(engine: Engine) -> str:
    """Title, description, badges (model, device, retrieval model) and the notice banner. The banner
    sits in the header, above the tabs, so every tab shows it: why a fallback model was loaded
    (engine notices), and what a model's registry entry says about it (the bundled shapes demo:
    what it knows, and how to load a real model)."""
    models = LoadedModels.of(engine)
    badges = []
    if models.captioner is not None:
        badges.append(f"Model: {models.captioner.name}")
        badges.append(f"Device: {models.device}")
    if models.matcher is not None:
        badges.append(f"Retrieval: {models.matcher.name}")
    parts = "".join(f'<span class="badge">{html.escape(badge)}</span>' for badge in badges)
    entry = models.captioner or models.matcher
    if entry is not None and entry.name.startswith("tiny-random"):
        parts += '<span class="badge warn">Tiny random test model: its words are noise</span>'
    lines = list(models.notices)
    for loaded in (models.captioner, models.matcher):
        if loaded is not None and loaded.notice and loaded.notice not in lines:
            lines.append(loaded.notice)
    banner = ""
    if lines:
        text = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
        banner = f'<div class="notice" id="model-notice" role="status">{text}</div>'
    return (
        f'<div id="studio-header"><h1>BLIP-2 <span class="accent">Studio</span></h1>'
        f'<p class="lead">{DESCRIPTION}</p><div class="badges">{parts}</div>{banner}</div>'
    )


def build_demo(settings: Settings, engine: Engine) -> gr.Blocks:
    """The whole app for `engine`; `settings` sets the queue and the limits. Nothing is global."""
    context = TabContext(settings, engine, spaces=import_spaces(), examples=example_images())
    models = context.models
    with StudioBlocks(title=TITLE, analytics_enabled=False, delete_cache=delete_cache(settings)) as demo:
        gr.HTML(_header(engine), js_on_load=None)
        if models.captioner is None:
            gr.Markdown("**No captioning model is loaded**: only the Retrieval tab works in this app.")
        if models.matcher is None:
            gr.Markdown(
                "**No retrieval model is loaded** (`--retrieval-model none`): the Retrieval tab is off."
            )
        with gr.Tabs():
            for tab in TABS:
                tab.build(context)
    unbooked = unbooked_handlers(demo)
    if unbooked:
        raise RuntimeError(f"Model handlers wired without their GPU booking: {', '.join(unbooked)}.")
    demo.queue(api_open=False, max_size=settings.max_queue, default_concurrency_limit=settings.concurrency)
    return demo
