"""The checkpoint's language model in this process (transformers), fed the image as embeddings.

It follows transformers' Blip2ForConditionalGeneration.generate, split in two so the image half
can be cached: the vision encoder and Q-Former run once per image (the engine's `VisionCache`),
then every prompt about that image reuses their output as its image tokens.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Generator, Sequence
from threading import Event, Thread
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor
from transformers.generation.streamers import BaseStreamer

from ..cache import FeatureCache
from ..chat_prefix import CachedPrefix, PrefixSlot, common_prefix_length
from ..engine import PreparedImage, VisionCache, input_dtype, qformer_chunks, query_outputs
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

            def image_tokens(batch: list[PreparedImage]) -> torch.Tensor:
                # The vision encoder takes the batch whole at a float precision (bf16 with AMX);
                # the Q-Former reads it in the slices its precision allows.
                embeds = self.vision.vision_embeds(loaded, batch)
                return torch.cat(
                    [project(query_outputs(model, chunk)) for chunk in qformer_chunks(loaded, embeds)]
                )

            return self.vision.cached(
                ("language_inputs", id(model), loaded.weights_final),
                images,
                image_tokens,
                one_at_a_time=loaded.batch_dependent("vision"),
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
            output = self.loaded.model.language_model.generate(
                **inputs, **generate_kwargs(inputs, generation)
            )
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
        kwargs = generate_kwargs(inputs, generation) | {
            "output_scores": True,
            "return_dict_in_generate": True,
        }
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
        yield from self._stream(self.generate_inputs([image], [prompt]), generation)

    def stream_chat_ids(
        self, image: PreparedImage, prompt: str, generation: GenerationSettings, prefix: PrefixSlot
    ) -> Generator[list[int], None, None]:
        """`stream_ids` that prefills only what the new prompt adds to `prefix`'s cached tokens.

        Exact by construction: the cache is cut back to the longest run of token ids the cached
        sequence and the new prompt share (an answer tokenized differently when it came back as
        history, an undone or edited turn, dropped old turns all shorten it), and it is only used
        for the same model and image, since every image token has the same id."""
        family = self.entry.family
        one_row = generation.decoding != "beam" and generation.num_captions == 1
        if not family.decoder_only or family.instruction_aware or not one_row:
            # T5 reads the prompt with a bidirectional encoder and InstructBLIP's Q-Former reads it
            # too (its image tokens change with each prompt): nothing of the last turn carries over.
            # Several beams or sequences would each grow their own row of the cache.
            prefix.clear()
            yield from self._stream(self.generate_inputs([image], [prompt]), generation)
            return
        inputs = self.generate_inputs([image], [prompt])
        ids = inputs["input_ids"][0].tolist()
        key = ("chat-prefix", id(self.loaded.model), self.loaded.weights_final, image.content_hash)
        cache = self._reusable_cache(prefix.take(), key, ids)

        def keep(output: torch.Tensor) -> None:
            # The cache now holds the prompt and all generated tokens but the last (never fed).
            length = cache.get_seq_length()
            prefix.keep(CachedPrefix(key, tuple(output[0, :length].tolist()), cache, _cache_bytes(cache)))

        yield from self._stream(inputs, generation, cache, keep)

    def _reusable_cache(self, held: CachedPrefix | None, key: Any, ids: list[int]) -> DynamicCache:
        """`held`'s cache cut back to what `ids` start with, or an empty cache."""
        if held is not None and held.key == key:
            # At least one token is left to prefill: generate needs its logits for the next token.
            keep = min(common_prefix_length(held.token_ids, ids), len(ids) - 1)
            cache = held.cache
            if keep > 0:
                if cache.get_seq_length() > keep:
                    cache.crop(keep - cache.get_seq_length())  # a negative count: tokens removed
                return cache
        return DynamicCache(config=self.loaded.model.config.text_config)

    def _stream(
        self,
        inputs: dict[str, torch.Tensor],
        generation: GenerationSettings,
        cache: DynamicCache | None = None,
        finished: Callable[[torch.Tensor], None] | None = None,
    ) -> Generator[list[int], None, None]:
        """`generate` runs in a worker thread and hands each new token over a queue. Whatever ends
        the iteration (the last token, `.close()`, an exception in the consumer) sets the stop
        event, which `generate` checks after every token, and joins the worker before returning.
        `finished` gets generate's output (prompt and new ids) in the worker, before the end."""
        tokens: queue.Queue[Any] = queue.Queue()
        stop = Event()
        failure: list[BaseException] = []
        extra: dict[str, Any] = {} if cache is None else {"past_key_values": cache}

        def run() -> None:
            try:
                with torch.inference_mode():
                    if generation.seed is not None:
                        torch.manual_seed(generation.seed)
                    output = self.loaded.model.language_model.generate(
                        **inputs,
                        **generate_kwargs(inputs, generation),
                        **extra,
                        streamer=_QueueStreamer(tokens),
                        stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                    )
                    if finished is not None:
                        finished(output)
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


def _cache_bytes(cache: DynamicCache) -> int:
    """Memory held by a cache's key and value tensors."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


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


class NewTokensNoRepeatNGram(NoRepeatNGramLogitsProcessor):
    """transformers' n-gram ban over the generated tokens only (the ids after `prompt_length`)."""

    def __init__(self, ngram_size: int, prompt_length: int):
        super().__init__(ngram_size)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return super().__call__(input_ids[:, self.prompt_length :], scores)


def generate_kwargs(inputs: dict[str, torch.Tensor], generation: GenerationSettings) -> dict[str, Any]:
    """`generation`'s keyword arguments for the language model's `generate`, with the n-gram ban
    over the new tokens only. transformers bans the n-grams of the whole sequence, which for a
    decoder-only model holds the prompt: an answer could never repeat three tokens of the question,
    of an earlier turn or of a few-shot example ("Answer: yes." in the history forbade " yes" after
    "Answer:"; the demo model's few-shot VQA lost 0.086 to it). LAVIS generates from embeddings
    alone, so its ban sees the new tokens only, as here."""
    kwargs = generation.generate_kwargs()
    size = kwargs.get("no_repeat_ngram_size", 0)
    if "input_ids" in inputs and size:
        kwargs["no_repeat_ngram_size"] = 0
        kwargs["logits_processor"] = LogitsProcessorList(
            [NewTokensNoRepeatNGram(size, inputs["input_ids"].shape[1])]
        )
    return kwargs
