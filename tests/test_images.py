"""Behaviour of the safe image decoder (blip2_app.images) on hostile, awkward and normal input."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import GifImagePlugin, Image, ImageFile

from blip2_app import images
from blip2_app.images import ImageDecodeError, ImageLimits, image_content_hash, load_image, load_images

DATA = Path(__file__).parent / "data"
HOSTILE = DATA / "hostile"
PHOTOS = DATA / "photos"
ASSETS = Path(__file__).parent.parent / "assets"

WHITE = (255, 255, 255)
RED = (255, 0, 0)
BLUE = (0, 0, 255)

# Expected outcome per hostile file, from the "expected_behaviour" column of MANIFEST.tsv:
# a (width, height) the decoded RGB image must have, or the exact sentence of the error.
ACCEPT: dict[str, tuple[int, int]] = {
    "pillow_pil_sample_cmyk.jpg": (100, 100),
    "pillow_hopper_orientation_8.jpg": (128, 128),
    "made_exif_orientation6_coffee.jpg": (600, 400),  # raw pixels are 400 x 600
    "pillow_i_trns.png": (64, 64),
    "pillow_p_trns_single.png": (64, 64),
    "pillow_uncompressed_la.png": (128, 128),
    "pillow_iss634.gif": (245, 245),
    "pillow_iss634.apng": (245, 245),
    "pillow_iss634.webp": (245, 245),
    "pillow_icc_profile_big.jpg": (425, 250),
    "pillow_multipage.tiff": (10, 10),
    "pillow_sugarshack.mpo": (640, 480),
    "pillow_hopper_bad_exif.jpg": (500, 500),
    "made_one_pixel_1x1.png": (1, 1),
    "made_strip_1x10000.png": (1, 4096),  # long side bounded by max_side, width kept >= 1
}
REJECT: dict[str, str] = {
    "pillow_truncated_jpeg.jpg": "This file is not an image we can read (truncated JPEG).",
    "pillow_truncated_image.png": "This file is not an image we can read (truncated PNG).",
    "pillow_decompression_bomb.gif": (  # a frame larger than the screen: only the total is known
        "This image is too large: 4,364,696,535 pixels, the limit is 40,000,000 pixels."
    ),
    "made_png_header_claims_100000x100000.png": (
        "This image is too large: 100000 x 100000 pixels, the limit is 40,000,000 pixels."
    ),
    "pillow_png_decompression_dos.png": "This file is not an image we can read (oversized PNG metadata).",
    "pillow_bmp_b_badheadersize.bmp": "This file is not an image we can read (damaged BMP header).",
    "pillow_avif_hopper.heif": (
        "This file is a HEIC/HEIF image, which we cannot read; please convert it to JPEG or PNG."
    ),
    "made_text_file_renamed.jpg": "This file is a text file, not an image.",
    "made_empty_0_bytes.png": "This file is empty.",
    "made_random_bytes.jpg": "This file is not a recognised image format.",
}


def _manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "MANIFEST.tsv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


HOSTILE_ROWS = _manifest(HOSTILE)
HOSTILE_NAMES = [row["filename"] for row in HOSTILE_ROWS]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _close(color: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(color, expected, strict=True))


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, with no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if any file-backed image reaches pixel decoding."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"pixel data of {self.size} was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --------------------------------------------------------------------- hostile corpus


def test_hostile_manifest_matches_files_and_expectations() -> None:
    on_disk = {path.name for path in HOSTILE.iterdir() if path.name != "MANIFEST.tsv"}
    assert on_disk == set(HOSTILE_NAMES)
    assert set(ACCEPT) | set(REJECT) == on_disk
    assert not set(ACCEPT) & set(REJECT)
    for row in HOSTILE_ROWS:
        data = (HOSTILE / row["filename"]).read_bytes()
        assert len(data) == int(row["bytes"]), row["filename"]
        assert hashlib.sha256(data).hexdigest() == row["sha256"], row["filename"]


@pytest.mark.parametrize("via", ["path", "bytes"])
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_file_decodes_or_is_refused_with_its_sentence(name: str, via: str) -> None:
    path = HOSTILE / name
    source = path if via == "path" else path.read_bytes()
    if name in ACCEPT:
        image = load_image(source)
        assert image.mode == "RGB"
        assert image.size == ACCEPT[name]
        image.load()  # already decoded: a second load must not touch any file
    else:
        with pytest.raises(ImageDecodeError) as caught:
            load_image(source)
        assert str(caught.value) == REJECT[name]
        if name != "made_empty_0_bytes.png":
            assert caught.value.__cause__ is not None  # Pillow's exception kept for the logs


def test_error_sentences_are_single_sentences() -> None:
    for sentence in REJECT.values():
        assert sentence[0].isupper() and sentence.endswith(".")
        assert "\n" not in sentence and sentence.count(". ") == 0


def test_truncated_images_raise_without_changing_global_pillow_state() -> None:
    for name in ("pillow_truncated_jpeg.jpg", "pillow_truncated_image.png"):
        with pytest.raises(ImageDecodeError, match="truncated"):
            load_image(HOSTILE / name)
    # Truncated data must raise, never be padded or waited for: the global flag stays off.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pillow_global_pixel_guard_is_lowered_not_raised() -> None:
    guard = Image.MAX_IMAGE_PIXELS
    assert guard is not None
    assert guard <= ImageLimits().max_pixels


def test_lazy_pil_image_with_truncated_data_is_decoded_inside_the_guard() -> None:
    with (
        Image.open(HOSTILE / "pillow_truncated_jpeg.jpg") as lazy,
        pytest.raises(ImageDecodeError, match=r"\(truncated JPEG\)"),
    ):
        load_image(lazy)


# --------------------------------------------------------------------- limits


@pytest.mark.usefixtures("no_pixel_decoding")
def test_pixel_bombs_are_refused_from_the_header_alone() -> None:
    with pytest.raises(ImageDecodeError, match="100000 x 100000 pixels"):
        load_image(HOSTILE / "made_png_header_claims_100000x100000.png")
    with pytest.raises(ImageDecodeError) as caught:
        load_image(PHOTOS / "skimage_rocket.jpg", ImageLimits(max_pixels=1000))
    assert str(caught.value) == "This image is too large: 640 x 427 pixels, the limit is 1,000 pixels."


@pytest.mark.usefixtures("no_pixel_decoding")
def test_pillow_warning_band_is_an_error_and_reports_the_effective_limit() -> None:
    # 48 Mpx: above Pillow's (lowered) guard but below twice it, where Pillow only warns.
    data = _png_header_only(8000, 6000)
    expected = "This image is too large: 8000 x 6000 pixels, the limit is 40,000,000 pixels."
    for limits in (ImageLimits(), ImageLimits(max_pixels=100_000_000)):
        with pytest.raises(ImageDecodeError) as caught:
            load_image(data, limits)
        assert str(caught.value) == expected


def test_pixel_limit_applies_to_arrays_and_pil_images() -> None:
    limits = ImageLimits(max_pixels=99)
    with pytest.raises(ImageDecodeError, match="10 x 10 pixels, the limit is 99 pixels"):
        load_image(np.zeros((10, 10, 3), np.uint8), limits)
    with pytest.raises(ImageDecodeError, match="20 x 5 pixels"):
        load_image(Image.new("RGB", (20, 5)), limits)
    assert load_image(Image.new("RGB", (9, 11)), limits).size == (9, 11)


def test_byte_limit_is_checked_before_the_file_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was opened")

    monkeypatch.setattr(images, "open", refuse_open, raising=False)
    with pytest.raises(ImageDecodeError) as caught:
        load_image(HOSTILE / "made_exif_orientation6_coffee.jpg", ImageLimits(max_bytes=1024))
    assert str(caught.value) == "This file is too large: 70.7 KB, the limit is 1 KB."


def test_byte_limit_on_bytes_and_data_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    data = (PHOTOS / "skimage_rocket.jpg").read_bytes()
    limits = ImageLimits(max_bytes=100_000)
    with pytest.raises(
        ImageDecodeError, match=r"^This file is too large: 109\.9 KB, the limit is 97\.7 KB\.$"
    ):
        load_image(data, limits)
    assert load_image(data, ImageLimits(max_bytes=len(data))).size == (640, 427)

    def refuse_decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("an oversized data URL was decoded")

    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    monkeypatch.setattr(images.base64, "b64decode", refuse_decode)
    with pytest.raises(ImageDecodeError, match=r"^This file is too large"):
        load_image(url, limits)


def test_max_side_downscales_keeping_aspect() -> None:
    wide = Image.new("RGB", (1000, 500), RED)
    assert load_image(wide, ImageLimits(max_side=100)).size == (100, 50)
    # JPEG takes the reduced-scale decode path (draft) first, then the exact resize.
    rocket = load_image(PHOTOS / "skimage_rocket.jpg", ImageLimits(max_side=100))
    assert rocket.size == (100, 67)
    strip = load_image(HOSTILE / "made_strip_1x10000.png", ImageLimits(max_side=100))
    assert strip.size == (1, 100)
    small = load_image(PHOTOS / "skimage_rocket.jpg", ImageLimits(max_side=640))
    assert small.size == (640, 427)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_pixels": 0},
        {"max_bytes": -1},
        {"max_side": 1.5},
        {"max_side": True},
        {"max_pixels": "100"},
    ],
)
def test_limits_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be a positive integer"):
        ImageLimits(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------- orientation


def test_exif_orientation_6_matches_the_upright_photo() -> None:
    rotated = load_image(HOSTILE / "made_exif_orientation6_coffee.jpg")
    upright = load_image(PHOTOS / "skimage_coffee.png")
    assert rotated.size == upright.size == (600, 400)
    assert np.abs(_pixels(rotated) - _pixels(upright)).mean() < 8


def test_exif_orientation_8_rotates_the_stored_pixels() -> None:
    path = HOSTILE / "pillow_hopper_orientation_8.jpg"
    with Image.open(path) as raw:
        expected = raw.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    assert np.array_equal(_pixels(load_image(path)), _pixels(expected))


@pytest.mark.parametrize(
    ("orientation", "stored_as"),
    [
        (6, Image.Transpose.ROTATE_90),
        (8, Image.Transpose.ROTATE_270),
        (3, Image.Transpose.ROTATE_180),
    ],
)
def test_exif_orientation_restores_a_marked_corner(
    tmp_path: Path, orientation: int, stored_as: Image.Transpose
) -> None:
    upright = Image.new("RGB", (60, 30), BLUE)
    upright.paste(RED, (0, 0, 30, 15))  # only the top-left quadrant is red
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "camera.jpg"
    upright.transpose(stored_as).save(path, quality=95, exif=exif)

    image = load_image(path)
    assert image.size == (60, 30)
    assert _close(image.getpixel((7, 4)), RED)
    for corner in ((52, 4), (7, 25), (52, 25)):
        assert _close(image.getpixel(corner), BLUE)


def test_broken_exif_is_ignored() -> None:
    image = load_image(HOSTILE / "pillow_hopper_bad_exif.jpg")
    pixels = _pixels(image)
    assert image.size == (500, 500)
    assert np.array_equal(pixels[..., 0], pixels[..., 1])  # grayscale stays grey


# --------------------------------------------------------------------- colour modes


def test_cmyk_jpeg_shows_red_text_on_black() -> None:
    pixels = _pixels(load_image(HOSTILE / "pillow_pil_sample_cmyk.jpg"))
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    dark = pixels.sum(axis=2) < 90
    assert dark.mean() > 0.5  # black background, not inverted to white
    assert red.sum() > 300


def test_cmyk_converts_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.tiff"
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(path)
    assert load_image(path).getpixel((1, 1)) == RED


def test_palette_transparency_becomes_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.paste(1, (0, 0, 2, 4))
    path = tmp_path / "palette.png"
    image.save(path, transparency=1)
    result = load_image(path)
    assert result.getpixel((0, 0)) == WHITE
    assert result.getpixel((3, 3)) == RED

    sample = load_image(HOSTILE / "pillow_p_trns_single.png")
    assert sample.getpixel((32, 32)) == WHITE  # the transparent rectangle
    assert sample.getpixel((0, 0)) == RED


def test_la_alpha_is_composited_over_white(tmp_path: Path) -> None:
    image = Image.new("LA", (3, 1))
    image.putdata([(0, 0), (0, 255), (0, 128)])
    path = tmp_path / "la.png"
    image.save(path)
    result = load_image(path)
    assert result.getpixel((0, 0)) == WHITE
    assert result.getpixel((1, 0)) == (0, 0, 0)
    assert _close(result.getpixel((2, 0)), (127, 127, 127), tolerance=1)

    sample = load_image(HOSTILE / "pillow_uncompressed_la.png")
    assert sample.getpixel((0, 0)) == WHITE  # transparent, not black


def test_rgba_half_alpha_over_white() -> None:
    result = load_image(Image.new("RGBA", (2, 2), (255, 0, 0, 128)))
    assert _close(result.getpixel((0, 0)), (255, 127, 127), tolerance=1)
    opaque = load_image(Image.new("RGBA", (2, 2), (10, 20, 30, 255)))
    assert opaque.getpixel((1, 1)) == (10, 20, 30)


def test_16_bit_full_range_is_scaled_to_8_bit(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16"
    result = load_image(path)
    assert [result.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]


def test_16_bit_with_8_bit_values_and_trns_is_not_black() -> None:
    path = HOSTILE / "pillow_i_trns.png"
    with Image.open(path) as raw:
        samples = np.asarray(raw).astype(np.int16)
        transparent = raw.info["transparency"]
    result = _pixels(load_image(path))
    # Values 0..255 in a 16-bit container keep their brightness; the tRNS value is white.
    expected = np.where(samples == transparent, 255, samples)
    assert np.array_equal(result[..., 0], expected)
    assert np.array_equal(result[..., 0], result[..., 2])


def test_32_bit_integer_and_float_modes() -> None:
    ten_bit = load_image(Image.fromarray(np.array([[0, 1000]], dtype=np.int32)))
    assert ten_bit.getpixel((1, 0)) == (249, 249, 249)  # 1000 / 1023 of full scale
    unit = load_image(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
    assert [unit.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    depth = load_image(Image.fromarray(np.array([[2.0, 12.0]], dtype=np.float32)))
    assert [depth.getpixel((x, 0))[0] for x in range(2)] == [0, 255]


def test_one_bit_and_grayscale_become_rgb() -> None:
    one_bit = Image.new("1", (2, 1))
    one_bit.putpixel((1, 0), 1)
    result = load_image(one_bit)
    assert [result.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), WHITE]
    camera = _pixels(load_image(PHOTOS / "skimage_camera.png"))
    assert camera.shape == (512, 512, 3)
    assert np.array_equal(camera[..., 0], camera[..., 1])


# --------------------------------------------------------------------- animation


def _two_frames(tmp_path: Path, fmt: str, suffix: str, **save: object) -> Path:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    path = tmp_path / f"animated{suffix}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, **save)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 2
    return path


@pytest.mark.parametrize(
    ("fmt", "suffix", "save"),
    [("GIF", ".gif", {}), ("PNG", ".png", {}), ("WEBP", ".webp", {"lossless": True})],
)
def test_animated_images_give_their_first_frame(
    tmp_path: Path, fmt: str, suffix: str, save: dict[str, object]
) -> None:
    path = _two_frames(tmp_path, fmt, suffix, **save)
    assert load_image(path).getpixel((4, 4)) == RED


@pytest.mark.parametrize("name", ["pillow_iss634.gif", "pillow_iss634.apng", "pillow_iss634.webp"])
def test_animated_samples_equal_their_first_frame(name: str) -> None:
    with Image.open(HOSTILE / name) as raw:
        first = raw.convert("RGBA")
        raw.seek(1)
        second = raw.convert("RGBA")
    assert not np.array_equal(np.asarray(first), np.asarray(second))
    flat = Image.new("RGB", first.size, WHITE)
    flat.paste(first, mask=first.getchannel("A"))
    assert np.array_equal(_pixels(load_image(HOSTILE / name)), _pixels(flat))


def test_animated_gif_decodes_no_later_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    frames: list[int] = []
    original = GifImagePlugin.GifImageFile._seek

    def spy(self: GifImagePlugin.GifImageFile, frame: int, *args: object, **kwargs: object) -> None:
        frames.append(frame)
        original(self, frame, *args, **kwargs)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", spy)
    load_image(HOSTILE / "pillow_iss634.gif")
    assert frames and max(frames) == 0  # 42 frames on disk, only frame 0 touched


# --------------------------------------------------------------------- input kinds


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((2, 3), 7, np.uint8), (7, 7, 7)),
        (np.full((2, 3, 1), 9, np.uint8), (9, 9, 9)),
        (np.tile(np.array([10, 20, 30], np.uint8), (2, 3, 1)), (10, 20, 30)),
        (np.tile(np.array([10, 20, 30, 255], np.uint8), (2, 3, 1)), (10, 20, 30)),
        (np.tile(np.array([10, 20, 30, 0], np.uint8), (2, 3, 1)), WHITE),
        (np.full((2, 3), 65535, np.uint16), WHITE),
        (np.full((2, 3, 3), 100, np.uint16), (100, 100, 100)),  # 8-bit values in 16-bit storage
        (np.full((2, 3), 4095, np.uint16), WHITE),  # 12-bit full scale
        (np.full((2, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((2, 3, 3), 1.0, np.float64), WHITE),
        (np.zeros((2, 3, 4), np.float16), WHITE),  # alpha 0
        (np.ones((2, 3), np.bool_), WHITE),
    ],
)
def test_numpy_inputs(array: np.ndarray, expected: tuple[int, int, int]) -> None:
    image = load_image(array)
    assert image.mode == "RGB"
    assert image.size == (3, 2)
    assert image.getpixel((2, 1)) == expected


@pytest.mark.parametrize(
    ("array", "sentence"),
    [
        (np.zeros((2, 3, 5), np.uint8), "This array has an unsupported shape (2, 3, 5); "),
        (np.zeros((2, 3, 3, 1), np.uint8), "This array has an unsupported shape (2, 3, 3, 1); "),
        (np.zeros((2, 3), np.int64), "This array has an unsupported data type (int64); "),
        (np.full((2, 3), 255.0), "This float array has values outside [0, 1]."),
        (np.full((2, 3), np.nan), "This float array contains NaN or infinite values."),
        (np.zeros((0, 5, 3), np.uint8), "This image has no pixels (5 x 0)."),
    ],
)
def test_numpy_inputs_refused(array: np.ndarray, sentence: str) -> None:
    with pytest.raises(ImageDecodeError) as caught:
        load_image(array)
    assert str(caught.value).startswith(sentence)


def test_bytes_bytearray_memoryview_dict_and_path_inputs_agree() -> None:
    path = PHOTOS / "skimage_rocket.jpg"
    data = path.read_bytes()
    reference = image_content_hash(load_image(path))
    for source in (str(path), data, bytearray(data), memoryview(data), {"path": str(path)}, {"path": path}):
        assert image_content_hash(load_image(source)) == reference


def test_data_urls() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4), RED).save(buffer, format="PNG")
    payload = base64.b64encode(buffer.getvalue()).decode()
    image = load_image(f"data:image/png;base64,{payload}")
    assert image.size == (5, 4) and image.getpixel((0, 0)) == RED
    # Wrapped base64 still decodes; the declared type is not trusted, the bytes are sniffed.
    wrapped = "\n".join(payload[i : i + 20] for i in range(0, len(payload), 20))
    assert load_image(f"DATA:text/plain;base64,{wrapped}").size == (5, 4)


@pytest.mark.parametrize(
    ("source", "sentence"),
    [
        ("data:image/png,rawbytes", "This data URL is not a base64-encoded image."),
        ("data:image/png;base64", "This data URL is not a base64-encoded image."),
        ("data:image/png;base64,@@@@", "This data URL contains invalid base64 data."),
        ("data:image/png;base64,", "This file is empty."),
        (
            "data:image/png;base64," + base64.b64encode(b"hello world").decode(),
            "This file is a text file, not an image.",
        ),
        (None, "No image was provided."),
        ("   ", "No image was provided."),
        ({"name": "x.png"}, "This input has no 'path' to an image file."),
        ({"path": None}, "This input has no 'path' to an image file."),
        ("https://example.com/cat.jpg", "Image URLs are not supported; please upload the file instead."),
        ("file:///etc/passwd", "Image URLs are not supported; please upload the file instead."),
        (42, "This input is not an image (got int)."),
        (b"%PDF-1.7\n%binary", "This file is a PDF document, not an image."),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', None),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00" + bytes(16), None),
    ],
)
def test_bad_inputs_get_their_own_sentence(source: object, sentence: str | None) -> None:
    with pytest.raises(ImageDecodeError) as caught:
        load_image(source)
    message = str(caught.value)
    if sentence is not None:
        assert message == sentence
    else:
        assert message.endswith(", which we cannot read; please convert it to JPEG or PNG.")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"^The image file could not be found\.$"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match=r"^The image file could not be found\.$"):
        load_image(str(tmp_path / "nul\0.png"))
    with pytest.raises(ImageDecodeError, match=r"^This path is a folder, not an image file\.$"):
        load_image(tmp_path)


def test_result_is_a_new_rgb_image_and_the_input_is_untouched() -> None:
    original = Image.new("RGB", (4, 4), RED)
    result = load_image(original)
    assert result is not original
    result.putpixel((0, 0), BLUE)
    assert original.getpixel((0, 0)) == RED
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    load_image(rgba)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (0, 0, 0, 0)


def test_load_images_keeps_order_and_notes_the_failing_position() -> None:
    loaded = load_images([Image.new("RGB", (2, 2), RED), np.zeros((3, 1), np.uint8)])
    assert [image.size for image in loaded] == [(2, 2), (1, 3)]
    with pytest.raises(ImageDecodeError) as caught:
        load_images([Image.new("RGB", (2, 2)), b""])
    assert str(caught.value) == "This file is empty."
    assert "image number 2" in caught.value.__notes__[0]


# --------------------------------------------------------------------- content hash


def test_hash_depends_on_pixels_only(tmp_path: Path) -> None:
    picture = load_image(PHOTOS / "skimage_coffee.png")
    picture.save(tmp_path / "copy.bmp")
    picture.save(tmp_path / "other-name.png")
    as_bmp = image_content_hash(load_image(tmp_path / "copy.bmp"))
    as_png = image_content_hash(load_image(tmp_path / "other-name.png"))
    assert as_bmp == as_png == image_content_hash(picture)
    assert len(as_png) == 64 and int(as_png, 16) >= 0

    changed = picture.copy()
    changed.putpixel((0, 0), (0, 0, 0) if picture.getpixel((0, 0)) != (0, 0, 0) else WHITE)
    assert image_content_hash(changed) != as_png
    # Same bytes, different shape: still a different picture.
    assert image_content_hash(Image.new("RGB", (2, 3))) != image_content_hash(Image.new("RGB", (3, 2)))


# --------------------------------------------------------------------- shipped examples


def test_example_assets_decode_and_are_attributed() -> None:
    examples = sorted((ASSETS / "examples").iterdir())
    attribution = (ASSETS / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert examples
    assert sum(path.stat().st_size for path in examples) < 3 * 1024 * 1024
    for path in examples:
        assert f"`{path.name}`" in attribution
        image = load_image(path)
        assert image.mode == "RGB" and max(image.size) <= 640


def test_photo_copies_match_their_manifest() -> None:
    rows = _manifest(PHOTOS)
    assert {row["filename"] for row in rows} == {p.name for p in PHOTOS.iterdir() if p.suffix != ".tsv"}
    for row in rows:
        data = (PHOTOS / row["filename"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert "CC0" in row["licence_statement"] or "public domain" in row["licence_statement"]
