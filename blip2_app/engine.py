"""The engine: captions, answers, chat (and its token stream), features, ITC and ITM.

Plain Python, no Gradio: the UI, the CLI, the tests and the benchmarks all call this. It follows
transformers' shape (processor -> generate -> batch_decode) but splits `generate` in two so the
image half can be cached: the vision encoder and Q-Former run once per image, then every prompt
about that image reuses their output (the LRU in `cache.py`, keyed by the image content hash).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TextIteratorStreamer

from .cache import FeatureCache
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

log = logging.getLogger(__name__)

ImageInput = Any  # path, bytes, PIL image, numpy array or a Gradio file dict: see images.load_image
Progress = Callable[[int, int], None]
EMPTY_TEXT_NOTICE = "(The model returned no text for this image. Try nucleus sampling, or a custom prompt.)"
STREAM_TIMEOUT_S = 300.0
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


@dataclass
class ImageFeatures:
    """LAVIS `extract_features(mode="image")`: query outputs and their normalised projections."""

    content_hashes: list[str]
    query_outputs: torch.Tensor  # (n, num_query_tokens, qformer_hidden)
    projections: torch.Tensor  # (n, num_query_tokens, embed_dim), L2-normalised rows


def query_outputs(model, image_embeds: torch.Tensor, qformer_ids=None, qformer_mask=None) -> torch.Tensor:
    """Q-Former over the image, as in transformers' get_image_features (InstructBLIP: with text).
    The one place the queries are run: the engine serves with it and the trainer trains with it."""
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


@dataclass
class EngineInfo:
    captioner: dict[str, Any] | None
    matcher: dict[str, Any] | None
    cache: dict[str, int] = field(default_factory=dict)


class Engine:
    def __init__(
        self,
        captioner: LoadedModel | None,
        matcher: LoadedModel | None = None,
        cache: FeatureCache | None = None,
        image_limits: ImageLimits | None = None,
        vision_batch_size: int = 8,
    ):
        if captioner is None and matcher is None:
            raise ValueError("The engine needs a captioning model, a retrieval model, or both.")
        if captioner is not None and not captioner.entry.family.generates_text:
            raise ValueError(f"{captioner.entry.name} cannot generate text; load it as the retrieval model.")
        self.captioner = captioner
        self.matcher = matcher
        self.cache = cache if cache is not None else FeatureCache()
        self.image_limits = image_limits or ImageLimits()
        self.vision_batch_size = vision_batch_size
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

    def _cached(
        self,
        namespace: tuple,
        images: list[PreparedImage],
        compute: Callable[[list[PreparedImage]], torch.Tensor],
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """Per-image tensors from the cache; the missing ones are computed in batches and stored."""
        keys = [(*namespace, p.content_hash) for p in images]
        found = {i: self.cache.get(k) for i, k in enumerate(keys)}
        missing = [i for i, v in found.items() if v is None]
        done = len(images) - len(missing)
        if progress:
            progress(done, len(images))
        for start in range(0, len(missing), self.vision_batch_size):
            chunk = missing[start : start + self.vision_batch_size]
            with torch.inference_mode():
                values = compute([images[i] for i in chunk])
            for i, value in zip(chunk, values, strict=True):
                found[i] = value
                self.cache.put(keys[i], value)
            done += len(chunk)
            if progress:
                progress(done, len(images))
        return torch.stack([found[i] for i in range(len(images))])

    def _vision_embeds(self, loaded: LoadedModel, images: list[PreparedImage], progress=None) -> torch.Tensor:
        """Vision encoder output. Keyed by the encoder module and the pixel preprocessing, so a
        captioning and a retrieval model that share one encoder also share its cached outputs."""
        vision = loaded.model.vision_model

        def compute(batch: list[PreparedImage]) -> torch.Tensor:
            pixels = loaded.processor.image_processor(
                [p.image for p in batch], return_tensors="pt"
            ).pixel_values
            pixels = pixels.to(loaded.device, loaded.component_dtype("vision"))
            return vision(pixel_values=pixels).last_hidden_state

        return self._cached(("vision", id(vision), loaded.pixel_signature), images, compute, progress)

    def _language_inputs(self, images: list[PreparedImage], prompts: list[str]) -> torch.Tensor:
        """Image tokens for the language model: (n, num_query_tokens, llm_hidden)."""
        loaded = self._require_captioner()
        model = loaded.model

        def project(query_output: torch.Tensor) -> torch.Tensor:
            # get_image_features casts the Q-Former output to the vision dtype before projecting;
            # with per-component precision the projection's own dtype is the one that must match.
            return model.language_projection(query_output.to(input_dtype(model.language_projection)))

        if not loaded.entry.family.instruction_aware:
            return self._cached(
                ("language_inputs", id(model)),
                images,
                lambda batch: project(query_outputs(loaded.model, self._vision_embeds(loaded, batch))),
            )
        # InstructBLIP's Q-Former reads the instruction too: only the vision encoder is cached.
        image_embeds = self._vision_embeds(loaded, images)
        qformer = loaded.processor.qformer_tokenizer(
            prompts, padding=True, truncation=True, return_tensors="pt"
        ).to(loaded.device)
        with torch.inference_mode():
            return project(
                query_outputs(loaded.model, image_embeds, qformer.input_ids, qformer.attention_mask)
            )

    # ----------------------------------------------------------------- text generation
    def _require_captioner(self) -> LoadedModel:
        if self.captioner is None:
            raise InvalidRequestError("No captioning model is loaded in this app (retrieval only).")
        return self.captioner

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask exactly as the processor builds them (image tokens first),
        padded as a whole so pads never sit between the image tokens and the text (transformers#34223)."""
        loaded = self._require_captioner()
        tokenizer = loaded.processor.tokenizer
        image_ids = tokenizer.convert_tokens_to_ids([loaded.processor.image_token.content])
        image_ids = image_ids * loaded.model.config.num_query_tokens
        rows = [image_ids + tokenizer(p).input_ids for p in prompts]
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id
        left = loaded.entry.family.decoder_only  # decoder-only models continue from the right edge
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            mask[i, span] = 1
        return ids.to(loaded.device), mask.to(loaded.device)

    def _generate_inputs(self, images: list[PreparedImage], prompts: list[str]) -> dict[str, torch.Tensor]:
        """`language_model.generate` inputs: what Blip2ForConditionalGeneration.generate builds."""
        loaded = self._require_captioner()
        model = loaded.model
        language_inputs = self._language_inputs(images, prompts)
        input_ids, attention_mask = self.encode_prompts(prompts)
        with torch.inference_mode():
            embeds = model.get_input_embeddings()(input_ids)
            image_mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(image_mask, language_inputs.to(embeds.device, embeds.dtype))
        inputs = {"inputs_embeds": embeds, "attention_mask": attention_mask}
        if loaded.entry.family.decoder_only:
            inputs["input_ids"] = input_ids
        return inputs

    def _new_tokens(self, output: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if "input_ids" in inputs:  # decoder-only: generate returns prompt + continuation
            return output[:, inputs["input_ids"].shape[1] :]
        return output[:, 1:]  # encoder-decoder: drop the decoder start token

    def generate_ids(
        self, images: Sequence[ImageInput], prompts: Sequence[str], generation: GenerationSettings
    ) -> list[list[list[int]]]:
        """New token ids per image, `generation.num_captions` sequences each (padding stripped)."""
        prepared = self.prepare(list(images))
        prompts = list(prompts)
        if len(prompts) != len(prepared):
            raise ValueError("generate_ids needs one prompt per image.")
        self._check_room(prompts, generation)
        inputs = self._generate_inputs(prepared, prompts)
        loaded = self._require_captioner()
        with torch.inference_mode():
            if generation.seed is not None:
                torch.manual_seed(generation.seed)
            output = loaded.model.language_model.generate(**inputs, **generation.generate_kwargs())
        tokenizer = loaded.processor.tokenizer
        rows = [
            trim_generated(row, tokenizer.eos_token_id, tokenizer.pad_token_id)
            for row in self._new_tokens(output, inputs).tolist()
        ]
        k = generation.num_captions
        return [rows[i * k : (i + 1) * k] for i in range(len(prepared))]

    def _check_room(self, prompts: Sequence[str], generation: GenerationSettings) -> None:
        room = self.prompt_token_budget(generation)
        tokenizer = self._require_captioner().processor.tokenizer
        for prompt in prompts:
            if len(tokenizer(prompt).input_ids) > room:
                raise InvalidRequestError(
                    f"The prompt is too long for this model: at most {room} tokens fit beside the image "
                    f"and {generation.max_new_tokens} new tokens."
                )

    def prompt_token_budget(self, generation: GenerationSettings) -> int:
        """How many prompt tokens fit in the context next to the image tokens (and the output)."""
        loaded = self._require_captioner()
        config = loaded.model.config
        context = loaded.entry.family.context_tokens
        context = min(context, getattr(config.text_config, "max_position_embeddings", None) or context)
        room = context - config.num_query_tokens
        if loaded.entry.family.decoder_only:
            room -= generation.max_new_tokens
        if room < 16:
            raise InvalidRequestError(
                f"max_new_tokens={generation.max_new_tokens} leaves no room for a prompt in this model's "
                f"{context}-token context."
            )
        return room

    def _decode(self, token_ids: list[int], prompt: str, clean: bool, notes=()) -> Generated:
        loaded = self._require_captioner()
        text = loaded.processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        text = clean_answer(text, loaded.entry.templates if clean else None)
        if not text:
            return Generated(EMPTY_TEXT_NOTICE, tuple(token_ids), prompt, empty=True, notes=tuple(notes))
        return Generated(text, tuple(token_ids), prompt, notes=tuple(notes))

    def unsupported_knobs(self) -> dict[str, str]:
        """Decoding knobs this engine cannot honour, each with the sentence shown in the UI
        (none here; see vllm_backend.VLLMEngine)."""
        return {}

    def default_generation(self) -> GenerationSettings:
        return self._require_captioner().entry.decoding

    def caption(
        self,
        images: Sequence[ImageInput] | ImageInput,
        style: str = "short",
        prompt: str | None = None,
        generation: GenerationSettings | None = None,
    ) -> list[list[Generated]]:
        """Captions for each image (a batch), `generation.num_captions` each."""
        loaded = self._require_captioner()
        generation = generation or self.default_generation()
        text = caption_prompt(loaded.entry.templates, style, prompt)
        prepared = self.prepare(images)
        ids = self.generate_ids(prepared, [text] * len(prepared), generation)
        return [[self._decode(seq, text, clean=False) for seq in per_image] for per_image in ids]

    def answer(
        self,
        image: ImageInput,
        question: str,
        generation: GenerationSettings | None = None,
        short: bool = True,
        instruction: str = "",
    ) -> Generated:
        """One VQA turn, no history: `Question: {q} Short answer:` (or the chat form if not short)."""
        loaded = self._require_captioner()
        generation = generation or loaded.entry.answer_decoding
        prompt = vqa_prompt(loaded.entry.templates, question, short=short, instruction=instruction)
        ids = self.generate_ids([image], [prompt], generation.replace(num_captions=1))
        return self._decode(ids[0][0], prompt, clean=True)

    def answer_batch(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str],
        generation: GenerationSettings | None = None,
    ) -> list[Generated]:
        """Several (image, question) pairs in one batch; prompts may differ in length."""
        loaded = self._require_captioner()
        generation = (generation or loaded.entry.answer_decoding).replace(num_captions=1)
        prompts = [vqa_prompt(loaded.entry.templates, q) for q in questions]
        ids = self.generate_ids(images, prompts, generation)
        return [self._decode(seq[0], p, clean=True) for seq, p in zip(ids, prompts, strict=True)]

    def build_chat_prompt(
        self,
        question: str,
        history: Sequence[ChatTurn] = (),
        exemplars: Sequence[ChatTurn] = (),
        instruction: str = "",
        generation: GenerationSettings | None = None,
    ) -> BuiltPrompt:
        loaded = self._require_captioner()
        generation = generation or self.default_generation()
        tokenizer = loaded.processor.tokenizer
        return chat_prompt(
            loaded.entry.templates,
            question,
            history,
            exemplars,
            instruction,
            count_tokens=lambda text: len(tokenizer(text).input_ids),
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
    ) -> Iterator[str]:
        """Yields the answer so far as tokens arrive (beam search cannot stream: one final yield)."""
        generation = (generation or self.default_generation()).replace(num_captions=1)
        if generation.decoding == "beam":
            yield self.chat(image, question, history, exemplars, instruction, generation).text
            return
        loaded = self._require_captioner()
        built = self.build_chat_prompt(question, history, exemplars, instruction, generation)
        self._check_room([built.text], generation)
        inputs = self._generate_inputs(self.prepare(image), [built.text])
        streamer = TextIteratorStreamer(
            loaded.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S
        )
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    if generation.seed is not None:
                        torch.manual_seed(generation.seed)
                    loaded.model.language_model.generate(
                        **inputs, **generation.generate_kwargs(), streamer=streamer
                    )
            except BaseException as error:  # re-raised in the caller's thread below
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=run, name="blip2-chat-stream", daemon=True)
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            shown = clean_answer(text, loaded.entry.templates)
            if shown:
                yield shown
        worker.join()
        if failure:
            raise failure[0]
        if not clean_answer(text, loaded.entry.templates):
            yield EMPTY_TEXT_NOTICE

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
        image_embeds = self._vision_embeds(loaded, prepared, progress)
        with torch.inference_mode():
            query = query_outputs(loaded.model, image_embeds)
            projections = F.normalize(
                model.vision_projection(query.to(input_dtype(model.vision_projection))), dim=-1
            )
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
        image_embeds = self._vision_embeds(loaded, prepared)
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
            captioner=self.captioner.report() if self.captioner else None,
            matcher=self.matcher.report() if self.matcher else None,
            cache=dict(vars(stats)),
        )


def input_dtype(layer: torch.nn.Module) -> torch.dtype:
    """The dtype a Linear layer expects; dynamic-int8 layers take fp32 (their .weight is a method)."""
    weight = layer.weight
    return torch.float32 if callable(weight) else weight.dtype


def trim_generated(row: list[int], eos: int | None, pad: int | None) -> list[int]:
    """A generated row up to and including its first EOS; rows that finished early in a batch are
    filled up with padding (or EOS, in beam search) to the batch's length, which is not output."""
    if eos in row:
        return row[: row.index(eos) + 1]
    end = len(row)
    while end and row[end - 1] == pad:
        end -= 1
    return row[:end]
