"""The Gradio Blocks: layout and wiring only; the work happens in `handlers.StudioHandlers`.

Public endpoints (api_name, parameters in order; see README, "API"):
  /caption, /answer, /chat (streaming), /index_gallery, /search_text, /search_image, /clear_gallery.
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
from ..generation import LIMITS
from ..prompts import MAX_QUESTION_CHARS
from .components import ResultGallery, image_files, named_choice, named_number, safe_image
from .guard import RequestGuard, body_limit_bytes
from .handlers import MAX_EXEMPLARS, MAX_QUERY_CHARS, MAX_TOP_K, StudioHandlers
from .health import HealthRoute, readiness
from .theme import CSS, studio_theme
from .zerogpu import import_spaces, wrap_handlers

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


MODEL_GROUP = "model"
DECODING_CHOICES = [("Beam search", "beam"), ("Nucleus sampling", "nucleus"), ("Greedy", "greedy")]
IMAGE_SOURCES = ["upload", "clipboard", "webcam"]


def example_images() -> list[str]:
    if not EXAMPLES_DIR.is_dir():
        return []
    suffixes = {".jpg", ".jpeg", ".png", ".webp"}
    return sorted(str(p) for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in suffixes)


def launch_options(
    settings: Settings, on_space: bool = False, engine: Engine | None = None
) -> dict[str, Any]:
    """Keyword arguments for `demo.launch()` (Gradio 6: theme and CSS go here, not to Blocks).

    With `engine`, GET /healthz answers 200 and what is loaded (see ui/health.py).
    """
    middleware = [Middleware(RequestGuard, max_body_bytes=body_limit_bytes(settings.max_upload_mb))]
    if engine is not None:
        middleware.insert(0, Middleware(HealthRoute, payload=readiness(engine)))
    return {
        "server_name": settings.server_name(on_space),
        "server_port": settings.port,
        "share": settings.share,
        "max_file_size": settings.max_upload_mb * 1024 * 1024,
        "enable_monitoring": False,
        "ssr_mode": False,
        "show_error": False,  # unexpected exceptions stay in the log; gr.Error text is still shown
        "mcp_server": False,
        "pwa": False,
        "theme": studio_theme(),
        "css": CSS,
        "allowed_paths": [str(EXAMPLES_DIR)] if EXAMPLES_DIR.is_dir() else None,
        "footer_links": ["api", "gradio"],
        # Sessions whose gr.State (chat, gallery) is kept; the least recently used is dropped.
        "state_session_capacity": settings.max_sessions,
        # No file=<URL> proxying; JSON bodies bounded (multipart uploads: max_file_size above).
        "app_kwargs": {"middleware": middleware},
    }


def _slider(
    name: str,
    value: float,
    label: str,
    step: float,
    info: str | None = None,
    off: dict[str, str] | None = None,
    **kwargs: Any,
) -> gr.Slider:
    """A slider over the documented bounds (generation.LIMITS), enforced for API callers too: a value
    outside them, or not a finite number, is refused with a sentence naming the parameter.

    `off`: knobs the backend cannot honour (Engine.unsupported_knobs): shown disabled, the reason
    as the slider's info; the API refuses them with the same reason."""
    low, high = LIMITS[name]
    if off and name in off:
        info, kwargs["interactive"] = off[name], False
    slider = gr.Slider(low, high, value=value, step=step, label=label, info=info, **kwargs)
    return named_number(slider, name)


def _header(engine: Engine) -> str:
    badges = []
    if engine.captioner is not None:
        badges.append(f"Model: {engine.captioner.entry.name}")
        badges.append(f"Device: {engine.captioner.device}")
    if engine.matcher is not None:
        badges.append(f"Retrieval: {engine.matcher.entry.name}")
    parts = "".join(f'<span class="badge">{html.escape(b)}</span>' for b in badges)
    entry = engine.captioner.entry if engine.captioner is not None else engine.matcher.entry  # type: ignore[union-attr]
    if entry.name.startswith("tiny-random"):
        parts += '<span class="badge warn">Tiny random test model: its words are noise</span>'
    # The banner sits in the header, above the tabs, so every tab shows it: why a fallback model
    # was loaded (engine.notices), and what a model's registry entry says about it (the bundled
    # shapes demo: what it knows, and how to load a real model).
    lines = [*engine.notices]
    for loaded in (engine.captioner, engine.matcher):
        notice = loaded.entry.notice if loaded is not None else None
        if notice and notice not in lines:
            lines.append(notice)
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
    h = StudioHandlers(engine, settings)
    wrap_handlers(h, import_spaces())  # ZeroGPU Spaces: book a GPU per call; elsewhere unchanged
    model_event: dict[str, Any] = {"concurrency_limit": settings.concurrency, "concurrency_id": MODEL_GROUP}
    ui_only: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    examples = example_images()
    templates = engine.captioner.entry.templates if engine.captioner is not None else None
    instruction_aware = bool(engine.captioner and engine.captioner.entry.family.instruction_aware)
    off = engine.unsupported_knobs()  # e.g. beam search with --backend vllm
    decoding_info = off.get("beam")

    state_ttl = settings.session_ttl_minutes * 60  # seconds a chat or gallery is kept unused

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=delete_cache(settings)) as demo:
        gr.HTML(_header(engine), js_on_load=None)
        if engine.captioner is None:
            gr.Markdown("**No captioning model is loaded**: only the Retrieval tab works in this app.")
        if engine.matcher is None:
            gr.Markdown(
                "**No retrieval model is loaded** (`--retrieval-model none`): the Retrieval tab is off."
            )

        with gr.Tabs():
            # ------------------------------------------------------------------ Caption
            with gr.Tab("Caption", id="caption", elem_id="tab-caption"):
                d = h.caption_defaults()
                # Created before the examples (which write into it when cached), shown further down.
                cap_output = gr.Textbox(
                    label="Captions (one per line)",
                    lines=3,
                    max_lines=12,
                    interactive=False,
                    buttons=["copy"],
                    elem_id="caption-output",
                    render=False,
                )
                with gr.Row(equal_height=False):
                    with gr.Column(scale=5, min_width=300):
                        cap_image = safe_image(
                            label="Image",
                            sources=IMAGE_SOURCES,
                            height=340,
                            elem_id="caption-image",
                        )
                        if examples:
                            cached = settings.cache_examples == "lazy"
                            gr.Examples(
                                [[p] for p in examples],
                                inputs=[cap_image],
                                outputs=[cap_output] if cached else None,
                                fn=h.example_caption if cached else None,
                                label="Example photos (public domain / CC0)",
                                examples_per_page=8,
                                elem_id="caption-examples",
                                api_visibility="private",
                                # Cached: the first click anywhere computes the default caption, then
                                # every visitor gets it at once. Never "eager" (Gradio's default on a
                                # Space), which would caption every photo before the app opens.
                                cache_examples=cached,
                                cache_mode="lazy" if cached else None,
                            )
                    with gr.Column(scale=6, min_width=300):
                        style_info = None
                        if templates is not None:
                            detailed = templates.caption_detailed or "(no prompt)"
                            style_info = (
                                f"Detailed sends “{detailed}” for you; custom continues your own text."
                            )
                        cap_style = named_choice(
                            gr.Radio(
                                [("Short", "short"), ("Detailed", "detailed"), ("Custom prompt", "custom")],
                                value="short",
                                label="Style",
                                info=style_info,
                            ),
                            "style",
                        )
                        cap_prompt = gr.Textbox(
                            value="",
                            label="Custom prompt",
                            placeholder="e.g. “A photograph of” — the caption continues this text",
                            max_length=MAX_QUESTION_CHARS,
                            visible=False,
                        )
                        cap_decoding = named_choice(
                            gr.Radio(
                                DECODING_CHOICES, value=d.decoding, label="Decoding", info=decoding_info
                            ),
                            "decoding",
                        )
                        with gr.Accordion("Advanced settings", open=False):
                            with gr.Row():
                                cap_beams = _slider(
                                    "num_beams", d.num_beams, "Beams", 1, "beam search only", off
                                )
                                cap_count = _slider(
                                    "num_captions",
                                    d.num_captions,
                                    "Number of captions",
                                    1,
                                    elem_id="caption-count",
                                )
                            with gr.Row():
                                cap_temperature = _slider(
                                    "temperature",
                                    d.temperature,
                                    "Temperature",
                                    0.01,
                                    "sampling only",
                                )
                                cap_top_p = _slider("top_p", d.top_p, "Top-p", 0.01, "sampling only")
                            with gr.Row():
                                cap_min_tokens = _slider(
                                    "min_new_tokens", d.min_new_tokens, "Min new tokens", 1
                                )
                                cap_max_tokens = _slider(
                                    "max_new_tokens", d.max_new_tokens, "Max new tokens", 1
                                )
                            with gr.Row():
                                cap_repetition = _slider(
                                    "repetition_penalty", d.repetition_penalty, "Repetition penalty", 0.05
                                )
                                cap_length = _slider(
                                    "length_penalty",
                                    d.length_penalty,
                                    "Length penalty",
                                    0.1,
                                    "beam search only",
                                    off,
                                )
                            with gr.Row():
                                cap_ngram = _slider(
                                    "no_repeat_ngram_size",
                                    d.no_repeat_ngram_size,
                                    "No-repeat n-gram size",
                                    1,
                                    "0 = off",
                                    off,
                                )
                                cap_seed = named_number(
                                    gr.Number(
                                        value=-1,
                                        label="Seed",
                                        info="-1 = random (sampling only)",
                                        precision=0,
                                        minimum=-1,
                                        maximum=2**32 - 1,
                                    ),
                                    "seed",
                                )
                        cap_button = gr.Button("Write caption", variant="primary", elem_id="caption-button")
                        cap_output.render()
                cap_button.click(
                    h.caption,
                    inputs=[
                        cap_image,
                        cap_style,
                        cap_prompt,
                        cap_decoding,
                        cap_beams,
                        cap_temperature,
                        cap_top_p,
                        cap_min_tokens,
                        cap_max_tokens,
                        cap_repetition,
                        cap_length,
                        cap_ngram,
                        cap_count,
                        cap_seed,
                    ],
                    outputs=cap_output,
                    api_name="caption",
                    api_description="Captions for one image, one per line.",
                    **model_event,
                )
                cap_style.change(
                    lambda s: gr.Textbox(visible=s == "custom"), cap_style, cap_prompt, **ui_only
                )

            # ------------------------------------------------------------------ Chat
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                c = h.chat_defaults()
                a = h.answer_defaults()
                chat_state = gr.State(None, time_to_live=state_ttl)
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=300):
                        chat_image = safe_image(
                            label="Image to talk about",
                            sources=IMAGE_SOURCES,
                            height=300,
                            elem_id="chat-image",
                        )
                        if examples:
                            gr.Examples(
                                [[p] for p in examples],
                                inputs=[chat_image],
                                label="Example photos",
                                examples_per_page=8,
                                api_visibility="private",
                            )
                        with gr.Accordion("Prompt: few-shot examples", open=False):
                            chat_instruction = gr.Textbox(
                                value="",
                                label="Instruction (InstructBLIP)",
                                placeholder="e.g. Answer like a museum guide.",
                                max_length=MAX_QUESTION_CHARS,
                                visible=instruction_aware,
                            )
                            chat_exemplars = gr.Dataframe(
                                value=[["", ""], ["", ""]],
                                headers=["question", "answer"],
                                datatype=["str", "str"],
                                type="array",
                                column_count=2,
                                interactive=True,
                                label=f"Question / answer pairs placed before the conversation (up to {MAX_EXEMPLARS})",
                                wrap=True,
                            )
                        with gr.Accordion("Decoding", open=False):
                            chat_decoding = named_choice(
                                gr.Radio(
                                    DECODING_CHOICES,
                                    value=c.decoding,
                                    label="Decoding",
                                    info=decoding_info or "beam search shows its answer only when done",
                                ),
                                "decoding",
                            )
                            chat_max_tokens = _slider("max_new_tokens", c.max_new_tokens, "Max new tokens", 1)
                            with gr.Row():
                                chat_temperature = _slider("temperature", c.temperature, "Temperature", 0.01)
                                chat_top_p = _slider("top_p", c.top_p, "Top-p", 0.01)
                            chat_repetition = _slider(
                                "repetition_penalty", c.repetition_penalty, "Repetition penalty", 0.05
                            )
                    with gr.Column(scale=6, min_width=300):
                        chatbot = gr.Chatbot(
                            label="Conversation",
                            height=420,
                            placeholder="Add an image, then ask about it. Each question is sent as "
                            "“Question: … Answer:” after the earlier turns, so the model keeps the context.",
                            buttons=["copy", "copy_all"],
                            render_markdown=False,  # answers are plain text: "*" or "~~" stay as typed
                            elem_id="chatbot",
                        )
                        with gr.Row(elem_id="chat-input-row"):
                            chat_message = gr.Textbox(
                                show_label=False,
                                placeholder="Ask a question about the image…",
                                max_length=MAX_QUESTION_CHARS,
                                scale=5,
                                container=False,
                                elem_id="chat-message",
                            )
                            chat_send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                        with gr.Row():
                            chat_regenerate = gr.Button("↻ Regenerate", size="sm", elem_id="chat-regenerate")
                            chat_clear = gr.Button("Clear chat", size="sm", elem_id="chat-clear")
                        # Carries the question from the box (cleared at once) to the streaming event.
                        chat_pending = gr.Textbox(visible=False)
                        with gr.Accordion("Quick answer: one question, no history", open=False):
                            qa_question = gr.Textbox(
                                label="Question",
                                placeholder="What colour is the car?",
                                max_length=MAX_QUESTION_CHARS,
                            )
                            with gr.Row():
                                qa_short = gr.Checkbox(
                                    value=True,
                                    label="Short answer",
                                    info="“Question: … Short answer:” (VQAv2 style)",
                                )
                                qa_decoding = named_choice(
                                    gr.Radio(
                                        DECODING_CHOICES,
                                        value=a.decoding,
                                        label="Decoding",
                                        info=decoding_info,
                                    ),
                                    "decoding",
                                )
                            with gr.Row():
                                qa_beams = _slider("num_beams", a.num_beams, "Beams", 1, off=off)
                                qa_max_tokens = _slider(
                                    "max_new_tokens", a.max_new_tokens, "Max new tokens", 1
                                )
                            qa_button = gr.Button("Answer", variant="primary", elem_id="answer-button")
                            qa_output = gr.Textbox(label="Answer", interactive=False, elem_id="answer-output")

                generation_inputs = [
                    chat_decoding,
                    chat_max_tokens,
                    chat_temperature,
                    chat_top_p,
                    chat_repetition,
                ]
                gr.on(
                    [chat_message.submit, chat_send.click],
                    h.show_question,
                    inputs=[chat_message, chat_state],
                    outputs=[chat_message, chat_pending, chatbot],
                    **ui_only,
                ).then(
                    h.chat,
                    inputs=[
                        chat_image,
                        chat_pending,
                        chat_exemplars,
                        chat_instruction,
                        *generation_inputs,
                        chat_state,
                    ],
                    outputs=[chatbot, chat_state],
                    api_name="chat",
                    api_description="Streams the chat (messages format) as the answer is written.",
                    show_progress="minimal",
                    **model_event,
                )
                chat_regenerate.click(
                    h.regenerate,
                    inputs=[chat_image, chat_exemplars, chat_instruction, *generation_inputs, chat_state],
                    outputs=[chatbot, chat_state],
                    api_visibility="private",
                    show_progress="minimal",
                    **model_event,
                )
                chat_clear.click(h.new_conversation, None, [chatbot, chat_state], **ui_only)
                chatbot.clear(h.new_conversation, None, [chatbot, chat_state], **ui_only)  # its trash icon
                chat_image.change(h.new_conversation, None, [chatbot, chat_state], **ui_only)
                gr.on(
                    [qa_button.click, qa_question.submit],
                    h.answer,
                    inputs=[
                        chat_image,
                        qa_question,
                        qa_short,
                        chat_instruction,
                        qa_decoding,
                        qa_beams,
                        qa_max_tokens,
                    ],
                    outputs=qa_output,
                    api_name="answer",
                    api_description="One visual question, answered without chat history.",
                    **model_event,
                )

            # ------------------------------------------------------------------ Retrieval
            with gr.Tab("Retrieval", id="retrieval", elem_id="tab-retrieval"):
                gallery_state = gr.State(None, time_to_live=state_ttl)
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=300):
                        ret_files = image_files(
                            file_types=["image"],
                            label=f"Images for your gallery (up to {h.gallery_limit})",
                            height=190,
                            elem_id="gallery-files",
                        )
                        ret_describe = gr.Checkbox(
                            value=False,
                            label="Also caption each image",
                            info="slower; captions appear in results",
                        )
                        with gr.Row():
                            ret_index = gr.Button("Index images", variant="primary", elem_id="index-button")
                            ret_clear = gr.Button("Clear gallery", variant="stop", elem_id="clear-gallery")
                        ret_status = gr.Textbox(
                            value="The gallery is empty.",
                            label="Gallery",
                            interactive=False,
                            elem_id="gallery-status",
                        )
                        ret_preview = ResultGallery(
                            label="Indexed images",
                            columns=4,
                            height=220,
                            interactive=False,
                            object_fit="cover",
                            elem_id="gallery-preview",
                        )
                    with gr.Column(scale=6, min_width=300):
                        with gr.Tabs():
                            with gr.Tab("Search by text", id="by-text"):
                                ret_query = gr.Textbox(
                                    label="Describe what you are looking for",
                                    placeholder="a cat sleeping on a sofa",
                                    max_length=MAX_QUERY_CHARS,
                                    elem_id="search-query",
                                )
                                with gr.Row():
                                    ret_top_k = named_number(
                                        gr.Slider(1, MAX_TOP_K, value=6, step=1, label="Results"), "top_k"
                                    )
                                    ret_rerank = gr.Checkbox(
                                        value=False, label="Re-rank with ITM", info="image-text matching head"
                                    )
                                    ret_rerank_k = named_number(
                                        gr.Slider(
                                            1,
                                            MAX_TOP_K,
                                            value=10,
                                            step=1,
                                            label="Re-rank top k",
                                            interactive=False,
                                        ),
                                        "rerank_k",
                                    )
                                ret_search = gr.Button("Search", variant="primary", elem_id="search-button")
                            with gr.Tab("Search by image", id="by-image"):
                                ret_query_image = safe_image(
                                    label="Example image",
                                    sources=IMAGE_SOURCES,
                                    height=200,
                                    elem_id="query-image",
                                )
                                ret_image_top_k = named_number(
                                    gr.Slider(1, MAX_TOP_K, value=6, step=1, label="Results"), "top_k"
                                )
                                ret_search_image = gr.Button(
                                    "Find similar images", variant="primary", elem_id="search-image-button"
                                )
                        gr.Markdown(
                            "**cosine**: raw ITC score (best of the 32 query tokens; image search: Chamfer "
                            "similarity). **p**: calibrated probability (softmax at BLIP-2's temperature 0.07 "
                            "over the best matches). **ITM**: match probability from the image-text matching "
                            "head, when re-ranked.",
                            elem_classes=["hint"],
                        )
                        ret_results = ResultGallery(
                            label="Results",
                            columns=3,
                            height="auto",
                            interactive=False,
                            object_fit="cover",
                            elem_id="search-results",
                        )

                ret_index.click(
                    h.index_gallery,
                    inputs=[ret_files, ret_describe, gallery_state],
                    outputs=[ret_status, gallery_state],
                    api_name="index_gallery",
                    api_description="Adds images to this session's gallery; returns a status sentence.",
                    **model_event,
                ).then(h.gallery_preview, gallery_state, ret_preview, **ui_only)
                ret_clear.click(
                    h.clear_gallery,
                    inputs=[gallery_state],
                    outputs=[ret_status, gallery_state],
                    api_name="clear_gallery",
                    api_description="Empties this session's gallery.",
                    concurrency_limit=None,  # no model work: never waits behind model requests
                ).then(lambda: ([], []), None, [ret_preview, ret_results], **ui_only)
                gr.on(
                    [ret_search.click, ret_query.submit],
                    h.search_text,
                    inputs=[ret_query, ret_top_k, ret_rerank, ret_rerank_k, gallery_state],
                    outputs=ret_results,
                    api_name="search_text",
                    api_description="Ranked gallery images for a text, with scores in each caption.",
                    **model_event,
                )
                ret_search_image.click(
                    h.search_image,
                    inputs=[ret_query_image, ret_image_top_k, gallery_state],
                    outputs=ret_results,
                    api_name="search_image",
                    api_description="Gallery images most similar to an example image, with scores.",
                    **model_event,
                )
                ret_rerank.change(lambda on: gr.Slider(interactive=on), ret_rerank, ret_rerank_k, **ui_only)

            # ------------------------------------------------------------------ Model
            with gr.Tab("Model", id="model", elem_id="tab-model") as model_tab:
                with gr.Row():
                    gr.Markdown(
                        "What is loaded, where, and in which precision each component really ended up "
                        "(read from the loaded weights, not from the request).",
                        elem_classes=["hint"],
                    )
                    model_refresh = gr.Button(
                        "Refresh", size="sm", scale=0, min_width=110, elem_id="model-refresh"
                    )
                model_report = gr.Markdown(h.model_report(), elem_id="model-report")
                model_refresh.click(h.model_report, None, model_report, **ui_only)
                model_tab.select(h.model_report, None, model_report, **ui_only)

    demo.queue(api_open=False, max_size=settings.max_queue, default_concurrency_limit=settings.concurrency)
    return demo
