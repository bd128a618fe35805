"""Explaining a match on the retrieval model: ITM / ITC scores, Grad-CAM heatmaps (whole text and
per word) and zero-shot labels. Plain Python, no Gradio: the Explain tab and the CLI share it.

Heatmap (docs/explain.md says what it means and where it misleads): LAVIS' `compute_gradcam` for
BLIP's ITM, adapted to BLIP-2. In BLIP the text tokens attend to the image; in BLIP-2 only the
Q-Former's query tokens do, and the ITM head reads the queries. So, per cross-attention layer,
the map of query q over patch p is `attention[q, p] * max(0, d score / d attention[q, p])`,
averaged over heads, summed over queries and layers. `score` is the ITM log-odds
(match logit - no-match logit), the quantity the match probability is a function of.

Per word: a word reaches the image only through the queries (the ITM pass lets queries and text
attend to each other). Word w's map is the query maps weighted by how much each query's
self-attention on w's tokens supports the score (the same Grad-CAM rule one hop earlier):
`sum_q relevance(q -> w) * map_q`, a two-step attention-rollout with gradients.

Gradients: the engine runs under inference mode; here only the Q-Former's forward runs with grad
enabled, on the cached vision features (detached), and `torch.autograd.grad` takes the gradient of
the attention maps alone (no parameter's `.grad` is touched, so concurrent calls cannot mix).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .engine import Engine, ImageInput, PreparedImage, input_dtype
from .errors import InvalidRequestError
from .precisions import DYNAMIC_INT8

# LAVIS' initial ITC temperature: converted BLIP-2 checkpoints (and the demo model) do not keep
# the learned one, so zero-shot softmaxes use this and say so (retrieval.py uses the same value).
ITC_TEMPERATURE = 0.07
DEFAULT_TEMPLATE = "a photo of {}"
MAX_LABELS = 20
MAX_LABEL_CHARS = 60
MAX_TEXT_CHARS = 300
MAX_WORD_MAPS = 12  # per-word maps drawn for at most this many words (the rest: whole-text map only)


@dataclass(frozen=True)
class Match:
    itm: float  # ITM match probability, 0-1
    itc: float  # ITC cosine: max over query tokens of cosine(query projection, text projection)

    def as_dict(self) -> dict[str, float]:
        return {"itm": self.itm, "itc": self.itc}


@dataclass(frozen=True)
class Heatmap:
    """Patch scores (rows top to bottom, columns left to right), non-negative, max 1 (or all 0)."""

    text: str
    itm: float
    grid: np.ndarray  # (rows, cols)
    words: tuple[tuple[str, np.ndarray], ...]  # (word, its grid) in text order

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "itm": self.itm,
            "grid": _rounded(self.grid),
            "words": [{"word": w, "grid": _rounded(g)} for w, g in self.words],
        }


@dataclass(frozen=True)
class LabelScore:
    label: str
    text: str  # the label in the template: what the model read
    probability: float  # ITC softmax over the labels at ITC_TEMPERATURE
    itc: float
    itm: float | None = None  # with re-ranking: ITM match probability (the order follows it)

    def as_dict(self) -> dict[str, Any]:
        fields = {"label": self.label, "text": self.text, "probability": self.probability, "itc": self.itc}
        if self.itm is not None:
            fields["itm"] = self.itm
        return fields


def _rounded(grid: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 4) for v in row] for row in grid]


# --------------------------------------------------------------------------- inputs
def check_text(text: Any, name: str = "text") -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError(f"Please type a {name} to match against the image.")
    text = " ".join(text.split())
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRequestError(f"The {name} is too long: at most {MAX_TEXT_CHARS} characters.")
    return text


def parse_labels(labels: Any, max_labels: int = MAX_LABELS) -> list[str]:
    """Labels from one string (comma- or newline-separated) or a list; duplicates dropped."""
    if isinstance(labels, str):
        parts = re.split(r"[,\n]", labels)
    elif isinstance(labels, (list, tuple)) and all(isinstance(x, str) for x in labels):
        parts = list(labels)
    else:
        raise InvalidRequestError("Labels must be text: comma-separated or one per line.")
    seen: dict[str, None] = {}
    for part in parts:
        label = " ".join(part.split())
        if label and label.lower() not in (s.lower() for s in seen):
            seen[label] = None
    found = list(seen)
    if len(found) < 2:
        raise InvalidRequestError("Please give at least two labels, separated by commas or new lines.")
    if len(found) > max_labels:
        raise InvalidRequestError(f"Too many labels: at most {max_labels}; got {len(found)}.")
    for label in found:
        if len(label) > MAX_LABEL_CHARS:
            raise InvalidRequestError(
                f"The label {label[:20]!r}... is too long: at most {MAX_LABEL_CHARS} characters."
            )
    return found


def check_template(template: Any) -> str:
    if template is None or (isinstance(template, str) and not template.strip()):
        return DEFAULT_TEMPLATE
    if not isinstance(template, str):
        raise InvalidRequestError("The template must be text with one {} where the label goes.")
    template = " ".join(template.split())
    if template.count("{}") != 1 or re.search(r"\{[^}]", template) or len(template) > 120:
        raise InvalidRequestError(
            'The template must hold exactly one {} where the label goes, e.g. "a photo of {}" '
            "(at most 120 characters, no other braces)."
        )
    return template


# --------------------------------------------------------------------------- scores
def match(engine: Engine, image: ImageInput, text: str) -> Match:
    prepared = engine.prepare(image)
    text = check_text(text)
    itm = float(engine.itm(prepared, [text])[0])
    itc = float(engine.itc(prepared, [text])[0, 0])
    return Match(itm=itm, itc=itc)


def classify(
    engine: Engine,
    image: ImageInput,
    labels: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    rerank: bool = False,
) -> list[LabelScore]:
    """Labels best first: ITC softmax at ITC_TEMPERATURE; with `rerank`, ordered by ITM instead."""
    prepared = engine.prepare(image)
    texts = [template.replace("{}", label) for label in labels]
    cosines = engine.itc(prepared, texts)[0]
    probabilities = (cosines / ITC_TEMPERATURE).softmax(dim=-1)
    itm = engine.itm(prepared * len(texts), texts).tolist() if rerank else [None] * len(texts)
    scores = [
        LabelScore(label, text, float(p), float(c), m)
        for label, text, p, c, m in zip(labels, texts, probabilities, cosines, itm, strict=True)
    ]
    return sorted(scores, key=lambda s: -(s.itm if rerank and s.itm is not None else s.probability))


# --------------------------------------------------------------------------- heatmaps
class _EagerAttention:
    """A forward hook that recomputes a Q-Former attention eagerly and keeps its probabilities in
    the graph (the installed attention may be SDPA, which returns none); its output replaces the
    module's, so the score depends on exactly these probabilities."""

    def __init__(self) -> None:
        self.probabilities: list[torch.Tensor] = []

    def __call__(self, module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        hidden: torch.Tensor = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        encoder = kwargs.get("encoder_hidden_states")
        states = hidden if encoder is None else encoder
        mask = kwargs.get("attention_mask") if encoder is None else kwargs.get("encoder_attention_mask")
        size = module.attention_head_size
        q = module.query(hidden).view(*hidden.shape[:-1], -1, size).transpose(1, 2)
        k = module.key(states).view(*states.shape[:-1], -1, size).transpose(1, 2)
        v = module.value(states).view(*states.shape[:-1], -1, size).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) * module.scaling
        if isinstance(mask, torch.Tensor) and mask.is_floating_point():  # additive, broadcastable
            scores = scores + mask.to(scores.dtype)
        probabilities = scores.softmax(dim=-1)
        self.probabilities.append(probabilities)
        out = (probabilities @ v).transpose(1, 2).reshape(*hidden.shape[:-1], -1)
        return out, probabilities


def _words(tokenizer: Any, text: str, input_ids: list[int]) -> list[tuple[str, list[int]]]:
    """Each whitespace-separated word of `text` and the positions of its tokens in `input_ids`."""
    spans = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", text)]
    try:
        encoded = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=len(input_ids))
        offsets = encoded["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer has no offsets
        return [
            (tokenizer.decode([i]), [p])
            for p, i in enumerate(input_ids)
            if i not in tokenizer.all_special_ids
        ]
    words: list[tuple[str, list[int]]] = [(word, []) for _, _, word in spans]
    for position, (start, end) in enumerate(offsets):
        if end <= start or position >= len(input_ids):
            continue  # special tokens
        for index, (s, e, _) in enumerate(spans):
            if s <= start < e:
                words[index][1].append(position)
                break
    return [(word, positions) for word, positions in words if positions][:MAX_WORD_MAPS]


def explain(engine: Engine, image: ImageInput, text: str) -> Heatmap:
    """The Grad-CAM heatmap of the ITM match of `image` and `text`, and one per word (see above)."""
    loaded = engine._require_matcher()
    if loaded.precisions.qformer == DYNAMIC_INT8:
        raise InvalidRequestError(
            "Heatmaps need gradients, which dynamic-int8 layers do not have: start the app with "
            "--qformer-precision fp32 (or bf16) to draw them."
        )
    text = check_text(text)
    prepared: list[PreparedImage] = engine.prepare(image)
    model = loaded.model
    image_embeds = engine.vision.vision_embeds(loaded, prepared).clone().requires_grad_(True)
    tokens = engine._text_tokens([text])
    layers = list(model.qformer.encoder.layer)
    cross, self_attention = _EagerAttention(), _EagerAttention()
    hooks = [
        layer.crossattention.attention.register_forward_hook(cross, with_kwargs=True)
        for layer in layers
        if layer.has_cross_attention
    ] + [
        layer.attention.attention.register_forward_hook(self_attention, with_kwargs=True) for layer in layers
    ]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            query_tokens = model.query_tokens.expand(1, -1, -1)
            n_query = query_tokens.shape[1]
            # Leaves that need a gradient: every attention map then does, whether or not the
            # weights were loaded with requires_grad.
            embeds = model.embeddings(input_ids=tokens.input_ids, query_embeds=query_tokens)
            embeds = embeds.detach().requires_grad_(True)
            query_mask = torch.ones((1, n_query), dtype=torch.long, device=loaded.device)
            out = model.qformer(
                query_embeds=embeds,
                query_length=n_query,
                attention_mask=torch.cat([query_mask, tokens.attention_mask], dim=1),
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(
                    image_embeds.shape[:-1], dtype=torch.long, device=loaded.device
                ),
            )
            head = model.itm_head
            logits = head(out.last_hidden_state[:, :n_query, :].to(input_dtype(head))).float().mean(dim=1)
            score = logits[0, 1] - logits[0, 0]
            maps = cross.probabilities + self_attention.probabilities
            grads = torch.autograd.grad(score, maps)
    finally:
        for hook in hooks:
            hook.remove()
    n_cross = len(cross.probabilities)
    # (query, patch) relevance per cross-attention layer, CLS patch dropped, summed over layers.
    per_query = torch.stack(
        [_relevance(p, g)[:, 1:] for p, g in zip(maps[:n_cross], grads[:n_cross], strict=True)]
    ).sum(dim=0)
    side = math.isqrt(per_query.shape[-1])
    if side * side != per_query.shape[-1]:
        raise InvalidRequestError("This retrieval model's patches do not form a square grid; no heatmap.")
    grid = _normalised(per_query.sum(dim=0).reshape(side, side))
    # (query, token) relevance in the self-attention of every layer, text tokens only.
    to_text = torch.stack(
        [_relevance(p, g)[:n_query, n_query:] for p, g in zip(maps[n_cross:], grads[n_cross:], strict=True)]
    ).sum(dim=0)
    ids = tokens.input_ids[0].tolist()
    words = []
    for word, positions in _words(loaded.processor.tokenizer, text, ids):
        weights = to_text[:, positions].sum(dim=1)  # (query,)
        words.append((word, _normalised((weights[:, None] * per_query).sum(dim=0).reshape(side, side))))
    probability = float(logits.detach().softmax(dim=-1)[0, 1])
    return Heatmap(text=text, itm=probability, grid=grid, words=tuple(words))


def _relevance(probabilities: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """LAVIS' Grad-CAM rule: attention times its positive gradient, mean over heads (batch of 1)."""
    return (probabilities * gradient.clamp(min=0)).float().mean(dim=1)[0].detach()


def _normalised(grid: torch.Tensor) -> np.ndarray:
    values = grid.clamp(min=0).cpu().numpy().astype(np.float64)
    peak = values.max()
    return values / peak if peak > 0 else values


# --------------------------------------------------------------------------- drawing
def overlay(image: Image.Image, grid: np.ndarray, size: int = 384, alpha: float = 0.5) -> Image.Image:
    """The heatmap over the picture (red = strong), the picture's aspect kept, long side `size`."""
    scale = size / max(image.size)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    base = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    heat = Image.fromarray((np.clip(grid, 0, 1) * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    h = np.asarray(heat, dtype=np.float32) / 255.0
    # A dark-blue -> red -> yellow ramp: no matplotlib needed.
    colour = np.stack([np.clip(2 * h, 0, 1), np.clip(2 * h - 1, 0, 1), np.clip(0.6 - 2 * h, 0, 1) * 0.8], -1)
    mixed = (1 - alpha) * np.asarray(base, dtype=np.float32) / 255.0 + alpha * colour
    return Image.fromarray((np.clip(mixed, 0, 1) * 255).astype(np.uint8))


def peak_cell(grid: np.ndarray) -> tuple[int, int]:
    """(row, column) of the strongest patch."""
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return int(row), int(col)
