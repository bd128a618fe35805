"""Training configurations: typed dataclasses, validated on creation, read from JSON files.

`TrainConfig.load("shapes-demo")` reads `configs/shapes-demo.json` beside this file; a path to any
JSON file of the same shape works too. Unknown keys are refused, so a typo cannot be ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).with_name("configs")


def _positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{type(owner).__name__}.{name} must be a positive number; got {value!r}.")


@dataclass(frozen=True)
class ArchitectureConfig:
    """Sizes of the four parts. Small on purpose: the whole pipeline trains on 2 CPU cores."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    qformer_hidden: int = 96
    qformer_layers: int = 2
    qformer_heads: int = 4
    lm_hidden: int = 128
    lm_layers: int = 2
    lm_heads: int = 2
    lm_context: int = 256
    num_query_tokens: int = 8
    embed_dim: int = 64  # ITC projection size (`image_text_hidden_size`)
    # BERT's 0.02 suits a Q-Former initialised from BERT, as BLIP-2's is. From scratch, 0.02 leaves
    # every image and every text with nearly the same embedding, a saddle ITC takes ~80 steps to
    # leave; 0.1 leaves it in ~20 (measured on the shapes data).
    qformer_init_range: float = 0.1
    # InstructBLIP's recipe: the captioning model's Q-Former reads the prompt beside the image
    # (`InstructBlipForConditionalGeneration`, family instructblip-opt), and the scene code gets a
    # 13th word, the answer to the question asked ("no" under a caption): the language model learns
    # to read the answer there, and the Q-Former, which sees both question and image, to put it
    # there. Needs lm_prefix "scene" and 13 query tokens.
    question_aware: bool = False

    def __post_init__(self) -> None:
        _positive(self, *(f.name for f in fields(self) if f.name != "question_aware"))
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size.")
        for hidden, heads in (
            ("vision_hidden", "vision_heads"),
            ("qformer_hidden", "qformer_heads"),
            ("lm_hidden", "lm_heads"),
        ):
            if getattr(self, hidden) % getattr(self, heads):
                raise ValueError(f"{hidden} must be a multiple of {heads}.")


@dataclass(frozen=True)
class DataConfig:
    train_images: int = 12000
    val_images: int = 300
    test_images: int = 300
    # How the images are drawn (synthetic.STYLES): "classic" (the first generator) or "random"
    # (domain randomisation); "paint" is the held-out evaluation renderer and refused here.
    style: str = "classic"
    classic_share: float = 0.0  # with style "random": this share of the scenes is classic
    # The share in the scenes of the language model and stage 2 (None: classic_share). More classic
    # scenes there keep captions of the classic pictures as good as a classic-only model's, while
    # the vision encoder and the retrieval twin learn from the more varied mix.
    captioning_classic_share: float | None = None

    def __post_init__(self) -> None:
        _positive(self, "train_images", "val_images", "test_images")
        if self.captioning_classic_share is not None and not 0.0 <= self.captioning_classic_share <= 1.0:
            raise ValueError("data.captioning_classic_share must be between 0 and 1 (or null).")
        if self.style not in ("classic", "random"):
            raise ValueError(
                f"data.style must be 'classic' or 'random' ('paint' is for evaluation only); got {self.style!r}."
            )
        if not 0.0 <= self.classic_share <= 1.0:
            raise ValueError("data.classic_share must be between 0 and 1.")

    @property
    def captioning_share(self) -> float:
        return self.classic_share if self.captioning_classic_share is None else self.captioning_classic_share


@dataclass(frozen=True)
class PhaseConfig:
    """One optimisation phase: AdamW with linear warm-up, then cosine decay to 10% of `lr`."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 50
    weight_decay: float = 0.05
    checkpoint_every: int = 500
    # PyTorch threads from step `threads_from_step` on (None: the config's `threads` throughout;
    # the steps before it use the config's `threads`). Float sums split across threads round
    # differently, so the schedule is part of the recipe, fixed here, never chosen at run time.
    threads: int | None = None
    threads_from_step: int = 0
    # Each step's batch computed in this many parts (micro-batches), their gradients summed in
    # order: the weights are the same whether the parts run one after another or side by side, so
    # the trainer runs up to `TrainConfig.workers` at once whenever the phase has the cores to itself.
    micro_batches: int = 1

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "lr", "checkpoint_every", "micro_batches")
        if self.micro_batches > self.batch_size:
            raise ValueError("micro_batches must not exceed batch_size.")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must not be negative.")
        if self.threads is not None:
            _positive(self, "threads")
        if not 0 <= self.threads_from_step <= self.steps:
            raise ValueError(f"threads_from_step must be between 0 and steps ({self.steps}).")
        if self.threads_from_step and self.threads is None:
            raise ValueError("threads_from_step needs threads: the count the phase switches to.")


@dataclass(frozen=True)
class TrainConfig:
    """The whole recipe: data, sizes, and the four phases in the order they run."""

    name: str
    seed: int = 0
    threads: int = 2
    # Micro-batches computed at once (each on its own thread) by a phase that has the machine to
    # itself; the `--parallel` run uses one while its second process trains the language model.
    workers: int = 2
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    architecture: ArchitectureConfig = dataclasses.field(default_factory=ArchitectureConfig)
    vision: PhaseConfig = dataclasses.field(default_factory=lambda: PhaseConfig(600, 64, 1e-3))
    language: PhaseConfig = dataclasses.field(default_factory=lambda: PhaseConfig(800, 64, 1e-3))
    stage1: PhaseConfig = dataclasses.field(default_factory=lambda: PhaseConfig(1500, 64, 5e-4))
    stage2: PhaseConfig = dataclasses.field(default_factory=lambda: PhaseConfig(2000, 64, 1e-3))
    caption_fraction: float = 0.3  # share of stage-2 samples that are captions (the rest VQA)
    lm_caption_fraction: float = 0.3  # the same for language-model pretraining
    # Language-model pretraining: questions asked one after another about one scene code, per text
    # (1: one question a text, as the app asks; more: more answers to learn from per step).
    lm_questions_per_text: int = 1
    prefix_fraction: float = 0.5  # share of LM pretraining texts preceded by a description of the scene
    # That description: "caption" (the canonical caption), "scene" (`synthetic.scene_code`: 12
    # words in a fixed layout, one per query token when num_query_tokens is 12) or "slots" (one
    # summed embedding per slot, each over num_query_tokens / 3 positions: `phases.SceneCode`).
    lm_prefix: str = "caption"
    # Stage 2: weight of the loss pulling each query output towards the LM's embedding of its
    # position of the scene code (0: the LM loss alone). Needs lm_prefix "scene" or "slots".
    code_loss_weight: float = 0.0
    # Share of questions (LM pretraining and stage 2) asked as the chat tab asks them: after none
    # or one earlier turn about the same image, in the app's chat template.
    chat_fraction: float = 0.0
    # Share of questions (LM pretraining and stage 2) that come with an instruction and / or
    # few-shot examples, as the chat tab can send them (`phases.varied_prompt`).
    prompt_variety: float = 0.0
    # The same share for language-model pretraining alone when it differs from stage 2's (None: the
    # same). The shipped recipe asks more of stage 2, whose question-aware Q-Former must find the
    # question after the examples; the language model kept the share it was trained with.
    language_prompt_variety: float | None = None
    # Stage 1 also matches phrases about one object (and their false twins): the randomised recipe.
    object_phrases: bool = False
    # With object_phrases, one image in this many gets such a phrase pair (1: every image). More
    # pairs teach the ITM head the Explain tab's "the red circle" vs "the blue circle".
    phrase_share: int = 4
    # Stage 1: weight of the loss on each colour and shape named alone ("a red shape", "a photo of
    # a circle"; `QFormerPretraining._attribute_loss`), which search negatives and zero-shot labels
    # need (0: none).
    attribute_queries: float = 0.0

    PHASES = ("vision", "language", "stage1", "stage2")

    @property
    def stage1_phrase_share(self) -> int:
        """One image in this many gets an object phrase pair in stage 1; 0: none."""
        return self.phrase_share if self.object_phrases else 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("A training config needs a name.")
        _positive(self, "threads", "workers", "lm_questions_per_text", "phrase_share")
        if self.lm_prefix not in ("caption", "scene", "slots"):
            raise ValueError(f"lm_prefix must be 'caption', 'scene' or 'slots'; got {self.lm_prefix!r}.")
        queries = self.architecture.num_query_tokens
        if self.lm_prefix == "slots" and queries % 3:
            raise ValueError("lm_prefix 'slots' needs num_query_tokens a multiple of 3 (one share per slot).")
        if self.code_loss_weight < 0:
            raise ValueError("code_loss_weight must not be negative.")
        if not isinstance(self.phrase_share, int):
            raise ValueError(f"phrase_share must be a whole number; got {self.phrase_share!r}.")
        if self.attribute_queries < 0:
            raise ValueError("attribute_queries must not be negative.")
        question_aware = self.architecture.question_aware
        scene_words = 13 if question_aware else 12
        if question_aware and (
            self.lm_prefix != "scene" or queries != scene_words or self.lm_questions_per_text != 1
        ):
            raise ValueError(
                "question_aware needs lm_prefix 'scene', 13 query tokens and one question a text."
            )
        if self.code_loss_weight and (
            self.lm_prefix == "caption" or (self.lm_prefix == "scene" and queries != scene_words)
        ):
            raise ValueError("code_loss_weight needs lm_prefix 'slots', or 'scene' with 12 query tokens.")
        for name in (
            "caption_fraction",
            "lm_caption_fraction",
            "prefix_fraction",
            "chat_fraction",
            "prompt_variety",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1.")
        if self.language_prompt_variety is not None and not 0.0 <= self.language_prompt_variety <= 1.0:
            raise ValueError("language_prompt_variety must be between 0 and 1 (or null).")

    def threads_at(self, phase: str, step: int) -> int:
        """The PyTorch thread count of `phase`'s step `step` (and of its set-up at step 0)."""
        config: PhaseConfig = getattr(self, phase)
        if config.threads is None or step < config.threads_from_step:
            return self.threads
        return config.threads

    def with_threads(self, threads: int) -> TrainConfig:
        """Every phase on `threads` threads (`--threads`), its micro-batches one after another: the
        schedule of the config dropped."""
        phases = {
            name: dataclasses.replace(getattr(self, name), threads=None, threads_from_step=0)
            for name in self.PHASES
        }
        return dataclasses.replace(self, threads=threads, workers=1, **phases)

    @property
    def lm_prompt_variety(self) -> float:
        """The prompt-variety share language-model pretraining uses."""
        if self.language_prompt_variety is None:
            return self.prompt_variety
        return self.language_prompt_variety

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown training config keys: {', '.join(sorted(unknown))}.")
        values = dict(data)
        nested = {"data": DataConfig, "architecture": ArchitectureConfig}
        for key, kind in nested.items():
            if key in values:
                values[key] = _build(kind, values[key], key)
        for key in cls.PHASES:
            if key in values:
                values[key] = _build(PhaseConfig, values[key], key)
        return cls(**values)

    @classmethod
    def load(cls, name_or_path: str | Path) -> TrainConfig:
        path = Path(name_or_path)
        if not path.suffix:
            path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
            raise ValueError(f"No training config {name_or_path!r}; built in: {available}.")
        return cls.from_dict(json.loads(path.read_text()))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _build(kind: type, values: Any, key: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"Training config section {key!r} must be an object.")
    unknown = set(values) - {f.name for f in fields(kind)}
    if unknown:
        raise ValueError(f"Unknown keys in {key!r}: {', '.join(sorted(unknown))}.")
    return kind(**values)
