"""Upload widgets that hand files to the project's safe decoder instead of decoding them.

`gr.Image` opens every upload with Pillow before a handler runs (and turns base64 payloads into
images), so an empty, random-bytes or decompression-bomb file fails inside Gradio with its generic
error, or costs memory before our limits apply. `safe_image()` is a `gr.Image` (same widget, same
API schema) whose preprocessing passes the file path or data URL through untouched: the handler
decodes it with `blip2_app.images.load_image` (via `Engine.prepare`), whose errors are specific.

The widgets are plain Gradio components with one method replaced on the instance: a subclass
would make Gradio write a `.pyi` stub next to this file at import time.
"""

from __future__ import annotations

import types
from typing import Any

import gradio as gr
from gradio.data_classes import FileData
from gradio.utils import NamedString


def _image_payload(self: gr.Image, payload: FileData | None) -> str | None:
    if payload is None:
        return None
    if payload.path:
        return str(payload.path)
    if payload.url and payload.url.startswith("data:"):
        return payload.url  # load_image checks the size in its header before decoding
    return None


def _file_payload(self: gr.File, f: FileData) -> Any:
    return NamedString(f.path)


def safe_image(**kwargs: Any) -> gr.Image:
    """A `gr.Image` whose value reaches the handler as a path (or data URL), never decoded."""
    image = gr.Image(type="filepath", **kwargs)
    image.preprocess = types.MethodType(_image_payload, image)  # type: ignore[method-assign]
    return image


def image_files(**kwargs: Any) -> gr.File:
    """Several image uploads as paths. `gr.File(file_types=["image"])` rejects the whole batch with
    one generic sentence when a single file has an unusual extension; here the file types only
    guide the browser's file picker and each file is decoded, and reported on, by itself."""
    files = gr.File(file_count="multiple", type="filepath", **kwargs)
    files._process_single_file = types.MethodType(_file_payload, files)  # type: ignore[method-assign]
    return files
