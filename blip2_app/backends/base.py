"""What the engine asks of a text generator (`TextBackend`), and the events a chat stream yields.

The engine builds the prompts, checks they fit and turns token ids into answers; a backend only
measures text in tokens and turns (image, prompt) pairs into new token ids, all at once
(`generate_ids`) or as they come (`stream_ids`). The local backend runs the checkpoint in this
process, the vLLM backend sends the same prompt to a server. Torch-free on purpose: `config` and
the loading page may import this package before torch is in.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..chat_prefix import PrefixSlot
    from ..engine import PreparedImage, VisionCache
    from ..generation import GenerationSettings
    from ..loading import LoadedModel
    from ..registry import ModelEntry


# --------------------------------------------------------------------------- stream events
@dataclass(frozen=True)
class AnswerSoFar:
    """The answer as far as it is written (each event holds the whole text so far)."""

    text: str


@dataclass(frozen=True)
class AnswerDone:
    """The last event of a chat stream. `empty`: the model wrote nothing readable, and `text` is
    the sentence saying so (the same one an empty `Generated` carries)."""

    text: str
    empty: bool = False


StreamEvent = AnswerSoFar | AnswerDone


# --------------------------------------------------------------------------- the protocol
@runtime_checkable
class TextBackend(Protocol):
    """One way of generating text for a captioning checkpoint. See backends/__init__.py to add one."""

    @property
    def name(self) -> str:
        """The --backend value: "local", "vllm"."""
        ...

    @property
    def entry(self) -> ModelEntry:
        """The registry entry, with the decoding defaults this backend can run."""
        ...

    @property
    def loaded(self) -> LoadedModel | None:
        """The weights when they are in this process (a retrieval model may share its vision
        encoder), None when the text is generated elsewhere."""
        ...

    @property
    def device(self) -> str:
        """Where the text is generated, for people: "cpu", "cuda:0", "vLLM server http://..."."""
        ...

    @property
    def context_tokens(self) -> int:
        """The language model's context length: image tokens, prompt and (decoder-only) output."""
        ...

    @property
    def image_tokens(self) -> int:
        """How many of those the image takes (the Q-Former's query tokens)."""
        ...

    def count_tokens(self, text: str) -> int:
        """`text`'s length in the checkpoint's tokens, as the prompt is encoded (BOS included)."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Generated ids to text, special tokens left out."""
        ...

    def bind(self, vision: VisionCache) -> None:
        """The engine's image-feature cache, for a backend that computes image tokens here."""
        ...

    def generate_ids(
        self, images: Sequence[PreparedImage], prompts: Sequence[str], generation: GenerationSettings
    ) -> list[list[list[int]]]:
        """New token ids per image, `generation.num_captions` rows each, up to the first EOS."""
        ...

    def scored_ids(
        self, image: PreparedImage, prompt: str, generation: GenerationSettings
    ) -> list[tuple[list[int], float]]:
        """Beam search's `generation.num_captions` best sequences for one image, best first, each
        with its length-normalised log-likelihood (transformers' `sequences_scores`). A backend
        that cannot score raises `InvalidRequestError` with a sentence saying so."""
        ...

    def stream_ids(
        self, image: PreparedImage, prompt: str, generation: GenerationSettings
    ) -> Generator[list[int], None, None]:
        """New token ids as they are generated (one sequence). Closing the iterator stops the
        generation before it returns: nothing keeps running for an answer nobody reads."""
        ...

    def unsupported_knobs(self) -> dict[str, str]:
        """Decoding knobs this backend cannot honour, each with the sentence the UI shows."""
        ...

    def report(self) -> dict[str, Any]:
        """What the Model tab and /healthz show; always has "backend" (the name) and "name"."""
        ...


@runtime_checkable
class ReusesChatPrefix(Protocol):
    """Optional: a backend that continues a chat from the previous turn's key/value cache.

    The engine calls `stream_chat_ids` instead of `stream_ids` when the backend has it (the local
    one); one without it (vLLM, whose server caches prefixes itself) streams as before."""

    def stream_chat_ids(
        self, image: PreparedImage, prompt: str, generation: GenerationSettings, prefix: PrefixSlot
    ) -> Generator[list[int], None, None]:
        """`stream_ids`, reusing the part of `prefix`'s cached prompt and answer that the new
        prompt starts with (token ids compared), and keeping the new state there afterwards. The
        tokens are those `stream_ids` gives."""
        ...


# --------------------------------------------------------------------------- shared by both backends
class CheckpointText:
    """What every backend reads off the checkpoint's own files (tokenizer and config), whoever
    runs the weights: token counting, decoding, context length. Subclasses set the attributes."""

    entry: ModelEntry
    processor: Any  # the checkpoint's processor (tokenizer inside)
    config: Any  # the checkpoint's Blip2Config / InstructBlipConfig

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def context_tokens(self) -> int:
        context = self.entry.family.context_tokens
        return min(context, getattr(self.config.text_config, "max_position_embeddings", None) or context)

    @property
    def image_tokens(self) -> int:
        return int(self.config.num_query_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def trim(self, row: list[int]) -> list[int]:
        return trim_generated(row, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)


def trim_generated(row: list[int], eos: int | None, pad: int | None) -> list[int]:
    """A generated row up to and including its first EOS; rows that finished early in a batch are
    filled up with padding (or EOS, in beam search) to the batch's length, which is not output."""
    if eos in row:
        return row[: row.index(eos) + 1]
    end = len(row)
    while end and row[end - 1] == pad:
        end -= 1
    return row[:end]
