"""Upload widgets that hand files to the project's safe decoder instead of decoding them.

`gr.Image` opens every upload with Pillow before a handler runs (and turns base64 payloads into
images), so an empty, random-bytes or decompression-bomb file fails inside Gradio with its generic
error, or costs memory before our limits apply. `safe_image()` is a `gr.Image` (same widget, same
API schema) whose preprocessing passes the file path or data URL through untouched: the handler
decodes it with `blip2_app.images.load_image` (via `Engine.prepare`), whose errors are specific.

Both also close two doors Gradio leaves open for API callers: a file payload sent without its
`meta` field skips Gradio's "was this uploaded?" check, and a payload whose path is an http(s) URL
is downloaded by the server. Here a path must lie in Gradio's upload folder (once the app runs)
and URLs are refused before anything is fetched.

`named_number` and `named_choice` give sliders, numbers and radios a refusal that names the API
parameter ("num_beams must be between 1 and 10; got 1000.") instead of Gradio's generic text, and
turn wrong types (a string, NaN, infinity) into that sentence instead of an internal error.

`ResultGallery` writes result images atomically (Gradio rewrites a shared file in place).

`SafeSketchpad` is a sketchpad (Gradio's `ImageEditor` with no upload source) that hands the handler the path of the
uploaded composite only, checked like `SafeImage`'s, instead of decoding background, layers and
composite with Pillow; the handler decodes it with the safe decoder (ui/tabs/drawing.py). Its
`accept_blobs` server function (which stores any caller's bytes under any id, with no limit) is not
offered.

`SafeImage` and `ImageFiles` are subclasses, not patched instances: Gradio rebuilds a component
from its class for a session whenever an event returns an update for it (clicking an example
does), and a patched instance would then turn back into a plain, decoding `gr.Image`. They are
"template" components (`is_template`), so the browser shows Gradio's own Image and File widgets.
Gradio's component metaclass would write a `.pyi` stub next to this file for each new class; that
is switched off while they are defined.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from gradio import component_meta
from gradio.components.image_editor import EditorData
from gradio.context import LocalContext
from gradio.data_classes import FileData, GradioRootModel
from gradio.processing_utils import encode_pil_to_bytes, hash_bytes
from gradio.utils import NamedString, get_upload_folder, is_in_or_equal
from gradio_client.utils import is_http_url_like
from PIL import Image

from ..images import is_data_url
from .errors import user_error

NOT_UPLOADED = (
    "This file was not uploaded to this server: send the image itself "
    "(in gradio_client, handle_file(path)), not a path on the server."
)
NO_URLS = "Image URLs are not fetched by this server: download the image and upload the file instead."


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: float) -> str:
    """1000000 rather than 1e+06: the number as the caller typed it, where it is whole."""
    if float(value).is_integer() and abs(value) < 1e18:
        return str(int(value))
    return f"{value:g}"


def _uploaded_path(path: str) -> str:
    """`path` if it is a file Gradio received (or the app is not running, e.g. in unit tests)."""
    if is_http_url_like(path):
        raise user_error(NO_URLS)
    blocks = LocalContext.blocks.get(None)
    if blocks is None or not getattr(blocks, "has_launched", False):
        return path  # not serving (unit tests, scripts): the same exemption as Gradio's own check
    if "\0" in path or not is_in_or_equal(os.path.realpath(path), os.path.realpath(get_upload_folder())):
        raise user_error(NOT_UPLOADED)
    return path


class FilesOrDataUrls(GradioRootModel):
    """`ImageList`'s payload: uploaded files and `data:` URL strings, in any mix."""

    root: list[FileData | str]


def _file_path(payload: FileData) -> str | None:
    """A payload's path: a `data:` URL as it is (load_image checks the size in its header before
    decoding), else a file Gradio received; None when it has no path."""
    if not payload.path:
        return None
    if is_data_url(payload.path):
        return payload.path
    return _uploaded_path(str(payload.path))


def _data_url_or_upload(item: FileData | str) -> str:
    if isinstance(item, FileData):
        return _uploaded_path(str(item.path))
    if is_data_url(item):
        return item  # load_image checks the size in its header before decoding
    if is_http_url_like(item.strip()):
        raise user_error(NO_URLS)
    raise user_error(f"Send each image as a file (handle_file) or a data: URL; got {_short(item)}.")


@contextlib.contextmanager
def _no_pyi_stubs() -> Iterator[None]:
    original = component_meta.create_or_modify_pyi
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        yield
    finally:
        component_meta.create_or_modify_pyi = original


with _no_pyi_stubs():

    class SafeImage(gr.Image):
        """A `gr.Image` whose value reaches the handler as a path (or data URL), never decoded."""

        is_template = True  # shown by Gradio's own Image widget

        def preprocess(self, payload: FileData | None) -> str | None:  # type: ignore[override]
            if payload is None:
                return None
            if payload.path:
                return _file_path(payload)
            if payload.url and payload.url.startswith("data:"):
                return payload.url
            if payload.url:
                raise user_error(NO_URLS)
            return None

        async def async_move_resource_to_block_cache(self, url_or_file_path: Any) -> str | None:
            # Gradio moves input files into its cache before preprocess, downloading http(s) paths.
            if isinstance(url_or_file_path, str) and is_http_url_like(url_or_file_path):
                raise user_error(NO_URLS)
            return await super().async_move_resource_to_block_cache(url_or_file_path)

    class ImageFiles(gr.File):
        """Several image files as paths, each decoded (and reported on) by the handler."""

        is_template = True  # shown by Gradio's own File widget

        def _process_single_file(self, file_data: FileData) -> Any:
            return NamedString(_uploaded_path(str(file_data.path)))

        async def async_move_resource_to_block_cache(self, url_or_file_path: Any) -> str | None:
            if isinstance(url_or_file_path, str) and is_http_url_like(url_or_file_path):
                raise user_error(NO_URLS)
            return await super().async_move_resource_to_block_cache(url_or_file_path)

    class ImageList(ImageFiles):
        """`ImageFiles` that also takes `data:` URLs (strings) for images, as MCP clients send them.

        Gradio 6.31's MCP server cannot pass a list of files: it turns `data:` strings into files
        only at fixed places (not list items), and the `$ref` in a file list's schema breaks the
        SDK's argument check. So this input is described as a list of strings, and takes uploaded
        files (gradio_client's `handle_file`) and `data:` URLs alike; URLs are refused as everywhere.
        """

        is_template = True

        def __init__(self, **kwargs: Any):
            super().__init__(file_count="multiple", type="filepath", **kwargs)
            self.data_model = FilesOrDataUrls

        def api_info(self) -> dict[str, Any]:
            return {
                "type": "array",
                "items": {
                    "type": "string",
                    "description": "an image as a data: URL (base64) or an uploaded file",
                },
            }

        def preprocess(self, payload: Any) -> list[str] | None:
            if payload is None:
                return None
            return [_data_url_or_upload(item) for item in getattr(payload, "root", payload)]

    class ResultGallery(gr.Gallery):
        """A `gr.Gallery` that writes the PIL images it shows atomically.

        Gradio saves each image under a hash of its bytes by rewriting the file in place, so when
        two visitors get the same picture at once (both galleries hold an example photo), one can
        download it while the other's request truncates and rewrites it: a broken image. Here a
        new file is written under a temporary name and renamed into place, and an existing one is
        only touched (so Gradio's delete_cache, which ages files by ctime, keeps it).
        """

        is_template = True  # shown by Gradio's own Gallery widget

        def postprocess(self, value: Any) -> Any:
            if isinstance(value, list):
                value = [self._saved(item) for item in value]
            return super().postprocess(value)

        def _saved(self, item: Any) -> Any:
            image, caption = item if isinstance(item, (tuple, list)) else (item, None)
            if not isinstance(image, Image.Image):
                return item
            data = encode_pil_to_bytes(image, self.format)
            folder = Path(self.GRADIO_CACHE) / hash_bytes(data)
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"image.{self.format}"
            if target.exists():
                with contextlib.suppress(OSError):
                    os.utime(target)
            else:
                fd, staging = tempfile.mkstemp(dir=folder, prefix=".image.")
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(staging, target)
            return (str(target), caption) if isinstance(item, (tuple, list)) else str(target)

    class SafeSketchpad(gr.ImageEditor):
        """A sketchpad (an ImageEditor with no upload source) whose value reaches the handler as the
        path of its composite, never decoded."""

        is_template = True  # shown by Gradio's own ImageEditor widget

        def preprocess(self, payload: EditorData | None) -> str | None:  # type: ignore[override]
            if payload is None or payload.composite is None:
                return None  # nothing drawn (or only blobs by id, which this component never keeps)
            composite = payload.composite
            if composite.path:
                return _file_path(composite)
            if composite.url:
                raise user_error(NO_URLS)
            return None

        def accept_blobs(self, data: Any) -> None:  # not a @server function here: see the module doc
            raise user_error("This drawing component takes uploaded files only.")

        async def async_move_resource_to_block_cache(self, url_or_file_path: Any) -> str | None:
            if isinstance(url_or_file_path, str) and is_http_url_like(url_or_file_path):
                raise user_error(NO_URLS)
            return await super().async_move_resource_to_block_cache(url_or_file_path)


def safe_image(**kwargs: Any) -> SafeImage:
    """An image input whose value reaches the handler as a path (or data URL), never decoded."""
    return SafeImage(type="filepath", **kwargs)


def image_files(**kwargs: Any) -> ImageFiles:
    """Several image uploads as paths. `gr.File(file_types=["image"])` rejects the whole batch with
    one generic sentence when a single file has an unusual extension; here the file types only
    guide the browser's file picker and each file is decoded, and reported on, by itself."""
    return ImageFiles(file_count="multiple", type="filepath", **kwargs)


def image_list(**kwargs: Any) -> ImageList:
    """Several images as paths or `data:` URLs: the input of a tool agents call (see `ImageList`)."""
    return ImageList(**kwargs)


def named_number(component: gr.Slider | gr.Number, name: str) -> gr.Slider | gr.Number:
    """Refuse a value outside [minimum, maximum], or not a finite number, naming `name`."""
    original = component.preprocess
    low, high = component.minimum, component.maximum

    def preprocess(self: Any, payload: Any) -> Any:
        if payload is None:
            return None
        if isinstance(payload, bool) or not isinstance(payload, (int, float)):
            raise user_error(f"{name} must be a number; got {_short(payload)}.")
        if not math.isfinite(payload):
            raise user_error(f"{name} must be a finite number; got {payload}.")
        if getattr(self, "precision", None) == 0 and payload != int(payload):
            # gr.Number(precision=0) would round 1.5 to 2 without a word.
            raise user_error(f"{name} must be a whole number; got {_number(payload)}.")
        if (low is not None and payload < low) or (high is not None and payload > high):
            if low is not None and high is not None:
                raise user_error(
                    f"{name} must be between {_number(low)} and {_number(high)}; got {_number(payload)}."
                )
            if low is not None:
                raise user_error(f"{name} must be at least {_number(low)}; got {_number(payload)}.")
            if high is not None:
                raise user_error(f"{name} must be at most {_number(high)}; got {_number(payload)}.")
        return original(payload)

    component.preprocess = types.MethodType(preprocess, component)  # type: ignore[method-assign]
    return component


def named_choice(component: gr.Radio, name: str) -> gr.Radio:
    """Refuse a value that is not one of the choices, naming `name` and listing the choices."""
    original = component.preprocess

    def preprocess(self: Any, payload: Any) -> Any:
        values = [value for _, value in self.choices]
        if payload is not None and payload not in values:
            listed = ", ".join(str(value) for value in values)
            raise user_error(f"{name} must be one of {listed}; got {_short(payload)}.")
        return original(payload)

    component.preprocess = types.MethodType(preprocess, component)  # type: ignore[method-assign]
    return component
