"""Safe image decoding: every input the app accepts becomes one upright, 8-bit RGB image or an
``ImageDecodeError`` whose text is a single sentence fit to show to the person who sent it.

Uploads, base64 data URLs from the API, CLI paths and arrays all pass through ``load_image``,
so the limits below hold on every path (Gradio's own size limit only covers multipart uploads).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import re
import stat
import struct
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import UserFacingError

__all__ = [
    "ImageDecodeError",
    "ImageLimits",
    "image_content_hash",
    "load_image",
    "load_images",
]


class ImageDecodeError(UserFacingError, ValueError):
    """The input cannot become an image; ``str(error)`` is one sentence for the end user."""


@dataclass(frozen=True)
class ImageLimits:
    """Resource limits for one decoded image.

    ``max_pixels`` is checked against the header before any pixel buffer exists. Pillow's own
    process-wide guard (``Image.MAX_IMAGE_PIXELS``, lowered below) still applies, so a value
    above it only takes effect if that guard is raised as well.
    """

    max_pixels: int = 40_000_000
    max_bytes: int = 25 * 1024 * 1024
    # BLIP-2 resizes to 224-364 px anyway; bounding the long side bounds every later copy.
    max_side: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_bytes", "max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageLimits.{name} must be a positive integer, got {value!r}.")


DEFAULT_LIMITS = ImageLimits()

# Gradio's gr.Image decodes uploads with Pillow before any handler runs, so the only way to
# protect that path is Pillow's global guard. Lower it (never raise it) to our default limit:
# Pillow then refuses anything over twice that at open time, and warns above it (which
# load_image turns into an error).
Image.MAX_IMAGE_PIXELS = min(Image.MAX_IMAGE_PIXELS or DEFAULT_LIMITS.max_pixels, DEFAULT_LIMITS.max_pixels)

# Exceptions Pillow's plugins raise on malformed data. Pillow itself treats several of them
# as "not this format" while identifying files, so hostile input can surface any of them.
_PILLOW_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_WHITE = (255, 255, 255)
_CANNOT_READ = "This file is {}, which we cannot read; please convert it to JPEG or PNG."
# What a public demo needs: photos (JPEG, and MPO from cameras), screenshots and drawings (PNG,
# WebP, GIF, BMP) and scans (TIFF). Pillow's other decoders (JPEG 2000, ICO, PSD, TGA, ...) never
# run: a 553-byte JPEG 2000 declaring 6000 x 6000 cost 3.7 s and 640 MB before.
_DECODERS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # Pillow's JPEG decoder also opens MPO
ACCEPTED_FORMATS = (*_DECODERS, "MPO")
ACCEPTED_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
# A baseline JPEG of one flat colour holds about 85 pixels a byte, a progressive one about 250;
# a file declaring far more pixels than its bytes can encode is truncated or forged.
MAX_JPEG_PIXELS_PER_BYTE = 2000
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_FORMAT_NAMES = {"JPEG2000": "JPEG 2000", "ICO": "Windows icon", "PSD": "Photoshop", "TGA": "Targa"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_SNIFF = (  # magic number -> name, only to name the format in messages before Pillow has
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def is_data_url(value: Any) -> bool:
    """Whether `value` is an image sent inline as a `data:` URL (decoded by `load_image`)."""
    return isinstance(value, str) and value.lstrip()[:5].lower() == "data:"


def load_image(source: Any, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode ``source`` into a new upright RGB image no larger than ``limits.max_side``.

    ``source``: a path (str / PathLike), bytes, a ``data:image/...;base64,`` string, a PIL
    image, a numpy array (HxW, HxWx1/3/4; uint8, uint16, bool or float in [0, 1]) or a Gradio
    file dict with a ``"path"`` key. Raises ``ImageDecodeError`` for anything else.
    """
    if source is None or (isinstance(source, str) and not source.strip()):
        raise ImageDecodeError("No image was provided.")
    if isinstance(source, dict):
        path = source.get("path")
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ImageDecodeError("This input has no 'path' to an image file.")
        return load_image(path, limits)
    if isinstance(source, np.ndarray):
        return _finish(_from_array(source, limits), limits)
    # catch_warnings is process-global before Python 3.14: a concurrent call can drop or leave
    # the bomb filter for a moment; the explicit size checks below do not depend on it.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # "Corrupt EXIF data" and similar metadata warnings: the image is still usable.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        if isinstance(source, Image.Image):
            _check_pixels(source.size, limits)
            _decode(source, source.format or "image", limits)  # may be a lazy Image.open result
            return _finish(source, limits)
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        elif is_data_url(source):
            data = _data_url_bytes(source.strip(), limits)
        elif isinstance(source, str) and _URL_RE.match(source):
            # Fetching would make the server an open proxy (DESIGN.md security notes).
            raise ImageDecodeError("Image URLs are not supported; please upload the file instead.")
        elif isinstance(source, (str, os.PathLike)):
            data = _read_file(Path(source), limits)
        else:
            raise ImageDecodeError(f"This input is not an image (got {type(source).__name__}).")
        image = _open(data, limits)
        try:
            return _finish(image, limits)
        finally:
            image.close()


def load_images(sources: Iterable[Any], limits: ImageLimits = DEFAULT_LIMITS) -> list[Image.Image]:
    """``load_image`` for each source; the first failure propagates with its position noted."""
    images = []
    for index, source in enumerate(sources):
        try:
            images.append(load_image(source, limits))
        except ImageDecodeError as error:
            _add_note(error, f"while loading image number {index + 1}")
            raise
    return images


def _add_note(error: BaseException, note: str) -> None:
    """`BaseException.add_note`, which Python 3.10 (still supported, see pyproject.toml) lacks."""
    if sys.version_info >= (3, 11):
        error.add_note(note)
    else:  # the same list (3.10 just does not print it); setattr: typeshed declares it from 3.11 on
        setattr(error, "__notes__", [*getattr(error, "__notes__", []), note])  # noqa: B010


def image_content_hash(image: Image.Image) -> str:
    """SHA-256 over mode, size and pixels: a cache key that ignores file name, format and
    metadata. Pass the output of ``load_image`` so equal pictures compare equal."""
    digest = hashlib.sha256(f"{image.mode}\0{image.width}x{image.height}\0".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- raw bytes


def _human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    if count < 1024 * 1024:
        return f"{round(count / 1024, 1):g} KB"
    return f"{round(count / (1024 * 1024), 1):g} MB"


def _too_many_bytes(count: int, limits: ImageLimits) -> ImageDecodeError:
    return ImageDecodeError(
        f"This file is too large: {_human_bytes(count)}, the limit is {_human_bytes(limits.max_bytes)}."
    )


def _read_file(path: Path, limits: ImageLimits) -> bytes:
    if "\0" in str(path):  # os.stat would raise a bare ValueError for this API-supplied string
        raise ImageDecodeError("The image file could not be found.")
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ImageDecodeError("This path is a folder, not an image file.")
        # Refuse by size before reading a byte; special files report 0 and rely on the bounded read.
        if stat.S_ISREG(info.st_mode) and info.st_size > limits.max_bytes:
            raise _too_many_bytes(info.st_size, limits)
        with open(path, "rb") as handle:
            data = handle.read(limits.max_bytes + 1)
    except FileNotFoundError as error:
        raise ImageDecodeError("The image file could not be found.") from error
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ImageDecodeError(f"The image file could not be read ({reason}).") from error
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(len(data), limits)
    return data


def _data_url_bytes(url: str, limits: ImageLimits) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ImageDecodeError("This data URL is not a base64-encoded image.")
    # Estimate before decoding so an oversized payload never gets a second, decoded copy.
    if len(payload) * 3 // 4 > limits.max_bytes + 3:
        raise _too_many_bytes(len(payload) * 3 // 4, limits)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageDecodeError("This data URL contains invalid base64 data.") from error


def _sniff_format(data: bytes) -> str | None:
    for magic, name in _SNIFF:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _other_format(data: bytes) -> str | None:
    """The sentence for an image in a format Pillow knows but the app does not accept, or None.
    Only the header is parsed (to name the format); no pixel of it is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            name = image.format
    except Exception:  # any plugin's parse error: not an image we can name
        return None
    if not name or name in ACCEPTED_FORMATS:
        return None
    return f"This file is a {_FORMAT_NAMES.get(name, name)} image, which this app does not accept; please send {ACCEPTED_NAMES}."


def _check_density(image: Image.Image, size_bytes: int) -> None:
    if image.format not in ("JPEG", "MPO"):
        return  # lossless formats compress flat areas without a useful bound (WebP: 16k x 16k in bytes)
    width, height = image.size
    if width * height > MAX_JPEG_PIXELS_PER_BYTE * size_bytes:
        raise ImageDecodeError(
            f"This JPEG declares {width} x {height} pixels but holds only {_human_bytes(size_bytes)}: "
            "it is truncated or damaged."
        )


def _unidentified(data: bytes) -> str:
    """Name what an unreadable file most likely is, without trusting its extension."""
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in _HEIF_BRANDS:
            return _CANNOT_READ.format("a HEIC/HEIF image")
        if brand in (b"avif", b"avis"):
            return _CANNOT_READ.format("an AVIF image")
    if data.startswith(b"%PDF"):
        return "This file is a PDF document, not an image."
    head = data[:2048]
    if b"\0" not in head:
        text: str | None
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as error:
            # A multi-byte character cut at the 2048-byte boundary is still text.
            text = head[: error.start].decode("utf-8") if error.start >= len(head) - 3 else None
        if text is not None:
            if "<svg" in text.lower():
                return _CANNOT_READ.format("an SVG drawing")
            return "This file is a text file, not an image."
    return "This file is not a recognised image format."


# ---------------------------------------------------------------------------- decoding


def _too_many_pixels(width: int, height: int, limits: ImageLimits) -> ImageDecodeError:
    return ImageDecodeError(
        f"This image is too large: {width} x {height} pixels, the limit is {limits.max_pixels:,} pixels."
    )


def _check_pixels(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"This image has no pixels ({width} x {height}).")
    if width * height > limits.max_pixels:
        raise _too_many_pixels(width, height, limits)


def _pillow_bomb(error: BaseException, data: bytes, limits: ImageLimits) -> ImageDecodeError:
    """Pillow's guard fired before we saw the size; recover the numbers for the message."""
    limit = min(limits.max_pixels, Image.MAX_IMAGE_PIXELS or limits.max_pixels)
    match = re.search(r"\((\d+) pixels\)", str(error))
    pixels = int(match.group(1)) if match else None
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        if pixels is None or width * height == pixels:
            return ImageDecodeError(
                f"This image is too large: {width} x {height} pixels, the limit is {limit:,} pixels."
            )
    if pixels is None:
        return ImageDecodeError(f"This image is too large, the limit is {limit:,} pixels.")
    return ImageDecodeError(f"This image is too large: {pixels:,} pixels, the limit is {limit:,} pixels.")


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Identify from the header, check limits, then decode the first frame's pixels."""
    if not data:
        raise ImageDecodeError("This file is empty.")
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(len(data), limits)
    name = _sniff_format(data) or "image"
    try:
        image = Image.open(io.BytesIO(data), formats=_DECODERS)  # lazy: reads the header only
    except _BOMB_ERRORS as error:
        raise _pillow_bomb(error, data, limits) from error
    except UnidentifiedImageError as error:
        raise ImageDecodeError(_other_format(data) or _unidentified(data)) from error
    except ValueError as error:
        if "too large" in str(error).lower():  # e.g. PNG text chunk that inflates without bound
            raise ImageDecodeError(
                f"This file is not an image we can read (oversized {name} metadata)."
            ) from error
        raise ImageDecodeError(f"This file is not an image we can read (damaged {name} header).") from error
    except _PILLOW_ERRORS as error:
        raise ImageDecodeError(f"This file is not an image we can read (damaged {name} header).") from error
    try:
        _check_pixels(image.size, limits)
        _check_density(image, len(data))
        _decode(image, image.format or name, limits, shrink=True)
    except BaseException:
        image.close()
        raise
    return image


def _decode(image: Image.Image, name: str, limits: ImageLimits, *, shrink: bool = False) -> None:
    # Only the current (first) frame is decoded; n_frames/seek would walk every frame.
    try:
        target = _fit(image.size, limits.max_side)
        if shrink and target != image.size:
            # JPEG can decode at 1/2, 1/4 or 1/8 scale: far less memory for photos we shrink anyway.
            image.draft(None, target)
        image.load()
    except _BOMB_ERRORS as error:
        raise _pillow_bomb(error, b"", limits) from error
    except _PILLOW_ERRORS as error:
        # LOAD_TRUNCATED_IMAGES stays False, so missing data raises here instead of hanging
        # or returning grey padding.
        kind = "truncated" if isinstance(error, EOFError) or "truncated" in str(error) else "corrupt"
        detail = f"truncated {name}" if kind == "truncated" else f"corrupt {name} data"
        raise ImageDecodeError(f"This file is not an image we can read ({detail}).") from error
    _check_pixels(image.size, limits)  # a GIF frame can be larger than its header claimed


def _finish(image: Image.Image, limits: ImageLimits) -> Image.Image:
    """Upright, RGB, bounded size; always a new image so callers may mutate it freely."""
    result = _to_rgb(_upright(image), limits.max_side)
    target = _fit(result.size, limits.max_side)
    if target != result.size:
        result = result.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if result is image:
        result = result.copy()
    result.info.clear()  # EXIF / ICC no longer describe the converted pixels
    return result


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    longest = max(width, height)
    if longest <= max_side:
        return size
    scale = max_side / longest
    # At least 1 px: a 1 x 10000 strip must not round to a zero-width image.
    return max(1, round(width * scale)), max(1, round(height * scale))


def _upright(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(image)
    except Exception:  # EXIF is optional metadata: broken EXIF keeps the stored pixels, no error
        pass
    return image


def _to_rgb(image: Image.Image, max_side: int) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _high_depth_to_l(image, max_side)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    try:
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            # Transparent areas become white, not the black a plain convert("RGB") leaves.
            flat = Image.new("RGB", rgba.size, _WHITE)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr ...
    except ValueError as error:
        raise ImageDecodeError(f"This image uses a colour mode we cannot convert ({image.mode}).") from error


def _high_depth_to_l(image: Image.Image, max_side: int) -> Image.Image:
    samples = np.asarray(image)
    transparent = image.info.get("transparency")
    if image.mode != "F" and transparent is None:
        # Averaging k x k blocks first keeps a 40-megapixel 16-bit scan from taking gigabytes in
        # the conversion below (it is shrunk to max_side afterwards anyway).
        samples = _block_mean(samples, math.ceil(max(image.size) / max_side))
    if image.mode == "F":
        gray = _float_to_uint8(np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0), stretch=True)
    else:
        gray = _int_to_uint8(samples)
    if isinstance(transparent, int) and image.mode != "F":
        gray = np.where(samples == transparent, 255, gray).astype(np.uint8)  # tRNS over white
    return Image.fromarray(gray)


def _block_mean(samples: np.ndarray, k: int) -> np.ndarray:
    """Integer mean of k x k blocks (edges that do not fill a block are dropped)."""
    if k <= 1:
        return samples
    height, width = (samples.shape[0] // k) * k, (samples.shape[1] // k) * k
    blocks = samples[:height, :width].reshape(height // k, k, width // k, k)
    if samples.dtype.kind == "u":
        return blocks.sum(axis=(1, 3), dtype=np.uint64) // (k * k)
    return blocks.sum(axis=(1, 3), dtype=np.int64) // (k * k)


def _int_to_uint8(samples: np.ndarray) -> np.ndarray:
    """Scale by the smallest common container (8/10/12/16 bit) that holds the data.

    Dividing by 65535 blindly turns 8- or 12-bit data stored in 16-bit files almost black.
    """
    low = int(samples.min()) if samples.size else 0
    high = int(samples.max()) if samples.size else 0
    if low < 0 or high > 65535:  # signed or 32-bit data: no container to infer, stretch it
        span = max(high - low, 1)
        return ((samples.astype(np.int64) - low) * 255 // span).astype(np.uint8)
    bits = next(b for b in (8, 10, 12, 16) if high < (1 << b))
    full = (1 << bits) - 1
    values = samples.astype(np.uint32)  # 65535 * 255 fits: half the memory of int64
    values *= 255
    values += full // 2
    values //= full
    return values.astype(np.uint8)


def _float_to_uint8(samples: np.ndarray, *, stretch: bool) -> np.ndarray:
    low = float(samples.min()) if samples.size else 0.0
    high = float(samples.max()) if samples.size else 0.0
    if stretch and (low < 0.0 or high > 1.0):  # depth maps and the like: use the data's range
        samples = (samples - low) / max(high - low, 1e-12)
    return np.round(np.clip(samples, 0.0, 1.0) * 255.0).astype(np.uint8)


def _from_array(array: np.ndarray, limits: ImageLimits) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageDecodeError(
            f"This array has an unsupported shape {tuple(array.shape)}; "
            "expected H x W, H x W x 3 or H x W x 4."
        )
    _check_pixels((array.shape[1], array.shape[0]), limits)
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        pixels = _int_to_uint8(array)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageDecodeError("This float array contains NaN or infinite values.")
        if array.min() < -1e-6 or array.max() > 1 + 1e-6:
            # Silently clipping 0..255 floats would give a white image; say what is expected.
            raise ImageDecodeError("This float array has values outside [0, 1].")
        pixels = _float_to_uint8(array.astype(np.float32), stretch=False)
    else:
        raise ImageDecodeError(
            f"This array has an unsupported data type ({array.dtype}); expected uint8, uint16 or float."
        )
    return Image.fromarray(np.ascontiguousarray(pixels))  # L, RGB or RGBA from the shape
