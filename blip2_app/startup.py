"""Settings -> a ready Engine: resolve names, choose device and precisions, load the models."""

from __future__ import annotations

import dataclasses
import logging

import torch

from .cache import FeatureCache
from .config import Settings
from .engine import Engine
from .images import ImageLimits
from .loading import load_model, pick_device, resolve_precisions
from .registry import Registry

log = logging.getLogger(__name__)


def load_engine(settings: Settings, registry: Registry | None = None) -> Engine:
    """Everything the app, the CLI and the benchmarks need; failures raise ModelLoadError."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    registry = registry or Registry.load([settings.models_file] if settings.models_file else [])
    device = pick_device(settings.device)
    entry = registry.resolve(settings.model)

    captioner = matcher = None
    if entry.family.generates_text:
        precisions, notes = resolve_precisions(
            settings.precision, entry, device, settings.precision_overrides
        )
        captioner = load_model(entry, precisions, device)
        captioner.notes.extend(notes)
    else:
        matcher_entry = entry

    retrieval_name = settings.retrieval_model
    if captioner is not None:
        matcher_entry = None
        if retrieval_name == "auto":
            retrieval_name = entry.retrieval or "none"
        if retrieval_name != "none":
            matcher_entry = registry.resolve(retrieval_name)
    if matcher_entry is not None:
        precisions, notes = resolve_precisions(
            settings.precision, matcher_entry, device, settings.precision_overrides
        )
        # A retrieval model has no language model: its "llm" precision must not trigger bitsandbytes.
        precisions = dataclasses.replace(precisions, llm=precisions.qformer)
        if captioner is not None and captioner.precisions.vision != precisions.vision:
            # Sharing the encoder needs one precision for it; the captioning model's wins.
            precisions = dataclasses.replace(precisions, vision=captioner.precisions.vision)
        matcher = load_model(matcher_entry, precisions, device, share_vision_with=captioner)
        matcher.notes.extend(notes)

    cache = FeatureCache(max_entries=settings.cache_entries, max_bytes=settings.cache_mb * 1024 * 1024)
    limits = ImageLimits(max_pixels=settings.max_image_pixels, max_bytes=settings.max_upload_mb * 1024 * 1024)
    return Engine(captioner, matcher, cache, limits)
