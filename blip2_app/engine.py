"""The engine: captions, answers, chat (and its token stream), features, ITC and ITM.

Plain Python, no Gradio: the UI, the CLI, the tests and the benchmarks all call this. It holds one
text backend (backends/: this process or a vLLM server; none for a retrieval-only app) and the
retrieval model, and owns what does not depend on where text is generated: prompts, checking
they fit the context, decoding answers, the image-feature cache, and retrieval (ITC / ITM).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .backends.base import AnswerDone, AnswerSoFar, ReusesChatPrefix, StreamEvent, TextBackend
from .cache import FeatureCache
from .chat_prefix import PrefixSlot
from .errors import InvalidRequestError
from .generation import GenerationSettings
from .images import ImageLimits, image_content_hash, load_image
from .loading import LoadedModel
from .prompts import (
    BuiltPrompt,
    ChatTurn,
    caption_prompt,
    chat_prompt,
    clean_answer,
    context_notes,
    vqa_prompt,
)
from .registry import PromptTemplates

log = logging.getLogger(__name__)

ImageInput = Any  # path, bytes, PIL image, numpy array or a Gradio file dict: see images.load_image
Progress = Callable[[int, int], None]
EMPTY_TEXT_NOTICE = "(The model returned no text for this image. Try nucleus sampling, or a custom prompt.)"
# LAVIS' Q-Former text length for retrieval (max_txt_len); longer queries are cut, not refused.
MAX_RETRIEVAL_TEXT_TOKENS = 35


@dataclass(frozen=True)
class PreparedImage:
    image: Any  # PIL.Image.Image, RGB
    content_hash: str


@dataclass(frozen=True)
class Generated:
    """One generated text, pipeline-shaped via `as_dict()`."""

    text: str
    token_ids: tuple[int, ...]
    prompt: str
    empty: bool = False
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "generated_text": self.text,
            "prompt": self.prompt,
            "empty": self.empty,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class ScoredAnswer:
    """One of beam search's k best answers (`Engine.answer_topk`); `score` is in (0, 1]."""

    answer: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"answer": self.answer, "score": self.score}


@dataclass
class ImageFeatures:
    """LAVIS `extract_features(mode="image")`: query outputs and their normalised projections."""

    content_hashes: list[str]
    query_outputs: torch.Tensor  # (n, num_query_tokens, qformer_hidden)
    projections: torch.Tensor  # (n, num_query_tokens, embed_dim), L2-normalised rows


def query_outputs(model, image_embeds: torch.Tensor, qformer_ids=None, qformer_mask=None) -> torch.Tensor:
    """Q-Former over the image, as in transformers' get_image_features (InstructBLIP: with text).
    The one place the queries are run: the engine serves with it and the trainer trains with it."""
    # The Q-Former's own dtype (its query tokens'): with per-component precision the vision encoder
    # may hand bf16 features to an fp32 or int8 Q-Former (InstructBLIP's does not cast them itself).
    image_embeds = image_embeds.to(model.query_tokens.dtype)
    query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    if qformer_ids is None:
        out = model.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )
        return out.last_hidden_state
    query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=image_embeds.device)
    out = model.qformer(
        input_ids=qformer_ids,
        attention_mask=torch.cat([query_mask, qformer_mask], dim=1),
        query_embeds=query_tokens,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
    )
    return out.last_hidden_state[:, : query_tokens.shape[1], :]


def qformer_chunks(loaded: LoadedModel, image_embeds: torch.Tensor) -> Generator[torch.Tensor, None, None]:
    """`image_embeds` in the slices the Q-Former may read in one call: one image at a time where
    its rows depend on their batch-mates (int8 activations share one scale per call), so that an
    image's features are the same whichever images it came with; else all at once (an empty
    batch: one empty slice)."""
    rows = 1 if loaded.batch_dependent("qformer") else max(1, len(image_embeds))
    for start in range(0, max(1, len(image_embeds)), rows):
        yield image_embeds[start : start + rows]


class VisionCache:
    """Per-image tensors in the engine's FeatureCache, the missing ones computed in batches. The
    engine's retrieval features and the local backend's image tokens both read through it, so a
    captioning and a retrieval model that share one vision encoder also share its outputs."""

    def __init__(self, cache: FeatureCache, batch_size: int = 8):
        self.cache = cache
        self.batch_size = batch_size

    def cached(
        self,
        namespace: tuple,
        images: list[PreparedImage],
        compute: Callable[[list[PreparedImage]], torch.Tensor],
        progress: Progress | None = None,
        one_at_a_time: bool = False,
    ) -> torch.Tensor:
        """`one_at_a_time`: for a batch-dependent precision, so that an image's cached value is
        the same whichever images it came with (measured faster too at dynamic-int8: the vision
        encoder took 1.01 s an image alone, 1.27 s in a batch of 4, real size)."""
        keys = [(*namespace, p.content_hash) for p in images]
        found: dict[int, torch.Tensor] = {}
        for i, key in enumerate(keys):
            if (value := self.cache.get(key)) is not None:
                found[i] = value
        missing = [i for i in range(len(images)) if i not in found]
        done = len(images) - len(missing)
        if progress:
            progress(done, len(images))
        size = 1 if one_at_a_time else self.batch_size
        for start in range(0, len(missing), size):
            chunk = missing[start : start + size]
            with torch.inference_mode():
                values = compute([images[i] for i in chunk])
            for i, value in zip(chunk, values, strict=True):
                found[i] = value
                self.cache.put(keys[i], value)
            done += len(chunk)
            if progress:
                progress(done, len(images))
        return torch.stack([found[i] for i in range(len(images))])

    def vision_embeds(self, loaded: LoadedModel, images: list[PreparedImage], progress=None) -> torch.Tensor:
        """Vision encoder output. Keyed by the encoder module and the pixel preprocessing."""
        vision = loaded.model.vision_model

        def compute(batch: list[PreparedImage]) -> torch.Tensor:
            pixels = loaded.processor.image_processor(
                [p.image for p in batch], return_tensors="pt"
            ).pixel_values
            pixels = pixels.to(loaded.device, loaded.component_dtype("vision"))
            return vision(pixel_values=pixels).last_hidden_state

        namespace = ("vision", id(vision), loaded.pixel_signature, loaded.weights_final)
        return self.cached(
            namespace, images, compute, progress, one_at_a_time=loaded.batch_dependent("vision")
        )


@dataclass
class EngineInfo:
    text: dict[str, Any] | None  # the text backend's report (has "backend")
    matcher: dict[str, Any] | None
    cache: dict[str, int] = field(default_factory=dict)


class Engine:
    """One text backend (or none: retrieval only) and one retrieval model (or none)."""

    def __init__(
        self,
        text: TextBackend | None,
        matcher: LoadedModel | None = None,
        cache: FeatureCache | None = None,
        image_limits: ImageLimits | None = None,
        vision_batch_size: int = 8,
    ):
        if text is None and matcher is None:
            raise ValueError("The engine needs a captioning model, a retrieval model, or both.")
        if text is not None and not text.entry.family.generates_text:
            raise ValueError(f"{text.entry.name} cannot generate text; load it as the retrieval model.")
        self.text = text
        self.matcher = matcher
        self.cache = cache if cache is not None else FeatureCache()
        self.vision = VisionCache(self.cache, vision_batch_size)
        if text is not None:
            text.bind(self.vision)
        self.image_limits = image_limits or ImageLimits()
        # Sentences the UI shows above every tab (e.g. why a fallback model was loaded).
        self.notices: list[str] = []

    # ----------------------------------------------------------------- images
    def prepare(self, images: Sequence[ImageInput] | ImageInput) -> list[PreparedImage]:
        """Decode safely (see images.py) and hash; raises ImageDecodeError with a specific sentence."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise InvalidRequestError("No image was given.")
        prepared = []
        for source in images:
            if isinstance(source, PreparedImage):
                prepared.append(source)
                continue
            image = load_image(source, self.image_limits)
            prepared.append(PreparedImage(image, image_content_hash(image)))
        return prepared

    # ----------------------------------------------------------------- text generation
    def _require_text(self) -> TextBackend:
        if self.text is None:
            raise InvalidRequestError("No captioning model is loaded in this app (retrieval only).")
        return self.text

    def _templates(self) -> PromptTemplates:
        templates = self._require_text().entry.templates
        if templates is None:  # the registry gives every captioning family its templates
            raise ValueError(f"{self._require_text().entry.name} has no prompt templates.")
        return templates

    def generate_ids(
        self, images: Sequence[ImageInput], prompts: Sequence[str], generation: GenerationSettings
    ) -> list[list[list[int]]]:
        """New token ids per image, `generation.num_captions` sequences each (padding stripped)."""
        text = self._require_text()
        prepared = self.prepare(list(images))
        prompts = list(prompts)
        if len(prompts) != len(prepared):
            raise ValueError("generate_ids needs one prompt per image.")
        self._check_room(prompts, generation)
        return text.generate_ids(prepared, prompts, generation)

    def _check_room(self, prompts: Sequence[str], generation: GenerationSettings) -> None:
        room = self.prompt_token_budget(generation)
        text = self._require_text()
        for prompt in prompts:
            if text.count_tokens(prompt) > room:
                raise InvalidRequestError(
                    f"The prompt is too long for this model: at most {room} tokens fit beside the image "
                    f"and {generation.max_new_tokens} new tokens."
                )

    def prompt_token_budget(self, generation: GenerationSettings) -> int:
        """How many prompt tokens fit in the context next to the image tokens (and the output)."""
        text = self._require_text()
        context = text.context_tokens
        room = context - text.image_tokens
        if text.entry.family.decoder_only:  # the output shares the context with the prompt
            room -= generation.max_new_tokens
        if room < 16:
            raise InvalidRequestError(
                f"max_new_tokens={generation.max_new_tokens} leaves no room for a prompt in this model's "
                f"{context}-token context."
            )
        return room

    def _decode(self, token_ids: list[int], prompt: str, clean: bool, notes=()) -> Generated:
        backend = self._require_text()
        text = clean_answer(backend.decode(token_ids), backend.entry.templates if clean else None)
        if not text:
            return Generated(EMPTY_TEXT_NOTICE, tuple(token_ids), prompt, empty=True, notes=tuple(notes))
        return Generated(text, tuple(token_ids), prompt, notes=tuple(notes))

    def unsupported_knobs(self) -> dict[str, str]:
        """Decoding knobs the text backend cannot honour, each with the sentence shown in the UI."""
        return self.text.unsupported_knobs() if self.text is not None else {}

    def default_generation(self) -> GenerationSettings:
        return self._require_text().entry.decoding

    def caption_text(self, style: str = "short", prompt: str | None = None) -> str:
        """The text a caption of `style` continues (the custom style's is `prompt`)."""
        return caption_prompt(self._templates(), style, prompt)

    def answer_text(self, question: str, short: bool = True, instruction: str = "") -> str:
        """The prompt of one VQA turn with no history."""
        return vqa_prompt(self._templates(), question, short=short, instruction=instruction)

    def check_prompt(self, prompt: str, generation: GenerationSettings) -> None:
        """InvalidRequestError if `prompt` does not fit beside the image and the new tokens."""
        self._check_room([prompt], generation)

    def complete(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str],
        generation: GenerationSettings,
        clean: Sequence[bool],
    ) -> list[list[Generated]]:
        """One prompt per image, as one batch (prompts may differ): `generation.num_captions`
        texts each; `clean[i]` cleans an answer (captions are kept as written). What `caption`
        and `answer` run, alone or batched with other visitors' requests (batching.py)."""
        ids = self.generate_ids(images, prompts, generation)
        return [
            [self._decode(seq, prompt, clean=cleaned) for seq in per_image]
            for per_image, prompt, cleaned in zip(ids, prompts, clean, strict=True)
        ]

    def caption(
        self,
        images: Sequence[ImageInput] | ImageInput,
        style: str = "short",
        prompt: str | None = None,
        generation: GenerationSettings | None = None,
    ) -> list[list[Generated]]:
        """Captions for each image (a batch), `generation.num_captions` each."""
        generation = generation or self.default_generation()
        text = self.caption_text(style, prompt)
        prepared = self.prepare(images)
        return self.complete(prepared, [text] * len(prepared), generation, [False] * len(prepared))

    def answer(
        self,
        image: ImageInput,
        question: str,
        generation: GenerationSettings | None = None,
        short: bool = True,
        instruction: str = "",
    ) -> Generated:
        """One VQA turn, no history: `Question: {q} Short answer:` (or the chat form if not short)."""
        generation = generation or self._require_text().entry.answer_decoding
        prompt = self.answer_text(question, short=short, instruction=instruction)
        return self.complete([image], [prompt], generation.replace(num_captions=1), [True])[0][0]

    def answer_topk(
        self,
        image: ImageInput,
        question: str,
        k: int = 3,
        generation: GenerationSettings | None = None,
        short: bool = True,
        instruction: str = "",
    ) -> list[ScoredAnswer]:
        """Beam search's `k` best answers (k <= num_beams), best first, each with a score in (0, 1]:
        exp of transformers' `sequences_scores`, the answer's summed token log-probabilities over
        its length ** length_penalty; at length_penalty 1 (the VQA default) that is the geometric
        mean of its token probabilities. Answers that read the same once cleaned are given once,
        at their best score, so fewer than `k` may come back."""
        generation = (generation or self._require_text().entry.answer_decoding).replace(decoding="beam")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= generation.num_beams:
            raise InvalidRequestError(
                f"k must be a whole number from 1 to num_beams ({generation.num_beams}); got {k!r}."
            )
        generation = generation.replace(num_captions=k)
        prompt = self.answer_text(question, short=short, instruction=instruction)
        self._check_room([prompt], generation)
        prepared = self.prepare(image)[0]
        answers: dict[str, ScoredAnswer] = {}
        for ids, log_score in self._require_text().scored_ids(prepared, prompt, generation):
            result = self._decode(ids, prompt, clean=True)
            text = "" if result.empty else result.text
            if text not in answers:
                answers[text] = ScoredAnswer(text, math.exp(min(0.0, log_score)))
        return sorted(answers.values(), key=lambda answer: -answer.score)

    def answer_batch(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str],
        generation: GenerationSettings | None = None,
    ) -> list[Generated]:
        """Several (image, question) pairs in one batch; prompts may differ in length."""
        generation = (generation or self._require_text().entry.answer_decoding).replace(num_captions=1)
        prompts = [self.answer_text(q) for q in questions]
        return [texts[0] for texts in self.complete(images, prompts, generation, [True] * len(prompts))]

    def build_chat_prompt(
        self,
        question: str,
        history: Sequence[ChatTurn] = (),
        exemplars: Sequence[ChatTurn] = (),
        instruction: str = "",
        generation: GenerationSettings | None = None,
    ) -> BuiltPrompt:
        backend = self._require_text()
        generation = generation or self.default_generation()
        return chat_prompt(
            self._templates(),
            question,
            history,
            exemplars,
            instruction,
            count_tokens=backend.count_tokens,
            max_tokens=self.prompt_token_budget(generation),
        )

    def chat(
        self,
        image: ImageInput,
        question: str,
        history: Sequence[ChatTurn] = (),
        exemplars: Sequence[ChatTurn] = (),
        instruction: str = "",
        generation: GenerationSettings | None = None,
    ) -> Generated:
        generation = (generation or self.default_generation()).replace(num_captions=1)
        built = self.build_chat_prompt(question, history, exemplars, instruction, generation)
        ids = self.generate_ids([image], [built.text], generation)
        return self._decode(ids[0][0], built.text, clean=True, notes=context_notes(built))

    def chat_stream(
        self,
        image: ImageInput,
        question: str,
        history: Sequence[ChatTurn] = (),
        exemplars: Sequence[ChatTurn] = (),
        instruction: str = "",
        generation: GenerationSettings | None = None,
        prefix: PrefixSlot | None = None,
    ) -> Generator[StreamEvent, None, None]:
        """`AnswerSoFar` each time the shown answer grows, then one `AnswerDone` (beam search
        cannot stream: `AnswerDone` only). Closing the iterator stops the generation. `prefix`:
        the chat session's cached prefix, reused and updated when the backend can (chat_prefix.py)."""
        generation = (generation or self.default_generation()).replace(num_captions=1)
        if generation.decoding == "beam":
            result = self.chat(image, question, history, exemplars, instruction, generation)
            yield AnswerDone(result.text, result.empty)
            return
        backend = self._require_text()
        built = self.build_chat_prompt(question, history, exemplars, instruction, generation)
        self._check_room([built.text], generation)
        prepared = self.prepare(image)[0]
        ids: list[int] = []
        shown = ""
        if prefix is not None and isinstance(backend, ReusesChatPrefix):
            ids_stream = backend.stream_chat_ids(prepared, built.text, generation, prefix)
        else:
            ids_stream = backend.stream_ids(prepared, built.text, generation)
        with closing(ids_stream) as stream:
            for new_ids in stream:
                ids.extend(new_ids)
                # A character split over several byte-level tokens shows once all its bytes are in.
                text = clean_answer(backend.decode(ids).rstrip("\ufffd"), backend.entry.templates)
                if text and text != shown:
                    shown = text
                    yield AnswerSoFar(shown)
        final = self._decode(ids, built.text, clean=True)
        yield AnswerDone(final.text, final.empty)

    # ----------------------------------------------------------------- retrieval features
    def _require_matcher(self) -> LoadedModel:
        if self.matcher is None:
            raise InvalidRequestError(
                "No retrieval model is loaded in this app; start it with --retrieval-model."
            )
        return self.matcher

    def image_features(self, images: Sequence[ImageInput], progress: Progress | None = None) -> ImageFeatures:
        """32 query outputs per image and their normalised 256-d projections (LAVIS semantics)."""
        loaded = self._require_matcher()
        model = loaded.model
        prepared = self.prepare(images)
        image_embeds = self.vision.vision_embeds(loaded, prepared, progress)
        # An image's features are the same in a gallery and as a query (qformer_chunks).
        queries, projected = [], []
        with torch.inference_mode():
            for chunk in qformer_chunks(loaded, image_embeds):
                query = query_outputs(model, chunk)
                queries.append(query)
                projected.append(model.vision_projection(query.to(input_dtype(model.vision_projection))))
        query, projections = torch.cat(queries), F.normalize(torch.cat(projected), dim=-1)
        return ImageFeatures([p.content_hash for p in prepared], query.float(), projections.float())

    def _text_tokens(self, texts: Sequence[str]):
        loaded = self._require_matcher()
        texts = [t if t.strip() else "" for t in texts]
        return loaded.processor.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=MAX_RETRIEVAL_TEXT_TOKENS,
            return_tensors="pt",
        ).to(loaded.device)

    def retrieval_text_overflow(self, text: str) -> int:
        """Tokens of a search text past the MAX_RETRIEVAL_TEXT_TOKENS the Q-Former reads (0: none)."""
        tokenizer = self._require_matcher().processor.tokenizer
        return max(0, len(tokenizer(text).input_ids) - MAX_RETRIEVAL_TEXT_TOKENS)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised projection of the Q-Former's CLS output for each text: (n, embed_dim)."""
        loaded = self._require_matcher()
        model = loaded.model
        tokens = self._text_tokens(texts)
        with torch.inference_mode():
            embeds = model.embeddings(input_ids=tokens.input_ids)
            out = model.qformer(query_embeds=embeds, query_length=0, attention_mask=tokens.attention_mask)
            cls = out.last_hidden_state[:, 0, :].to(input_dtype(model.text_projection))
            return F.normalize(model.text_projection(cls), dim=-1).float()

    def multimodal_features(self, images: Sequence[ImageInput], texts: Sequence[str]) -> torch.Tensor:
        """Query outputs after attending to the image and the paired text: (n, num_query_tokens, hidden)."""
        loaded = self._require_matcher()
        model = loaded.model
        prepared = self.prepare(images)
        if len(texts) != len(prepared):
            raise ValueError("multimodal_features needs one text per image.")
        image_embeds = self.vision.vision_embeds(loaded, prepared)
        tokens = self._text_tokens(texts)
        with torch.inference_mode():
            query_tokens = model.query_tokens.expand(len(prepared), -1, -1)
            embeds = model.embeddings(input_ids=tokens.input_ids, query_embeds=query_tokens)
            query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=loaded.device)
            out = model.qformer(
                query_embeds=embeds,
                query_length=query_tokens.shape[1],
                attention_mask=torch.cat([query_mask, tokens.attention_mask], dim=1),
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(
                    image_embeds.shape[:-1], dtype=torch.long, device=loaded.device
                ),
            )
            return out.last_hidden_state[:, : query_tokens.shape[1], :]

    def itc(self, images: Sequence[ImageInput], texts: Sequence[str]) -> torch.Tensor:
        """BLIP-2 ITC score (n_images, n_texts): max over query tokens of cosine(query proj, text proj)."""
        image = self.image_features(images).projections
        text = self.text_features(texts)
        return torch.einsum("iqd,td->iqt", image, text).amax(dim=1)

    def itm(self, images: Sequence[ImageInput], texts: Sequence[str]) -> torch.Tensor:
        """ITM match probability for each (image, text) pair: softmax of the head, mean over queries."""
        model = self._require_matcher().model
        multimodal = self.multimodal_features(images, texts)
        with torch.inference_mode():
            logits = model.itm_head(multimodal.to(input_dtype(model.itm_head))).mean(dim=1)
            return logits.float().softmax(dim=-1)[:, 1]

    # ----------------------------------------------------------------- status
    def info(self) -> EngineInfo:
        stats = self.cache.stats()
        return EngineInfo(
            text=self.text.report() if self.text else None,
            matcher=self.matcher.report() if self.matcher else None,
            cache=dict(vars(stats)),
        )


def input_dtype(layer: torch.nn.Module) -> torch.dtype:
    """The dtype a Linear layer expects; dynamic-int8 layers take fp32 (their .weight is a method)."""
    weight = layer.weight
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
