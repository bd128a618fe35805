"""The Model tab: what is loaded and how, read off the live engine (`Engine.info()`)."""

from __future__ import annotations

from typing import Any

from ..config import Settings
from ..engine import Engine, EngineInfo
from ..weight_cache import WeightCache
from .sessions import MAX_GALLERY_IMAGES

COMPONENT_NAMES = {
    "vision": "Vision encoder (ViT)",
    "qformer": "Q-Former + projections",
    "llm": "Language model",
}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if unit == "" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} B"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _component_rows(components: dict[str, Any]) -> list[str]:
    rows = [
        "| component | requested | weights stored as | linear layers | parameters | size |",
        "|---|---|---|---|---:|---:|",
    ]
    for key, part in components.items():
        dtypes = ", ".join(f"{name} × {count}" for name, count in sorted(part.get("dtypes", {}).items()))
        layers = ", ".join(
            f"{name} × {count}" for name, count in sorted(part.get("linear_layers", {}).items())
        )
        rows.append(
            f"| {_cell(COMPONENT_NAMES.get(key, key))} | {_cell(part.get('requested', '?'))} | {_cell(dtypes or '-')} "
            f"| {_cell(layers or '-')} | {human_count(part.get('parameters', 0))} | {human_bytes(part.get('bytes', 0))} |"
        )
    return rows


INT8_KERNEL_NAMES = {"onednn": "oneDNN", "fbgemm": "fbgemm"}


def _int8_kernels_row(kernels: str) -> list[str]:
    return (
        [f"| int8 kernels (dynamic-int8) | {INT8_KERNEL_NAMES.get(kernels, _cell(kernels))} |"]
        if kernels
        else []
    )


def _packing_row(packing: dict[str, Any] | None) -> list[str]:
    """Where packing the dynamic-int8 layers for the int8 kernels stands (packing.py)."""
    if not packing:
        return []
    when = "in the background" if packing["background"] else "before serving"
    if packing["error"]:
        state = (
            f"stopped after {packing['packed']} of {packing['layers']} layers ({_cell(packing['error'])}); "
            "the others run unpacked"
        )
    elif packing["seconds"] is None:
        state = (
            f"{packing['packed']} of {packing['layers']} layers so far, {when}; until it ends, "
            "requests also run int8 layers not yet packed (the same weights, slower)"
        )
    else:
        state = f"all {packing['layers']} layers, in {packing['seconds']:.1f} s {when}"
    return [f"| int8 packing | {state} |"]


def _model_section(
    title: str, report: dict[str, Any] | None, description: str, extra: list[str]
) -> list[str]:
    if report is None:
        return [f"### {title}", "", "Not loaded.", ""]
    lines = [
        f"### {title}: `{_cell(report['name'])}`",
        "",
        _cell(description),
        "",
        "| property | value |",
        "|---|---|",
        f"| checkpoint | `{_cell(report.get('checkpoint', '?'))}` |",
        f"| family | {_cell(report.get('family', '?'))} |",
        *extra,
        f"| device | {_cell(report.get('device', '?'))} |",
        *_int8_kernels_row(report.get("int8_kernels", "")),
        *_packing_row(report.get("packing")),
        f"| memory footprint | {human_bytes(report.get('memory_bytes', 0))} |",
        f"| load time | {report.get('load_seconds', 0):.2f} s |",
        "",
        *_component_rows(report.get("components", {})),
        "",
    ]
    notes = report.get("notes") or []
    if notes:
        lines += ["**Notes**", "", *[f"- {_cell(n)}" for n in notes], ""]
    return lines


def _server_section(report: dict[str, Any], description: str) -> list[str]:
    """`--backend vllm`: the server's health, model and latency, read when the tab is shown."""
    server = report.get("server", {})
    healthy = bool(server.get("healthy"))
    latency = server.get("latency_ms")
    lines = [
        f"### Captioning and chat: `{_cell(report['name'])}` on a vLLM server",
        "",
        _cell(description),
        "",
        "| property | value |",
        "|---|---|",
        f"| backend | vLLM (OpenAI-compatible API) at `{_cell(server.get('url', '?'))}` |",
        f"| server health | {'✅ healthy' if healthy else '❌ ' + _cell(server.get('detail') or 'not answering')} |",
        f"| served model | `{_cell(server.get('model') or '-')}` ({_cell(server.get('root') or '-')}) |",
        f"| context length (server) | {_cell(server.get('max_model_len') or '-')} tokens |",
        f"| round trip (GET /health) | {f'{latency:.0f} ms' if latency is not None else '-'} |",
        f"| checkpoint (prompts, tokenizer) | `{_cell(report.get('checkpoint', '?'))}` |",
        f"| family | {_cell(report.get('family', '?'))} |",
        f"| not supported by this backend | {_cell(', '.join(report.get('unsupported', [])) or '-')} "
        "(beam search; shown disabled) |",
        "",
    ]
    notes = report.get("notes") or []
    if notes:
        lines += ["**Notes**", "", *[f"- {_cell(n)}" for n in notes], ""]
    return lines


def _weight_cache_line(settings: Settings) -> str:
    cache = WeightCache.from_setting(settings.weight_cache)
    if cache is None:
        return "Off (`--weight-cache off`): every start quantizes the checkpoint again."
    return (
        f"Quantized models are kept in `{cache.root}` ({human_bytes(cache.size_bytes())} now), so the "
        "next start reads them instead of quantizing; the notes above say whether this start did."
    )


def model_report_markdown(info: EngineInfo, engine: Engine, settings: Settings) -> str:
    lines: list[str] = []
    text = engine.text
    description = text.entry.description if text is not None else ""
    if info.text is not None and info.text["backend"] != "local":
        lines += _server_section(info.text, description)
    else:
        lines += _model_section(
            "Captioning and chat",
            info.text,
            description,
            [
                f"| instruction-aware (InstructBLIP) | {'yes' if text.entry.family.instruction_aware else 'no'} |"
            ]
            if text is not None
            else [],
        )
    matcher = engine.matcher
    lines += _model_section(
        "Retrieval (ITC / ITM)", info.matcher, matcher.entry.description if matcher else "", []
    )
    cache = info.cache or {}
    # Only the configured size: live counts (entries, hits) are shared by all visitors, so they
    # would tell whether someone's image was processed recently (threat model, finding 10).
    lines += [
        "### Vision-feature cache",
        "",
        "Image features are computed once per image (keyed by its content) and reused by every prompt.",
        "",
        "| holds at most | size at most |",
        "|---:|---:|",
        f"| {cache.get('max_entries', 0)} images | {human_bytes(cache.get('max_bytes', 0))} |",
        "",
        "### Weight cache",
        "",
        _weight_cache_line(settings),
        "",
        "### Server limits",
        "",
        "| limit | value |",
        "|---|---|",
        f"| model requests at once | {settings.concurrency} |",
        f"| waiting requests at most | {settings.max_queue} |",
        f"| largest upload | {settings.max_upload_mb} MB |",
        f"| largest image | {settings.max_image_pixels / 1e6:.0f} megapixels |",
        f"| images per gallery | {settings.max_gallery_images or MAX_GALLERY_IMAGES} |",
        f"| galleries in memory (all visitors) | {settings.max_galleries} |",
        f"| chat turns kept | {settings.max_chat_turns} |",
        f"| sessions kept | {settings.max_sessions}, each for {settings.session_ttl_minutes:g} min unused |",
        f"| uploads kept on disk | {settings.upload_ttl_minutes:g} min |",
    ]
    return "\n".join(lines)
