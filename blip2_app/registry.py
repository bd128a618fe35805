"""Model registry as data: names -> checkpoint, family, prompts, image size, default precision.

The built-in entries live in `registry.json` beside this file; users add or override entries with
their own JSON file of the same shape (`--models-file`), no code change. Any hub id or local
checkpoint folder works too: its family is read from its `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoints import TINY_PREFIX, hub_config, is_hub_id, looks_like_path, read_json
from .errors import ModelLoadError
from .generation import GenerationSettings
from .precisions import COMPONENTS

BUILTIN_REGISTRY = Path(__file__).with_name("registry.json")
# Relative checkpoint folders in registry.json (the bundled demo model) are resolved against this.
REPO_ROOT = BUILTIN_REGISTRY.parent.parent


@dataclass(frozen=True)
class PromptTemplates:
    """Prompt text per task; `{question}`, `{answer}`, `{instruction}`, `{prompt}` are filled in."""

    caption_short: str
    caption_detailed: str
    vqa_short: str
    chat_query: str
    chat_turn: str
    turn_separator: str = " "
    instruction: str = "{instruction} {prompt}"

    def __post_init__(self) -> None:
        needs = {
            "vqa_short": ("{question}",),
            "chat_query": ("{question}",),
            "chat_turn": ("{question}", "{answer}"),
            "instruction": ("{instruction}", "{prompt}"),
        }
        for field_name, placeholders in needs.items():
            text = getattr(self, field_name)
            for placeholder in placeholders:
                if placeholder not in text:
                    raise ValueError(f"Prompt template {field_name}={text!r} must contain {placeholder}.")


@dataclass(frozen=True)
class Family:
    """What a kind of checkpoint needs: classes to load it with and how its prompts look."""

    name: str
    architecture: str
    processor: str
    text_model_types: tuple[str, ...]
    decoder_only: bool
    instruction_aware: bool
    context_tokens: int
    templates: PromptTemplates | None

    @property
    def generates_text(self) -> bool:
        return self.templates is not None


@dataclass(frozen=True)
class Example:
    """A picture the app offers while its model is loaded, and optionally a question to ask about it
    (the Chat tab puts it in the message box)."""

    image: str  # a file; relative in a registry file, resolved like checkpoint folders
    question: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.image, str) or not self.image:
            raise ValueError(f"an example's image must be a file path; got {self.image!r}")
        if not isinstance(self.question, str):
            raise ValueError(f"an example's question must be text; got {self.question!r}")
        if not Path(self.image).is_file():
            raise ValueError(f"example image {self.image} does not exist")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    checkpoint: str
    family: Family
    image_size: int
    # device type ("cpu", "cuda") -> a precision preset, or {"vision": .., "qformer": .., "llm": ..}
    precision: dict[str, str | dict[str, str]]
    retrieval: str | None
    description: str
    decoding: GenerationSettings
    answer_decoding: GenerationSettings
    templates: PromptTemplates | None
    notice: str | None = None  # shown as a banner above every tab while this model is loaded
    # The model's own example pictures, shown instead of the bundled photos (the demo model's
    # drawings: it knows coloured shapes, not astronauts); empty = the photos.
    examples: tuple[Example, ...] = ()

    @property
    def is_tiny(self) -> bool:
        return self.checkpoint.startswith(TINY_PREFIX)


def _family_from_dict(name: str, data: Mapping[str, Any]) -> Family:
    templates = data.get("templates")
    return Family(
        name=name,
        architecture=data["architecture"],
        processor=data["processor"],
        text_model_types=tuple(data.get("text_model_types", ())),
        decoder_only=bool(data["decoder_only"]),
        instruction_aware=bool(data.get("instruction_aware", False)),
        context_tokens=int(data["context_tokens"]),
        templates=PromptTemplates(**templates) if templates else None,
    )


class Registry:
    """Named models and families, merged from the built-in file and any user files."""

    def __init__(self, data: Mapping[str, Any]):
        self._raw = data
        self.decoding = GenerationSettings(**data.get("decoding", {}))
        self.answer_decoding = self.decoding.replace(**data.get("answer_decoding", {}))
        self.families = {name: _family_from_dict(name, fam) for name, fam in data["families"].items()}
        self.models = {name: self._entry(name, spec) for name, spec in data["models"].items()}

    @classmethod
    def load(cls, extra_files: Iterable[str | Path] = ()) -> Registry:
        data = _resolve_folders(json.loads(BUILTIN_REGISTRY.read_text()), REPO_ROOT)
        for path in extra_files:
            data = _merge(data, _resolve_folders(_read_user_file(Path(path)), Path(path).parent))
        try:
            return cls(data)
        except (KeyError, TypeError, ValueError) as error:
            raise ModelLoadError(f"The model registry is invalid: {error}") from error

    def _entry(self, name: str, spec: Mapping[str, Any]) -> ModelEntry:
        family_name = spec["family"]
        if family_name not in self.families:
            raise ValueError(f"model {name!r} names unknown family {family_name!r}")
        family = self.families[family_name]
        templates = family.templates
        if templates is not None and spec.get("templates"):
            templates = dataclasses.replace(templates, **spec["templates"])
        return ModelEntry(
            name=name,
            checkpoint=spec["checkpoint"],
            family=family,
            image_size=int(spec.get("image_size", 224)),
            precision=_precision_by_device(spec.get("precision", "auto")),
            retrieval=spec.get("retrieval"),
            description=spec.get("description", ""),
            decoding=self.decoding.replace(**spec.get("decoding", {})),
            answer_decoding=self.answer_decoding.replace(**spec.get("answer_decoding", {})),
            templates=templates,
            notice=spec.get("notice"),
            examples=_examples(name, spec.get("examples", [])),
        )

    def names(self) -> list[str]:
        return sorted(self.models)

    def resolve(self, name_or_path: str) -> ModelEntry:
        """A registry name, a local checkpoint folder or a hub id -> its entry."""
        if name_or_path in self.models:
            return self.models[name_or_path]
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            return self._entry_for_checkpoint(str(path), read_json(path / "config.json"))
        if not is_hub_id(name_or_path):
            known = ", ".join(self.names())
            raise ModelLoadError(
                f"Unknown model {name_or_path!r}: it is not a registry name, not a local folder and not a "
                f"hub id of the form owner/name. Known names: {known}."
            )
        for entry in self.models.values():
            if entry.checkpoint == name_or_path:
                return entry
        return self._entry_for_checkpoint(name_or_path, hub_config(name_or_path))

    def _entry_for_checkpoint(self, checkpoint: str, config: Mapping[str, Any]) -> ModelEntry:
        family = self.detect_family(config)
        vision = config.get("vision_config") or {}
        spec = {
            "checkpoint": checkpoint,
            "family": family.name,
            "image_size": vision.get("image_size", 224),
            "precision": "auto",
            "retrieval": None,
            "description": f"Checkpoint {checkpoint} ({family.name}).",
        }
        return self._entry(checkpoint, spec)

    def detect_family(self, config: Mapping[str, Any]) -> Family:
        architectures = config.get("architectures") or []
        text_type = (config.get("text_config") or {}).get("model_type")
        for family in self.families.values():
            if family.architecture in architectures and (
                not family.text_model_types or text_type in family.text_model_types
            ):
                return family
        raise ModelLoadError(
            f"This checkpoint is not a BLIP-2 model we know: architectures={architectures}, "
            f"language model type={text_type!r}. Supported: "
            + ", ".join(sorted({f.architecture for f in self.families.values()}))
            + "."
        )


def _resolve_folders(data: Any, base: Path) -> Any:
    """A registry file with its relative checkpoint folders and example images made absolute
    against `base` (the repository root for the built-in file, the file's own folder for a user's
    file), so the bundled demo model and its pictures load whatever the working directory."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return data
    models = {}
    for name, spec in data["models"].items():
        if isinstance(spec, dict):
            checkpoint = spec.get("checkpoint")
            if isinstance(checkpoint, str) and looks_like_path(checkpoint):
                spec = {**spec, "checkpoint": _absolute(checkpoint, base)}
            if isinstance(spec.get("examples"), list):
                spec = {**spec, "examples": [_example_resolved(item, base) for item in spec["examples"]]}
        models[name] = spec
    return {**data, "models": models}


def _absolute(path: str, base: Path) -> str:
    resolved = Path(path).expanduser()
    return str(resolved if resolved.is_absolute() else (base / resolved).resolve())


def _example_resolved(item: Any, base: Path) -> Any:
    """One example with its image path made absolute (anything malformed is left to `_examples`)."""
    if isinstance(item, str) and item:
        return _absolute(item, base)
    if isinstance(item, dict) and isinstance(item.get("image"), str) and item["image"]:
        return {**item, "image": _absolute(item["image"], base)}
    return item


def _examples(name: str, value: Any) -> tuple[Example, ...]:
    """An entry's `"examples"`: a list of image paths or of {"image": path, "question": text}."""
    if not isinstance(value, list):
        raise ValueError(f"model {name!r}: examples must be a list of images; got {value!r}")
    examples = []
    for item in value:
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, Mapping) or set(item) - {"image", "question"} or "image" not in item:
            raise ValueError(
                f'model {name!r}: each example is an image path or {{"image": path, "question": text}}; '
                f"got {item!r}"
            )
        try:
            examples.append(Example(item["image"], item.get("question", "")))
        except ValueError as error:
            raise ValueError(f"model {name!r}: {error}") from error
    return tuple(examples)


def _precision_by_device(value: Any) -> dict[str, str | dict[str, str]]:
    """The default precision on each device: one for all devices, or {"cpu": ..., "cuda": ...};
    each a preset name or a precision per component ({"vision": "bf16", "qformer": "fp32",
    "llm": "nf4"}: all three, checked when the entry is loaded)."""
    if isinstance(value, str) or (isinstance(value, Mapping) and set(value) & set(COMPONENTS)):
        value = {"cpu": value, "cuda": value}
    if not isinstance(value, Mapping) or set(value) - {"cpu", "cuda"}:
        raise ValueError(
            f"precision must be a preset, a precision per component or per device; got {value!r}"
        )
    by_device = {}
    for device in ("cpu", "cuda"):
        default = value.get(device, "auto")
        if isinstance(default, Mapping):
            if set(default) != set(COMPONENTS):
                raise ValueError(
                    f"a precision per component names vision, qformer and llm; got {dict(default)!r}"
                )
            default = {component: str(default[component]) for component in COMPONENTS}
        elif not isinstance(default, str):
            raise ValueError(
                f"precision for {device} must be a preset or a precision per component; got {default!r}"
            )
        by_device[device] = default
    return by_device


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key in ("families", "models", "decoding", "answer_decoding"):
        if key in extra:
            merged[key] = {**base.get(key, {}), **extra[key]}
    return merged


def _read_user_file(path: Path) -> dict[str, Any]:
    data = read_json(path) if path.exists() else None
    if data is None:
        raise ModelLoadError(f"The models file {path} does not exist.")
    if not isinstance(data, dict) or not ({"models", "families", "decoding"} & data.keys()):
        raise ModelLoadError(
            f"The models file {path} must be a JSON object with a 'models' (and optionally 'families' "
            "or 'decoding') key, like blip2_app/registry.json."
        )
    return data
