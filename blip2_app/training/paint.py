"""An independent renderer for evaluation only: shapes as a person draws them in a paint program.

Written apart from the training renderer on purpose (nothing shared but the scene's meaning:
colour and shape names, centre and diameter): shapes are signed distance fields evaluated with
numpy on the pixel grid (no PIL drawing), fills come from a fixed table of named colours (paint
programs' palettes and CSS names) instead of jittered ranges, its own shape proportions (a paint
program's box triangle, right triangle and plus sign), outlines as a band of the distance field,
anti-aliasing as one pixel of distance-based coverage, white / paper / canvas backgrounds. The
training code never imports this module (`DataConfig` refuses "paint" scenes), so the "paint"
test split measures how the model does on drawings it has never seen the like of.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .synthetic import IMAGE_SIZE, Scene, ShapeObject

SIZES = (64, 96, 128, 160, 200, 224, 256, 300, 384, 448, 512)
PALETTE: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((255, 0, 0), (237, 28, 36), (220, 20, 60), (204, 0, 0), (178, 34, 34), (230, 50, 40)),
    "orange": ((255, 165, 0), (255, 127, 39), (255, 140, 0), (255, 128, 0), (240, 120, 30)),
    "yellow": ((255, 255, 0), (255, 242, 0), (255, 215, 0), (250, 220, 50), (240, 230, 40)),
    "green": ((0, 255, 0), (0, 128, 0), (34, 177, 76), (50, 205, 50), (46, 139, 87), (0, 200, 83)),
    "blue": ((0, 0, 255), (0, 102, 204), (63, 72, 204), (30, 110, 255), (65, 105, 225), (0, 0, 205)),
    "purple": ((128, 0, 128), (163, 73, 164), (148, 0, 211), (138, 43, 226), (153, 50, 204), (102, 51, 153)),
}
PAPERS = (
    (255, 255, 255),
    (250, 250, 250),
    (253, 251, 240),
    (245, 245, 245),
    (236, 236, 236),
    (230, 232, 235),
)


def _rotate(px: np.ndarray, py: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    t = np.deg2rad(degrees)
    return px * np.cos(t) + py * np.sin(t), -px * np.sin(t) + py * np.cos(t)


def _box(px: np.ndarray, py: np.ndarray, half_x: float, half_y: float) -> np.ndarray:
    qx, qy = np.abs(px) - half_x, np.abs(py) - half_y
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _polygon(px: np.ndarray, py: np.ndarray, vertices: list[tuple[float, float]]) -> np.ndarray:
    """Signed distance to a simple polygon (negative inside), by edges and a crossing count."""
    distance = np.full(px.shape, np.inf)
    inside = np.zeros(px.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1], strict=True):
        ex, ey = bx - ax, by - ay
        wx, wy = px - ax, py - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0, 1)
        distance = np.minimum(distance, np.hypot(wx - ex * t, wy - ey * t))
        crosses = ((ay > py) != (by > py)) & (px < ax + (py - ay) * ex / (ey if ey else 1e-12))
        inside ^= crosses
    return np.where(inside, -distance, distance)


def signed_distance(obj: ShapeObject, px: np.ndarray, py: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Distance (design units) to the edge of `obj` drawn in this renderer's own proportions."""
    r = obj.diameter / 2
    x, y = px - obj.centre[0], py - obj.centre[1]
    if obj.shape == "circle":
        return np.hypot(x, y) - r
    if obj.shape == "square":
        tilt = 0.0 if rng.random() < 0.7 else rng.uniform(-8, 8)
        x, y = _rotate(x, y, tilt)
        half = r * rng.uniform(0.8, 0.9)
        return _box(x, y, half, half)
    if obj.shape == "cross":
        x, y = _rotate(x, y, rng.uniform(-10, 10))
        arm = r * rng.uniform(0.25, 0.42)
        return np.minimum(_box(x, y, r, arm), _box(x, y, arm, r))
    if obj.shape == "triangle":
        half = r * 0.8  # inside the scene's circle whichever way it is turned
        if rng.random() < 0.6:  # the paint program's triangle: apex at the top middle of its box
            vertices = [(0.0, -half), (half, half), (-half, half)]
        else:  # its right triangle
            vertices = [(-half, -half), (half, half), (-half, half)]
        x, y = _rotate(x, y, float(rng.choice([0, 0, 180])) + rng.uniform(-8, 8))
        return _polygon(x, y, vertices)
    raise ValueError(f"unknown shape {obj.shape!r}")


def _paper(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array(PAPERS[int(rng.integers(len(PAPERS)))], dtype=np.float64)
    pixels = np.broadcast_to(base, (size, size, 3)).copy()
    if rng.random() < 0.25:  # canvas weave
        grid = np.arange(size)
        weave = np.sin(grid[:, None] * rng.uniform(0.8, 2.0)) * np.sin(grid[None, :] * rng.uniform(0.8, 2.0))
        pixels -= rng.uniform(4, 12) * (weave[..., None] + 1)
    return pixels


def render(scene: Scene) -> Image.Image:
    rng = np.random.default_rng([scene.noise_seed, 11])
    size = int(SIZES[int(rng.integers(len(SIZES)))])
    pixels = _paper(rng, size)
    unit = IMAGE_SIZE / size  # design units per pixel
    centres = (np.arange(size) + 0.5) * unit
    py, px = np.meshgrid(centres, centres, indexing="ij")
    smooth = rng.random() < 0.6
    for obj in scene.objects:
        fills = PALETTE[obj.colour]
        fill = np.array(fills[int(rng.integers(len(fills)))], dtype=np.float64)
        edge = signed_distance(obj, px, py, rng) / unit  # in pixels
        coverage = np.clip(0.5 - edge, 0, 1) if smooth else (edge < 0).astype(np.float64)
        pixels = pixels * (1 - coverage[..., None]) + fill * coverage[..., None]
        if rng.random() < 0.35:  # a stroke inside the edge, as a paint program's outline
            width = float(rng.integers(1, 4)) * max(1.0, size / 128)
            stroke = np.array((0, 0, 0) if rng.random() < 0.7 else fill * 0.5)
            band = (np.clip(edge + width + 0.5, 0, 1) if smooth else (edge > -width)) * coverage
            pixels = pixels * (1 - band[..., None]) + stroke * band[..., None]
    if rng.random() < 0.3:
        pixels = pixels + rng.normal(0, rng.uniform(2, 5), size=pixels.shape)
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    if rng.random() < 0.35:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(50, 96)))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image
