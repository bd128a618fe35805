"""The Chat tab: a streamed conversation about one image, and a one-question quick answer.

Public endpoints: `/chat` (streaming; the conversation is kept per session),
`/answer (image, question, short_answer, instruction, decoding, num_beams, max_new_tokens)`,
`/answer_topk (image, question, k)`, `/chat_undo ()`, `/chat_edit` (streaming, /chat's parameters)
and `/chat_export (fmt)`. "Regenerate" is a private model event; "Edit last question" only copies
the question back into the box (no server work). The image may be drawn (tabs/drawing.py): every
button that reads it first turns a drawing on the Draw tab into the image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from ...backends import AnswerDone
from ...batching import TextBatcher
from ...chat_prefix import PrefixBudget, PrefixSlot
from ...config import Settings
from ...engine import Engine
from ...errors import InvalidRequestError
from ...generation import GenerationSettings
from ...prompts import MAX_QUESTION_CHARS, ChatTurn, clean_text, context_notes
from ..blocks import check_raw_value
from ..components import named_number
from ..decoding import DecodingInputs, decoding_choice, slider
from ..downloads import write_download
from ..engine_view import EMPTY_ANSWER, LoadedModels
from ..errors import escaped, guarded, user_error
from ..sessions import ChatSession, session_bound, turn_messages
from ..sessions import message as chat_message
from ..validation import flag, one_image, one_line, optional_text, whole_number
from ..zerogpu import gpu
from .common import UI_ONLY, TabContext
from .drawing import ImageSlot, image_slot
from .examples import examples_for

MAX_EXEMPLARS = 8
MAX_EXEMPLAR_ROWS = 64  # rows accepted from the Dataframe (empty ones are skipped)
MAX_CHAT_TURNS = 50  # default of --max-chat-turns; the prompt builder drops old ones that do not fit
MAX_TOPK = 10  # the most beams (generation.LIMITS)
EXPORT_FORMATS = ("markdown", "json")

Messages = list[dict[str, str]]


def image_name(image: Any) -> str:
    """The uploaded file's name for the export (a data URL or a PIL image has none)."""
    if isinstance(image, dict):
        image = image.get("orig_name") or image.get("path")
    if not isinstance(image, (str, Path)) or str(image).startswith("data:"):
        return ""
    return Path(str(image)).name[:200]


def decoding_record(generation: GenerationSettings) -> dict[str, Any]:
    """The decoding settings that matter for the chat's sampling, as the export lists them."""
    keys = ("decoding", "max_new_tokens", "temperature", "top_p", "repetition_penalty", "num_beams")
    return {key: getattr(generation, key) for key in keys}


def table_size_check(raw: Any) -> None:
    """The few-shot table's size, on the value as sent ({"headers", "data"} or rows)."""
    rows = raw.get("data") if isinstance(raw, dict) else raw
    if not isinstance(rows, list):
        return  # the parser below says what is wrong with it
    if len(rows) > MAX_EXEMPLAR_ROWS:
        raise user_error(f"The few-shot table has {len(rows)} rows; at most {MAX_EXEMPLAR_ROWS} are read.")
    for number, row in enumerate(rows, start=1):
        cells = row if isinstance(row, list) else [row]
        if len(cells) > 2 or any(
            isinstance(cell, str) and len(cell) > 2 * MAX_QUESTION_CHARS for cell in cells
        ):
            raise user_error(
                f"Few-shot example {number} must be a question and an answer of at most "
                f"{MAX_QUESTION_CHARS:,} characters each."
            )


def parse_exemplars(value: Any) -> list[ChatTurn]:
    """Few-shot question/answer pairs from the Dataframe (array, pandas, or the API's dict form)."""
    if value is None:
        return []
    if hasattr(value, "values") and hasattr(value, "columns"):  # pandas.DataFrame
        rows = value.values.tolist()
    elif isinstance(value, dict):
        rows = value.get("data") or []
    else:
        rows = value
    if not isinstance(rows, (list, tuple)):
        raise InvalidRequestError("Few-shot examples must be a table of question and answer pairs.")
    if len(rows) > MAX_EXEMPLAR_ROWS:
        raise InvalidRequestError(
            f"The few-shot table has {len(rows)} rows; at most {MAX_EXEMPLAR_ROWS} are read."
        )
    turns = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, (list, tuple)):
            raise InvalidRequestError(f"Few-shot example {number} must be a (question, answer) pair.")
        cells = ["" if cell is None or cell != cell else str(cell) for cell in list(row)[:2]]  # NaN -> ""
        question, answer = ([*cells, "", ""])[:2]
        question = clean_text(
            question, f"question of few-shot example {number}", MAX_QUESTION_CHARS, required=False
        )
        answer = clean_text(
            answer, f"answer of few-shot example {number}", MAX_QUESTION_CHARS, required=False
        )
        if not question and not answer:
            continue
        if not question:
            raise InvalidRequestError(f"Few-shot example {number} has an answer but no question.")
        turns.append(ChatTurn(question, answer))
    if len(turns) > MAX_EXEMPLARS:
        raise InvalidRequestError(f"Use at most {MAX_EXEMPLARS} few-shot examples; got {len(turns)}.")
    return turns


def _chat_knobs(
    decoding: str | None,
    max_new_tokens: float | None,
    temperature: float | None,
    top_p: float | None,
    repetition_penalty: float | None,
) -> DecodingInputs:
    """The chat's decoding widgets, in their order (the same five for Send and Regenerate)."""
    return DecodingInputs(
        decoding=decoding,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
    )


class ChatHandlers:
    """What the Chat tab's events call. One instance per app, shared by all sessions: it holds only
    the engine and the settings (read-only); each visitor's conversation is passed in and out."""

    def __init__(self, engine: Engine, settings: Settings, batcher: TextBatcher | None = None):
        self.engine = engine
        self.settings = settings
        self.models = LoadedModels.of(engine)
        # Every session's cached chat prefix counts against this one budget (--chat-prefix-mb).
        self.prefixes = PrefixBudget(settings.chat_prefix_mb * 2**20) if settings.chat_prefix_mb else None
        # Quick answers are batched with other visitors' captions and answers (batching.py).
        self.batcher = batcher or TextBatcher.one_at_a_time(engine)

    def chat_defaults(self) -> GenerationSettings:
        # Sampling streams token by token (beam search can only show its final answer) and makes
        # "Regenerate" give a different answer.
        return self.models.decoding.replace(decoding="nucleus")

    def answer_defaults(self) -> GenerationSettings:
        # The registry's VQA decoding (LAVIS' zero-shot VQAv2: beam search, short answers).
        return self.models.answer_decoding

    # ----------------------------------------------------------------- the work
    def ask(self, image: Any, question: Any, short: Any, instruction: Any, decoding: DecodingInputs) -> str:
        """One VQA turn with no history: `Question: {q} Short answer:` (or the chat template)."""
        prepared = one_image(self.engine, image)
        if question is not None and not isinstance(question, str):
            raise InvalidRequestError("The question must be text.")
        result = self.batcher.answer(
            prepared,
            question or "",  # None reads as empty, and is refused as such
            decoding.settings(self.answer_defaults()),
            short=flag(short, "short_answer"),
            instruction=optional_text(instruction, "instruction", MAX_QUESTION_CHARS),
        )
        return one_line(result.text)

    def converse(
        self,
        image: Any,
        message: Any,
        exemplars: Any,
        instruction: Any,
        session: ChatSession | None,
        decoding: DecodingInputs,
    ) -> Iterator[tuple[Messages, ChatSession]]:
        """Streams (chat messages, session) as the answer grows; the template is applied for the user."""
        prepared = one_image(self.engine, image)
        if not isinstance(message, str):
            raise InvalidRequestError("The question must be text.")
        question = clean_text(message, "question", MAX_QUESTION_CHARS)
        examples = parse_exemplars(exemplars)
        instruction = optional_text(instruction, "instruction", MAX_QUESTION_CHARS)
        generation = decoding.settings(self.chat_defaults())
        history = self._history(session, prepared.content_hash)
        prefix = self._prefix(session)
        for note in context_notes(
            self.engine.build_chat_prompt(question, history, examples, instruction, generation)
        ):
            gr.Warning(escaped(note))

        # A new object: the stored conversation only changes once the answer is complete.
        current = ChatSession(prepared.content_hash, history, prefix=prefix)
        shown = [*turn_messages(history), chat_message("user", question)]
        yield shown, current
        shown_answer, empty = "", True
        stream = self.engine.chat_stream(
            prepared, question, history, examples, instruction, generation, prefix=prefix
        )
        with closing(stream):  # a cancelled request closes this generator: the generation stops
            for event in stream:
                if isinstance(event, AnswerDone):
                    shown_answer, empty = event.text, event.empty
                elif event.text != shown_answer:  # whitespace-only tokens change nothing on screen
                    shown_answer = event.text
                    yield [*shown, chat_message("assistant", shown_answer)], current
        if empty:
            gr.Warning(escaped(EMPTY_ANSWER))
        turns = [*history, ChatTurn(question, "" if empty else shown_answer)]
        done = ChatSession(
            prepared.content_hash,
            turns[-self.settings.max_chat_turns :],
            image_name=image_name(image),
            decoding=decoding_record(generation),
            prefix=prefix,
        )
        yield [*shown, chat_message("assistant", shown_answer or EMPTY_ANSWER)], done

    def _prefix(self, session: ChatSession | None) -> PrefixSlot | None:
        """The session's one place for its cached prefix (a new one on its first turn). The
        backend checks the cached tokens and image against each prompt, so a changed history or
        image (undo, edit, another photo) reuses only what still matches."""
        if self.prefixes is None:
            return None
        if isinstance(session, ChatSession) and session.prefix is not None:
            return session.prefix
        return self.prefixes.slot()

    def _history(self, session: ChatSession | None, image_hash: str) -> list[ChatTurn]:
        """The turns to continue from: the session's, unless they were about another image."""
        session = session if isinstance(session, ChatSession) else ChatSession()
        if session.image_hash == image_hash:
            return list(session.turns[-self.settings.max_chat_turns :])
        if session.turns:
            gr.Info("This is a different image, so the conversation starts over.")
        return []

    # ----------------------------------------------------------------- the events
    # Their parameters are the public API's (names and order), one per widget.
    @gpu(seconds=60)
    @guarded("answering the question")
    def answer(
        self,
        image: Any,
        question: str,
        short_answer: bool = True,
        instruction: str | None = "",
        decoding: str | None = None,
        num_beams: float | None = None,
        max_new_tokens: float | None = None,
    ) -> str:
        """One VQA turn with no history: `Question: {q} Short answer:` (or the chat template)."""
        knobs = DecodingInputs(decoding=decoding, num_beams=num_beams, max_new_tokens=max_new_tokens)
        return self.ask(image, question, short_answer, instruction, knobs)

    @session_bound
    @gpu(seconds=90)
    @guarded("answering in the chat")
    def chat(
        self,
        image: Any,
        message: str,
        exemplars: Any = None,
        instruction: str | None = "",
        decoding: str | None = None,
        max_new_tokens: float | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        session: ChatSession | None = None,
    ) -> Iterator[tuple[Messages, ChatSession]]:
        """Streams (chat messages, session) as the answer grows; the template is applied for the user."""
        knobs = _chat_knobs(decoding, max_new_tokens, temperature, top_p, repetition_penalty)
        yield from self.converse(image, message, exemplars, instruction, session, knobs)

    @gpu(seconds=90)
    @guarded("regenerating the answer")
    def regenerate(
        self,
        image: Any,
        exemplars: Any = None,
        instruction: str | None = "",
        decoding: str | None = None,
        max_new_tokens: float | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        session: ChatSession | None = None,
    ) -> Iterator[tuple[Messages, ChatSession]]:
        """Asks the last question again (with sampling, a different answer)."""
        if not isinstance(session, ChatSession) or not session.turns:
            raise user_error("There is no answer to regenerate yet: ask a question first.")
        earlier = session.undone()
        knobs = _chat_knobs(decoding, max_new_tokens, temperature, top_p, repetition_penalty)
        yield from self.converse(image, session.turns[-1].question, exemplars, instruction, earlier, knobs)

    @session_bound
    @gpu(seconds=90)
    @guarded("answering the edited question")
    def edit_last(
        self,
        image: Any,
        message: str,
        exemplars: Any = None,
        instruction: str | None = "",
        decoding: str | None = None,
        max_new_tokens: float | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        session: ChatSession | None = None,
    ) -> Iterator[tuple[Messages, ChatSession]]:
        """Replaces the last question with `message` and answers it again (the old turn is gone)."""
        if not isinstance(session, ChatSession) or not session.turns:
            raise user_error("There is no question to edit yet: ask one first.")
        knobs = _chat_knobs(decoding, max_new_tokens, temperature, top_p, repetition_penalty)
        yield from self.converse(image, message, exemplars, instruction, session.undone(), knobs)

    @session_bound
    @guarded("undoing the last turn")
    def undo(self, session: ChatSession | None = None) -> tuple[Messages, ChatSession]:
        """Removes the last question and its answer: the next answer is written without them."""
        if not isinstance(session, ChatSession) or not session.turns:
            raise user_error("There is nothing to undo: the conversation is empty.")
        earlier = session.undone()
        return earlier.messages(), earlier

    @session_bound
    @guarded("exporting the chat")
    def export(self, fmt: str = "markdown", session: ChatSession | None = None) -> str:
        """The conversation as a file to download: "markdown" (.md) or "json" (.json)."""
        if fmt not in EXPORT_FORMATS:
            raise user_error(f"The export format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}.")
        if not isinstance(session, ChatSession) or not session.turns:
            raise user_error("There is nothing to export yet: ask a question first.")
        text = session.export(self.models.captioner.name if self.models.captioner else "", fmt)
        suffix = "json" if fmt == "json" else "md"
        return write_download(f"chat.{suffix}", text, self.settings.upload_ttl_minutes * 60)

    @staticmethod
    def last_question(session: ChatSession | None) -> str:
        """UI step of "Edit last question": the last question back in the message box."""
        if not isinstance(session, ChatSession) or not session.turns:
            return ""
        return session.turns[-1].question

    @gpu(seconds=60)
    @guarded("answering the question")
    def answer_topk(self, image: Any, question: str, k: float = 3) -> list[dict[str, Any]]:
        """Beam search's k best answers to one question about an image (no history), best first.

        Args:
            image: the image the question is about.
            question: the question, e.g. "what colour is the car?".
            k: how many answers to return (1-10).

        Returns:
            A list of {"answer": text, "score": number in (0, 1]}, best first; the score is the
            geometric mean of the answer's token probabilities.
        """
        prepared = one_image(self.engine, image)
        if question is not None and not isinstance(question, str):
            raise InvalidRequestError("The question must be text.")
        count = whole_number(k, "k", 1, MAX_TOPK)
        defaults = self.answer_defaults()
        generation = defaults.replace(decoding="beam", num_beams=max(defaults.num_beams, count))
        answers = self.engine.answer_topk(prepared, question or "", count, generation)
        return [answer.as_dict() for answer in answers]

    @staticmethod
    def show_question(message: Any, session: ChatSession | None) -> tuple[str, str, Messages]:
        """UI step before streaming: clear the box, pass the question on, show it at once."""
        text = message if isinstance(message, str) else ""
        history = session.messages() if isinstance(session, ChatSession) else []
        if text.strip() and len(text) <= MAX_QUESTION_CHARS * 2:  # longer: the chat event refuses it
            history = [*history, chat_message("user", text.strip())]
        return "", text, history

    @staticmethod
    def show_edit(message: Any, session: ChatSession | None) -> tuple[str, str, Messages]:
        """UI step before answering an edited question: the last turn goes, the new question shows."""
        earlier = session.undone() if isinstance(session, ChatSession) and session.turns else session
        return ChatHandlers.show_question(message, earlier)

    @staticmethod
    def new_conversation() -> tuple[Messages, ChatSession]:
        return [], ChatSession()


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class PromptWidgets:
    """The left column: the image and everything that shapes the prompt and the decoding."""

    slot: ImageSlot  # the image input (what the endpoints read) and the drawing
    instruction: gr.Textbox
    exemplars: gr.Dataframe
    knobs: list[gr.components.Component]  # decoding, max_new_tokens, temperature, top_p, repetition

    @property
    def image(self) -> gr.Image:
        return self.slot.image


def build(context: TabContext) -> None:
    """The tab's widgets and events (inside `gr.Tabs`)."""
    handlers = ChatHandlers(context.engine, context.settings, context.batcher)
    with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
        state = gr.State(None, time_to_live=context.state_ttl)
        # Created here, shown in the conversation column: examples with a question fill it too.
        # Its label is not shown here; the examples' table heads its column with it. Not "Question":
        # the Quick answer box is called that, and a page should not have two inputs of one name.
        message = gr.Textbox(
            label="Your question",
            show_label=False,
            placeholder="Ask a question about the image…",
            max_length=MAX_QUESTION_CHARS,
            scale=5,
            container=False,
            elem_id="chat-message",
            render=False,
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=300):
                prompt = _prompt_column(context, handlers.chat_defaults(), message)
            with gr.Column(scale=6, min_width=300):
                _conversation(context, handlers, prompt, message, state)
                _quick_answer(context, handlers, prompt)


def _examples(context: TabContext, image: gr.Image, message: gr.Textbox) -> None:
    """The model's own example pictures, each with its question (into the message box), or the
    photos (tabs/examples.py)."""
    examples = examples_for(context)
    if not examples.images:
        return
    with_questions = examples.has_questions
    gr.Examples(
        [
            [path, question] if with_questions else [path]
            for path, question in zip(examples.images, examples.questions, strict=True)
        ],
        inputs=[image, message] if with_questions else [image],
        label=examples.label,
        examples_per_page=8,
        api_visibility="private",
        elem_id="chat-examples",
    )


def _prompt_column(context: TabContext, defaults: GenerationSettings, message: gr.Textbox) -> PromptWidgets:
    slot = image_slot(
        context.engine,
        "chat",
        "Image to talk about",
        height=300,
        state_ttl=context.state_ttl,
        examples=lambda image: _examples(context, image, message),
    )
    captioner = context.models.captioner
    with gr.Accordion("Prompt: few-shot examples", open=False):
        instruction = gr.Textbox(
            value="",
            label="Instruction (InstructBLIP)",
            placeholder="e.g. Answer like a museum guide.",
            max_length=MAX_QUESTION_CHARS,
            visible=bool(captioner and captioner.family.instruction_aware),
        )
        exemplars = check_raw_value(
            gr.Dataframe(
                value=[["", ""], ["", ""]],
                headers=["question", "answer"],
                datatype=["str", "str"],
                type="array",
                column_count=2,
                interactive=True,
                label=f"Question / answer pairs placed before the conversation (up to {MAX_EXEMPLARS})",
                wrap=True,
            ),
            table_size_check,
        )
    unsupported = context.unsupported
    with gr.Accordion("Decoding", open=False):
        decoding = decoding_choice(
            defaults.decoding, unsupported.get("beam") or "beam search shows its answer only when done"
        )
        max_tokens = slider("max_new_tokens", defaults.max_new_tokens, "Max new tokens", 1)
        with gr.Row():
            temperature = slider("temperature", defaults.temperature, "Temperature", 0.01)
            top_p = slider("top_p", defaults.top_p, "Top-p", 0.01)
        repetition = slider("repetition_penalty", defaults.repetition_penalty, "Repetition penalty", 0.05)
    return PromptWidgets(slot, instruction, exemplars, [decoding, max_tokens, temperature, top_p, repetition])


def _conversation(
    context: TabContext, handlers: ChatHandlers, prompt: PromptWidgets, message: gr.Textbox, state: gr.State
) -> None:
    """The chatbot, its input row and buttons, and their events."""
    chatbot = gr.Chatbot(
        label="Conversation",
        height=420,
        placeholder="Add an image, then ask about it. Each question is sent as "
        "“Question: … Answer:” after the earlier turns, so the model keeps the context.",
        buttons=["copy", "copy_all"],
        render_markdown=False,  # answers are plain text: "*" or "~~" stay as typed
        elem_id="chatbot",
    )
    with gr.Row(elem_id="chat-input-row"):
        message.render()
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
    with gr.Row():
        regenerate = gr.Button("↻ Regenerate", size="sm", elem_id="chat-regenerate")
        undo = gr.Button("↶ Undo last turn", size="sm", elem_id="chat-undo")
        edit = gr.Button("✎ Edit last question", size="sm", elem_id="chat-edit")
        replace = gr.Button("Replace last question", size="sm", elem_id="chat-replace")
        clear = gr.Button("Clear chat", size="sm", elem_id="chat-clear")
    with gr.Accordion("Export the conversation", open=False):
        with gr.Row():
            export_format = gr.Radio(
                list(EXPORT_FORMATS), value="markdown", label="Format", elem_id="chat-export-format"
            )
            export = gr.Button("Export", size="sm", elem_id="chat-export")
        exported = gr.File(label="Conversation file", interactive=False, elem_id="chat-export-file")
    # Carries the question from the box (cleared at once) to the streaming event.
    pending = gr.Textbox(visible=False)

    # Each button's first step puts a drawing into the image input when the Draw tab is open
    # (tabs/drawing.py); the public events after it read the image input as always.
    first_step = prompt.slot.first_step
    gr.on([message.submit, send.click], **first_step()).success(
        handlers.show_question,
        inputs=[message, state],
        outputs=[message, pending, chatbot],
        **UI_ONLY,
    ).then(
        inputs=[prompt.image, pending, prompt.exemplars, prompt.instruction, *prompt.knobs, state],
        outputs=[chatbot, state],
        api_name="chat",
        api_description="Streams the chat (messages format) as the answer is written.",
        show_progress="minimal",
        **context.model_event(handlers.chat),
    )
    regenerate.click(**first_step()).success(
        inputs=[prompt.image, prompt.exemplars, prompt.instruction, *prompt.knobs, state],
        outputs=[chatbot, state],
        api_visibility="private",
        show_progress="minimal",
        **context.model_event(handlers.regenerate),
    )
    undo.click(
        handlers.undo,
        inputs=[state],
        outputs=[chatbot, state],
        api_name="chat_undo",
        api_description="Removes the last question and answer of this session's chat.",
        concurrency_limit=None,  # no model work
    )
    edit.click(handlers.last_question, state, message, **UI_ONLY)
    replace.click(**first_step()).success(
        handlers.show_edit, inputs=[message, state], outputs=[message, pending, chatbot], **UI_ONLY
    ).then(
        inputs=[prompt.image, pending, prompt.exemplars, prompt.instruction, *prompt.knobs, state],
        outputs=[chatbot, state],
        api_name="chat_edit",
        api_description="Replaces the last question with a new one and streams its answer.",
        show_progress="minimal",
        **context.model_event(handlers.edit_last),
    )
    export.click(
        handlers.export,
        inputs=[export_format, state],
        outputs=exported,
        api_name="chat_export",
        api_description="This session's chat as a Markdown or JSON file (image name, model, decoding).",
        concurrency_limit=None,
    )
    clear.click(handlers.new_conversation, None, [chatbot, state], **UI_ONLY)
    chatbot.clear(handlers.new_conversation, None, [chatbot, state], **UI_ONLY)  # its trash icon
    prompt.image.change(handlers.new_conversation, None, [chatbot, state], **UI_ONLY)


def _quick_answer(context: TabContext, handlers: ChatHandlers, prompt: PromptWidgets) -> None:
    """The "Quick answer" accordion (one question, no history) and its `/answer` event."""
    defaults = handlers.answer_defaults()
    with gr.Accordion("Quick answer: one question, no history", open=False):
        question = gr.Textbox(
            label="Question", placeholder="What colour is the car?", max_length=MAX_QUESTION_CHARS
        )
        with gr.Row():
            short = gr.Checkbox(
                value=True, label="Short answer", info="“Question: … Short answer:” (VQAv2 style)"
            )
            decoding = decoding_choice(defaults.decoding, context.unsupported.get("beam"))
        with gr.Row():
            beams = slider("num_beams", defaults.num_beams, "Beams", 1, unsupported=context.unsupported)
            max_tokens = slider("max_new_tokens", defaults.max_new_tokens, "Max new tokens", 1)
        button = gr.Button("Answer", variant="primary", elem_id="answer-button")
        output = gr.Textbox(label="Answer", interactive=False, elem_id="answer-output")
        with gr.Row():
            k = named_number(gr.Slider(1, MAX_TOPK, value=3, step=1, label="Answers (k)"), "k")
            topk_button = gr.Button("Top answers with scores", elem_id="answer-topk-button")
        topk_output = gr.JSON(label="Beam search's best answers, best first", elem_id="answer-topk-output")
    gr.on([button.click, question.submit], **prompt.slot.first_step()).success(
        inputs=[prompt.image, question, short, prompt.instruction, decoding, beams, max_tokens],
        outputs=output,
        api_name="answer",
        api_description="One visual question, answered without chat history.",
        **context.batched_model_event(handlers.answer),
    )
    topk_button.click(**prompt.slot.first_step()).success(
        inputs=[prompt.image, question, k],
        outputs=topk_output,
        api_name="answer_topk",
        api_description="Beam search's k best answers to one question, each with a score in (0, 1].",
        **context.model_event(handlers.answer_topk),
    )
