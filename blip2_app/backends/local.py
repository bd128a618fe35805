"""The checkpoint's language model in this process (transformers), fed the image as embeddings.

It follows transformers' Blip2ForConditionalGeneration.generate, split in two so the image half
can be cached: the vision encoder and Q-Former run once per image (the engine's `VisionCache`),
then every prompt about that image reuses their output as its image tokens.
"""

from __future__ import annotations

import queue
from collections.abc import Generator, Sequence
from threading import Event, Thread
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..cache import FeatureCache
from ..engine import PreparedImage, VisionCache, input_dtype, query_outputs
from ..errors import UserFacingError
from ..generation import GenerationSettings
from ..loading import LoadedModel
from .base import CheckpointText

if TYPE_CHECKING:
    from ..config import Settings
    from ..registry import ModelEntry
    from . import WeightLoader

STREAM_TIMEOUT_S = 300.0  # longest wait for the next token before the stream gives up
_END = object()  # the worker's last word on the token queue


class StreamStalledError(UserFacingError):
    """The language model produced no token for STREAM_TIMEOUT_S."""


def open_backend(entry: ModelEntry, settings: Settings, load_weights: WeightLoader) -> LocalBackend:
    return LocalBackend(load_weights(entry))


class LocalBackend(CheckpointText):
    name = "local"

    def __init__(self, loaded: LoadedModel, vision: VisionCache | None = None):
        self.loaded: LoadedModel = loaded
        self.entry = loaded.entry
        self.processor = loaded.processor
        self.config = loaded.model.config
        self.vision = vision or VisionCache(FeatureCache())

    @property
    def device(self) -> str:
        return str(self.loaded.device)

    def bind(self, vision: VisionCache) -> None:
        self.vision = vision

    def unsupported_knobs(self) -> dict[str, str]:
        return {}  # transformers' generate has every knob the UI offers

    def report(self) -> dict[str, Any]:
        return {"backend": self.name, **self.loaded.report()}

    # ----------------------------------------------------------------- inputs
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask exactly as the processor builds them (image tokens first),
        padded as a whole so pads never sit between the image tokens and the text (transformers#34223)."""
        tokenizer = self.tokenizer
        image_ids = tokenizer.convert_tokens_to_ids([self.processor.image_token.content])
        image_ids = image_ids * self.image_tokens
        rows = [image_ids + tokenizer(p).input_ids for p in prompts]
        width = max(map(len, rows))
        left = self.entry.family.decoder_only  # decoder-only models continue from the right edge
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            mask[i, span] = 1
        return ids.to(self.loaded.device), mask.to(self.loaded.device)

    def _language_inputs(self, images: list[PreparedImage], prompts: list[str]) -> torch.Tensor:
        """Image tokens for the language model: (n, num_query_tokens, llm_hidden)."""
        loaded, model = self.loaded, self.loaded.model

        def project(query_output: torch.Tensor) -> torch.Tensor:
            # get_image_features casts the Q-Former output to the vision dtype before projecting;
            # with per-component precision the projection's own dtype is the one that must match.
            return model.language_projection(query_output.to(input_dtype(model.language_projection)))

        if not self.entry.family.instruction_aware:
            return self.vision.cached(
                ("language_inputs", id(model)),
                images,
                lambda batch: project(query_outputs(model, self.vision.vision_embeds(loaded, batch))),
            )
        # InstructBLIP's Q-Former reads the instruction too: only the vision encoder is cached.
        image_embeds = self.vision.vision_embeds(loaded, images)
        qformer = self.processor.qformer_tokenizer(
            prompts, padding=True, truncation=True, return_tensors="pt"
        ).to(loaded.device)
        with torch.inference_mode():
            return project(query_outputs(model, image_embeds, qformer.input_ids, qformer.attention_mask))

    def generate_inputs(
        self, images: Sequence[PreparedImage], prompts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """`language_model.generate` inputs: what Blip2ForConditionalGeneration.generate builds."""
        model = self.loaded.model
        language_inputs = self._language_inputs(list(images), list(prompts))
        input_ids, attention_mask = self.encode_prompts(prompts)
        with torch.inference_mode():
            embeds = model.get_input_embeddings()(input_ids)
            image_mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(image_mask, language_inputs.to(embeds.device, embeds.dtype))
        inputs = {"inputs_embeds": embeds, "attention_mask": attention_mask}
        if self.entry.family.decoder_only:
            inputs["input_ids"] = input_ids
        return inputs

    # ----------------------------------------------------------------- generation
    def generate_ids(
        self, images: Sequence[PreparedImage], prompts: Sequence[str], generation: GenerationSettings
    ) -> list[list[list[int]]]:
        inputs = self.generate_inputs(images, prompts)
        with torch.inference_mode():
            if generation.seed is not None:
                torch.manual_seed(generation.seed)
            output = self.loaded.model.language_model.generate(**inputs, **generation.generate_kwargs())
        if "input_ids" in inputs:  # decoder-only: generate returns prompt + continuation
            new = output[:, inputs["input_ids"].shape[1] :]
        else:  # encoder-decoder: drop the decoder start token
            new = output[:, 1:]
        rows = [self.trim(row) for row in new.tolist()]
        k = generation.num_captions
        return [rows[i * k : (i + 1) * k] for i in range(len(images))]

    def scored_ids(
        self, image: PreparedImage, prompt: str, generation: GenerationSettings
    ) -> list[tuple[list[int], float]]:
        inputs = self.generate_inputs([image], [prompt])
        kwargs = generation.generate_kwargs() | {"output_scores": True, "return_dict_in_generate": True}
        with torch.inference_mode():
            output = self.loaded.model.language_model.generate(**inputs, **kwargs)
        new = (
            output.sequences[:, inputs["input_ids"].shape[1] :]
            if "input_ids" in inputs
            else output.sequences[:, 1:]
        )
        scores = output.sequences_scores.float().tolist()
        return [(self.trim(row), float(score)) for row, score in zip(new.tolist(), scores, strict=True)]

    def stream_ids(
        self, image: PreparedImage, prompt: str, generation: GenerationSettings
    ) -> Generator[list[int], None, None]:
        """`generate` runs in a worker thread and hands each new token over a queue. Whatever ends
        the iteration (the last token, `.close()`, an exception in the consumer) sets the stop
        event, which `generate` checks after every token, and joins the worker before returning."""
        inputs = self.generate_inputs([image], [prompt])
        tokens: queue.Queue[Any] = queue.Queue()
        stop = Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    if generation.seed is not None:
                        torch.manual_seed(generation.seed)
                    self.loaded.model.language_model.generate(
                        **inputs,
                        **generation.generate_kwargs(),
                        streamer=_QueueStreamer(tokens),
                        stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                    )
            except BaseException as error:  # re-raised in the consumer's thread below
                failure.append(error)
            finally:
                tokens.put(_END)

        worker = Thread(target=run, name="blip2-text-stream", daemon=True)
        worker.start()
        try:
            while (item := _next(tokens)) is not _END:
                yield item
        finally:
            stop.set()
            worker.join()
        if failure:
            raise failure[0]


def _next(tokens: queue.Queue[Any]) -> Any:
    try:
        return tokens.get(timeout=STREAM_TIMEOUT_S)
    except queue.Empty:
        raise StreamStalledError(
            f"The language model wrote nothing for {STREAM_TIMEOUT_S:g} s, so the answer was stopped. "
            "The server may be overloaded: try again in a moment."
        ) from None


class _QueueStreamer(BaseStreamer):
    """transformers' streamer interface over a queue: new token ids as plain lists. The first
    `put` is the prompt (or the decoder's start token), which is not output."""

    def __init__(self, tokens: queue.Queue[Any]):
        self.tokens = tokens
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass  # the worker signals the end itself, also when generate raises


class _StopWhenSet(StoppingCriteria):
    """Ends generation once `event` is set (checked after every new token)."""

    def __init__(self, event: Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        stop = self.event.is_set()
        # torch.BoolTensor is a legacy type the stubs keep apart from Tensor; this is a bool tensor.
        return torch.full(  # type: ignore[return-value]
            (input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device
        )
