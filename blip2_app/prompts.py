"""Where every prompt is built: caption presets, VQA, multi-turn chat, few-shot, instructions.

Users never type templates: a missing `Question: ... Answer:` template gives empty or echoed
answers (transformers#30383, LAVIS#806), so the registry's templates are applied here.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import InvalidRequestError
from .registry import PromptTemplates

CaptionStyle = Literal["short", "detailed", "custom"]
CAPTION_STYLES: tuple[str, ...] = ("short", "detailed", "custom")
MAX_QUESTION_CHARS = 2000
MAX_QUERY_CHARS = 500  # retrieval text; the Q-Former reads at most 35 tokens of it anyway
MAX_INSTRUCTION_CHARS = 2000

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class ChatTurn:
    question: str
    answer: str


@dataclass(frozen=True)
class BuiltPrompt:
    """The text sent to the language model (the Q-Former sees the same text for InstructBLIP)."""

    text: str
    dropped_turns: int = 0
    dropped_exemplars: int = 0
    truncated: bool = False


def clean_text(text: str | None, what: str, max_chars: int, required: bool = True) -> str:
    """Normalise user text: no control characters, single spaces, a documented length limit."""
    text = text or ""
    if _SURROGATE.search(text):  # JSON can carry them; no tokenizer (or UTF-8) takes them
        raise InvalidRequestError(
            f"The {what} contains a character that is not valid Unicode (a lone surrogate); please retype it."
        )
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip()
    if required and not text:
        raise InvalidRequestError(f"The {what} is empty: please type some text.")
    if len(text) > max_chars:
        raise InvalidRequestError(
            f"The {what} is {len(text):,} characters long; the limit is {max_chars:,} characters."
        )
    return text


def caption_prompt(templates: PromptTemplates, style: str, custom_prompt: str | None = None) -> str:
    """Prompt for a caption. The custom style passes the user's text as is: the caption continues it."""
    if style == "short":
        return templates.caption_short
    if style == "detailed":
        return templates.caption_detailed
    if style == "custom":
        return clean_text(custom_prompt, "custom prompt", MAX_QUESTION_CHARS)
    raise InvalidRequestError(f"Caption style must be one of {', '.join(CAPTION_STYLES)}; got {style!r}.")


def vqa_prompt(templates: PromptTemplates, question: str, short: bool = True, instruction: str = "") -> str:
    """A single VQA turn: `Question: {q} Short answer:` (LAVIS zero-shot VQAv2) or the chat form."""
    question = clean_text(question, "question", MAX_QUESTION_CHARS)
    template = templates.vqa_short if short else templates.chat_query
    return _with_instruction(templates, template.format(question=question), instruction)


def _with_instruction(templates: PromptTemplates, prompt: str, instruction: str) -> str:
    instruction = clean_text(instruction, "instruction", MAX_INSTRUCTION_CHARS, required=False)
    if not instruction:
        return prompt
    return templates.instruction.format(instruction=instruction, prompt=prompt)


def chat_prompt(
    templates: PromptTemplates,
    question: str,
    history: Sequence[ChatTurn] = (),
    exemplars: Sequence[ChatTurn] = (),
    instruction: str = "",
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
) -> BuiltPrompt:
    """Few-shot exemplars, then earlier turns, then the question, in the model card's format.

    When `max_tokens` is given the result fits it: the oldest chat turns go first, then the
    oldest exemplars, then the instruction, and only then the start of the question. The image
    tokens are not part of this text, so they are never dropped.
    """
    question = clean_text(question, "question", MAX_QUESTION_CHARS)
    # Turns without a question (blank rows of the few-shot table, say) are skipped, not refused.
    history = [t for t in map(_clean_turn, history) if t.question]
    exemplars = [t for t in map(_clean_turn, exemplars) if t.question]
    dropped_turns = dropped_exemplars = 0
    truncated = False

    def render() -> str:
        turns = [
            templates.chat_turn.format(question=t.question, answer=t.answer) for t in (*exemplars, *history)
        ]
        body = templates.turn_separator.join([*turns, templates.chat_query.format(question=question)])
        return _with_instruction(templates, body, instruction)

    text = render()
    if count_tokens is None or max_tokens is None:
        return BuiltPrompt(text)
    while count_tokens(text) > max_tokens:
        if history:
            history.pop(0)
            dropped_turns += 1
        elif exemplars:
            exemplars.pop(0)
            dropped_exemplars += 1
        elif instruction:
            instruction = ""
        elif len(question) > 1:
            # Keep the end of the question, where the actual ask usually is.
            question = question[len(question) - max(1, len(question) * 3 // 4) :]
            truncated = True
        else:
            raise InvalidRequestError("This model's context is too small for the prompt template itself.")
        text = render()
    return BuiltPrompt(text, dropped_turns, dropped_exemplars, truncated)


def context_notes(built: BuiltPrompt) -> list[str]:
    """What the prompt builder had to leave out to fit the context, in sentences for the user."""
    notes = []
    if built.dropped_turns:
        notes.append(
            f"The {built.dropped_turns} oldest chat turn(s) no longer fit the model's context and were left "
            "out of this answer. Clear the chat to start afresh."
        )
    if built.dropped_exemplars:
        notes.append(
            f"{built.dropped_exemplars} few-shot example(s) did not fit the context and were left out."
        )
    if built.truncated:
        notes.append("The question was too long for the model's context; only its end was used.")
    return notes


def _clean_turn(turn: ChatTurn) -> ChatTurn:
    return ChatTurn(
        clean_text(turn.question, "question", MAX_QUESTION_CHARS, required=False),
        clean_text(turn.answer, "answer", MAX_QUESTION_CHARS, required=False),
    )


def clean_answer(text: str, templates: PromptTemplates | None) -> str:
    """Model output -> the answer alone: trimmed, and cut where the model starts a next turn."""
    text = text.strip()
    if templates is not None:
        # "Question: {question} Answer:" -> "Question:"; the model may continue the dialogue.
        next_turn = templates.chat_query.split("{question}")[0].strip()
        if next_turn and next_turn in text:
            text = text.split(next_turn)[0].strip()
    return text
