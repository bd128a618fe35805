"""Event handlers: plain methods over the `Engine`, testable without a browser.

Every public method is what one Gradio event calls. They never touch the model (only the engine),
never read globals or flags (everything arrives through `StudioHandlers(engine, settings)`), and
keep per-visitor data in the session objects passed in and returned (`gr.State`).

Errors: a `UserFacingError` or `ImageDecodeError` becomes `gr.Error` with the backend's own
sentence; anything else is logged with its traceback and the visitor gets a specific but
generic sentence (no traceback, no exception text). Degraded results raise `gr.Warning`.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import queue
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import numpy as np
import torch

from ..config import Settings
from ..engine import EMPTY_TEXT_NOTICE, MAX_RETRIEVAL_TEXT_TOKENS, Engine, PreparedImage
from ..errors import InvalidRequestError, UserFacingError
from ..generation import GenerationSettings
from ..images import ImageDecodeError
from ..prompts import MAX_QUERY_CHARS, MAX_QUESTION_CHARS, ChatTurn, clean_text, context_notes
from ..retrieval import SearchHit, rerank_with_itm
from . import sessions
from .sessions import MAX_GALLERY_IMAGES, ChatSession, GalleryBudget, GallerySession, turn_messages
from .sessions import message as chat_message

log = logging.getLogger(__name__)

MAX_TOP_K = 30
MAX_EXEMPLARS = 8
MAX_EXEMPLAR_ROWS = 64  # rows accepted from the Dataframe (empty ones are skipped)
MAX_CHAT_TURNS = 50  # default of --max-chat-turns; the prompt builder drops old ones that do not fit
MAX_FILES_PER_REQUEST = MAX_GALLERY_IMAGES  # default; the limit is the gallery's size (--max-gallery-images)
CAPTION_BATCH = 4

INTERNAL_ERROR = (
    "BLIP-2 Studio hit an internal error while {what}. It has been logged for the maintainers; "
    "please try again, and report it if it keeps happening."
)
OUT_OF_MEMORY = (
    "The server ran out of memory while {what}. Try again with fewer beams, fewer captions, "
    "fewer new tokens or fewer images at once."
)
TIMED_OUT = "The model took too long while {what} and was stopped. Please try again in a moment."

F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- error mapping
def _message(text: str) -> str:
    # Gradio renders toast messages as HTML: the text may quote file names or user input.
    return html.escape(text, quote=False)


def user_error(text: str) -> gr.Error:
    """A `gr.Error` for the visitor's own mistake: shown as is, no traceback in the log."""
    return gr.Error(_message(text), print_exception=False)


def to_gradio_error(error: Exception, what: str) -> gr.Error:
    """The `gr.Error` a visitor sees for `error` (logged with its traceback unless it is theirs)."""
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, (UserFacingError, ImageDecodeError)):
        return user_error(str(error))
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        log.exception("Out of memory while %s", what)
        return gr.Error(OUT_OF_MEMORY.format(what=what), print_exception=False)
    if isinstance(error, queue.Empty):  # TextIteratorStreamer timed out waiting for a token
        log.exception("Generation timed out while %s", what)
        return gr.Error(TIMED_OUT.format(what=what), print_exception=False)
    log.exception("Unexpected error while %s", what)
    return gr.Error(INTERNAL_ERROR.format(what=what), print_exception=False)


def guarded(what: str) -> Callable[[F], F]:
    """Map exceptions to `gr.Error` (see `to_gradio_error`); works for generator handlers too.

    `functools.wraps` keeps the signature, which Gradio reads for API parameter names and for
    the `gr.Progress` default argument.
    """

    def decorate(fn: F) -> F:
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
                try:
                    yield from fn(*args, **kwargs)
                except Exception as error:  # GeneratorExit (client left) is not an Exception
                    raise to_gradio_error(error, what) from error

            return stream  # type: ignore[return-value]

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                raise to_gradio_error(error, what) from error

        return call  # type: ignore[return-value]

    return decorate


# --------------------------------------------------------------------------- input checks
def whole_number(value: Any, name: str, low: int, high: int) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or value != int(value)
    ):
        raise InvalidRequestError(f"{name} must be a whole number between {low} and {high}; got {value!r}.")
    number = int(value)
    if not low <= number <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high}; got {number}.")
    return number


def flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be true or false; got {value!r}.")
    return value


def optional_text(value: Any, name: str, max_chars: int) -> str:
    """Free text that may be empty (instruction, custom prompt): a string within the limit."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequestError(f"The {name} must be text; got {type(value).__name__}.")
    return clean_text(value, name, max_chars, required=False)


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


def display_name(path: Any) -> str:
    name = Path(str(path)).name or "image"
    return name if len(name) <= 80 else name[:77] + "..."


def hit_caption(hit: SearchHit) -> str:
    """The text under a result: rank, name, raw cosine, calibrated probability, ITM if re-ranked."""
    text = f"#{hit.rank} {hit.name} · cosine {hit.cosine:.3f} · p {hit.probability:.2f}"
    if hit.itm_probability is not None:
        text += f" · ITM {hit.itm_probability:.2f}"
    if hit.caption:
        text += f" · {hit.caption}"
    return text


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- handlers
class StudioHandlers:
    """Everything the UI and the API call. One instance per app, shared by all sessions: it holds
    only the engine and the settings (read-only); per-visitor data is passed in and out."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        matcher_size = engine.matcher.entry.image_size if engine.matcher is not None else 224
        self.thumbnail_side = max(256, int(matcher_size))
        # The one piece of state shared by sessions: which galleries hold memory (weak references).
        self.galleries = GalleryBudget(settings.max_galleries)

    @property
    def gallery_limit(self) -> int:
        """Images one gallery holds at most (--max-gallery-images, else the built-in default)."""
        return self.settings.max_gallery_images or sessions.MAX_GALLERY_IMAGES

    @property
    def evicted_message(self) -> str:
        return (
            "Your gallery was emptied to make room for other visitors' galleries (this server keeps at "
            f"most {self.settings.max_galleries} in memory). Please index your images again."
        )

    # ----------------------------------------------------------------- defaults for the widgets
    def caption_defaults(self) -> GenerationSettings:
        return self.engine.default_generation() if self.engine.captioner else GenerationSettings()

    def chat_defaults(self) -> GenerationSettings:
        # Sampling streams token by token (beam search can only show its final answer) and makes
        # "Regenerate" give a different answer.
        return self.caption_defaults().replace(decoding="nucleus")

    def answer_defaults(self) -> GenerationSettings:
        # The registry's VQA decoding (LAVIS' zero-shot VQAv2: beam search, short answers).
        return self.engine.captioner.entry.answer_decoding if self.engine.captioner else GenerationSettings()

    # ----------------------------------------------------------------- helpers
    def _prepare(self, image: Any) -> PreparedImage:
        if image is None or (isinstance(image, str) and not image.strip()):
            raise user_error("Please add an image first: upload one, paste one, or pick an example.")
        if isinstance(image, (list, tuple)):
            raise InvalidRequestError("This endpoint takes one image; use /index_gallery for several.")
        return self.engine.prepare(image)[0]

    @staticmethod
    def _generation(base: GenerationSettings, seed: Any = None, **values: Any) -> GenerationSettings:
        """`base` with the non-empty widget values; out-of-range values raise InvalidRequestError."""
        if seed is not None and seed != "":
            number = whole_number(seed, "seed", -1, 2**32 - 1)
            values["seed"] = None if number < 0 else number  # -1: a fresh random seed
        return base.replace(**values)

    # ----------------------------------------------------------------- caption
    def example_caption(self, image: Any) -> str:
        """The default caption of an example photo (what lazy example caching stores)."""
        return self.caption(image)

    @guarded("writing captions")
    def caption(
        self,
        image: Any,
        style: str = "short",
        prompt: str | None = "",
        decoding: str | None = None,
        num_beams: float | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        min_new_tokens: float | None = None,
        max_new_tokens: float | None = None,
        repetition_penalty: float | None = None,
        length_penalty: float | None = None,
        no_repeat_ngram_size: float | None = None,
        num_captions: float | None = None,
        seed: float | None = None,
    ) -> str:
        """Captions for one image, one per line (`num_captions` lines)."""
        prepared = self._prepare(image)
        prompt = optional_text(prompt, "custom prompt", MAX_QUESTION_CHARS)
        generation = self._generation(
            self.caption_defaults(),
            seed=seed,
            decoding=decoding,
            num_beams=num_beams,
            temperature=temperature,
            top_p=top_p,
            min_new_tokens=min_new_tokens,
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            num_captions=num_captions,
        )
        results = self.engine.caption(prepared, style, prompt if style == "custom" else None, generation)[0]
        return "\n".join(_one_line(g.text) for g in results)

    # ----------------------------------------------------------------- single answer
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
        prepared = self._prepare(image)
        if question is not None and not isinstance(question, str):
            raise InvalidRequestError("The question must be text.")
        generation = self._generation(
            self.answer_defaults(), decoding=decoding, num_beams=num_beams, max_new_tokens=max_new_tokens
        )
        result = self.engine.answer(
            prepared,
            question,
            generation,
            short=flag(short_answer, "short_answer"),
            instruction=optional_text(instruction, "instruction", MAX_QUESTION_CHARS),
        )
        return _one_line(result.text)

    # ----------------------------------------------------------------- chat
    def _chat_stream(
        self,
        image: Any,
        message: Any,
        exemplars: Any,
        instruction: Any,
        session: ChatSession | None,
        generation_values: dict[str, Any],
    ) -> Iterator[tuple[list[dict[str, str]], ChatSession]]:
        prepared = self._prepare(image)
        if not isinstance(message, str):
            raise InvalidRequestError("The question must be text.")
        question = clean_text(message, "question", MAX_QUESTION_CHARS)
        examples = parse_exemplars(exemplars)
        instruction = optional_text(instruction, "instruction", MAX_QUESTION_CHARS)
        generation = self._generation(self.chat_defaults(), **generation_values)

        session = session if isinstance(session, ChatSession) else ChatSession()
        keep = self.settings.max_chat_turns
        if session.image_hash == prepared.content_hash:
            history = list(session.turns[-keep:])
        else:
            if session.turns:
                gr.Info("This is a different image, so the conversation starts over.")
            history = []
        for note in context_notes(
            self.engine.build_chat_prompt(question, history, examples, instruction, generation)
        ):
            gr.Warning(_message(note))

        # A new object: the stored conversation only changes once the answer is complete.
        current = ChatSession(prepared.content_hash, history)
        shown = [*turn_messages(history), chat_message("user", question)]
        yield shown, current
        answer = ""
        for text in self.engine.chat_stream(prepared, question, history, examples, instruction, generation):
            if text != answer:  # a token that only adds whitespace changes nothing on screen
                answer = text
                yield [*shown, chat_message("assistant", answer)], current
        empty = answer in ("", EMPTY_TEXT_NOTICE)
        if empty:
            gr.Warning(_message(EMPTY_TEXT_NOTICE))
        done = ChatSession(
            prepared.content_hash, [*history, ChatTurn(question, "" if empty else answer)][-keep:]
        )
        yield [*shown, chat_message("assistant", answer or EMPTY_TEXT_NOTICE)], done

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
    ) -> Iterator[tuple[list[dict[str, str]], ChatSession]]:
        """Streams (chat messages, session) as the answer grows; the template is applied for the user."""
        values = {
            "decoding": decoding,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "repetition_penalty": repetition_penalty,
        }
        yield from self._chat_stream(image, message, exemplars, instruction, session, values)

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
    ) -> Iterator[tuple[list[dict[str, str]], ChatSession]]:
        """Asks the last question again (with sampling, a different answer)."""
        if not isinstance(session, ChatSession) or not session.turns:
            raise user_error("There is no answer to regenerate yet: ask a question first.")
        earlier = ChatSession(session.image_hash, session.turns[:-1])
        values = {
            "decoding": decoding,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "repetition_penalty": repetition_penalty,
        }
        yield from self._chat_stream(
            image, session.turns[-1].question, exemplars, instruction, earlier, values
        )

    @staticmethod
    def show_question(message: Any, session: ChatSession | None) -> tuple[str, str, list[dict[str, str]]]:
        """UI step before streaming: clear the box, pass the question on, show it at once."""
        text = message if isinstance(message, str) else ""
        history = session.messages() if isinstance(session, ChatSession) else []
        if text.strip() and len(text) <= MAX_QUESTION_CHARS * 2:  # longer: the chat event refuses it
            history = [*history, chat_message("user", text.strip())]
        return "", text, history

    @staticmethod
    def new_conversation() -> tuple[list[dict[str, str]], ChatSession]:
        return [], ChatSession()

    # ----------------------------------------------------------------- gallery
    @guarded("indexing the gallery")
    def index_gallery(
        self,
        files: Any,
        caption_images: bool = False,
        session: GallerySession | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's documented idiom)
    ) -> tuple[str, GallerySession]:
        """Adds images to this session's gallery; returns a status sentence."""
        if isinstance(session, GallerySession) and session.evicted:
            gr.Info(self.evicted_message)
            session = None
        session = session if isinstance(session, GallerySession) else GallerySession(side=self.thumbnail_side)
        describe = flag(caption_images, "caption_images")
        paths = self._file_list(files)
        with self.galleries.use(session):  # from here on, no other request can empty this gallery
            session.evicted = False  # emptied while this request waited: it starts afresh
            limit = self.gallery_limit
            room = limit - len(session)
            if room <= 0:
                raise user_error(
                    f"This gallery is full ({limit} images). Clear it before adding more images."
                )
            return self._index_into(session, paths, describe, room, limit, progress)

    def _index_into(
        self,
        session: GallerySession,
        paths: list[Any],
        describe: bool,
        room: int,
        limit: int,
        progress: gr.Progress,
    ) -> tuple[str, GallerySession]:
        """Decode, de-duplicate, embed and add up to `room` of `paths` to `session`."""
        new: list[PreparedImage] = []
        names: list[str] = []
        failed: list[tuple[str, str]] = []
        duplicates: list[str] = []
        seen: set[str] = set()
        for number, path in enumerate(paths, start=1):
            progress((number - 1, len(paths)), desc="Reading images")
            name = display_name(path)
            try:
                prepared = self.engine.prepare(path)[0]
            except ImageDecodeError as error:
                failed.append((name, str(error)))
                continue
            if prepared.content_hash in seen or (
                session.index is not None and session.index.contains(prepared.content_hash)
            ):
                duplicates.append(name)
                continue
            seen.add(prepared.content_hash)
            new.append(prepared)
            names.append(name)
        if not new and failed and not duplicates:
            first_name, first_reason = failed[0]
            what = "The file could not" if len(paths) == 1 else f"None of the {len(paths)} files could"
            raise user_error(f"{what} be read as an image. {first_name}: {first_reason}")
        over = len(new) - room
        if over > 0:
            new, names = new[:room], names[:room]

        added = 0
        if new:
            features = self.engine.image_features(
                new, progress=lambda done, total: progress((done, total), desc="Computing image features")
            )
            captions = self._describe(new, progress) if describe else None
            projections = features.projections.numpy()
            index = session.ensure_index(projections)
            report = index.add(projections, features.content_hashes, names, captions)
            added = len(report.added)
            for prepared in new:
                session.keep_image(prepared)

        for name, reason in failed[:5]:
            gr.Warning(_message(f"Skipped {name}: {reason}"))
        if len(failed) > 5:
            gr.Warning(f"{len(failed) - 5} more file(s) could not be read either.")
        if over > 0:
            gr.Warning(f"The gallery holds at most {limit} images: {over} image(s) were not added.")

        status = (
            f"Indexed {added} new image{'s' if added != 1 else ''}; the gallery now holds {len(session)}."
        )
        if duplicates:
            status += f" Skipped {len(duplicates)} already in the gallery."
        if failed:
            status += f" Could not read {len(failed)} file{'s' if len(failed) != 1 else ''}."
        if over > 0:
            status += f" {over} not added: the gallery is full."
        return status, session

    def _file_list(self, files: Any) -> list[Any]:
        if files is None or files == []:
            raise user_error("Please choose one or more images to index first.")
        paths = [files] if isinstance(files, (str, dict)) else files
        if not isinstance(paths, (list, tuple)):
            raise InvalidRequestError("Send the images to index as a list of files.")
        most = self.settings.max_gallery_images or MAX_FILES_PER_REQUEST
        if len(paths) > most:
            raise InvalidRequestError(f"{len(paths)} files were sent; index at most {most} images at a time.")
        return [p["path"] if isinstance(p, dict) and "path" in p else p for p in paths]

    def _describe(self, images: list[PreparedImage], progress: gr.Progress) -> list[str | None]:
        captions: list[str | None] = []
        for start in range(0, len(images), CAPTION_BATCH):
            progress((start, len(images)), desc="Captioning images")
            chunk = images[start : start + CAPTION_BATCH]
            results = self.engine.caption(chunk, "short")
            captions.extend(None if r[0].empty else _one_line(r[0].text) for r in results)
        return captions

    def _require_gallery(self, session: Any) -> GallerySession:
        if isinstance(session, GallerySession) and session.evicted:
            raise user_error(self.evicted_message)
        if not isinstance(session, GallerySession) or len(session) == 0:
            raise user_error("The gallery is empty: upload some images and press “Index images” first.")
        return session

    @staticmethod
    def _results(hits: Sequence[SearchHit], session: GallerySession) -> list[tuple[Any, str]]:
        return [(session.image(hit.content_hash), hit_caption(hit)) for hit in hits]

    @guarded("searching the gallery")
    def search_text(
        self,
        query: str,
        top_k: float = 5,
        rerank: bool = False,
        rerank_k: float = 10,
        session: GallerySession | None = None,
    ) -> list[tuple[Any, str]]:
        """Best matches for a text, as (image, "#rank name · cosine · p · ITM") pairs."""
        gallery = self._require_gallery(session)
        if not isinstance(query, str):
            raise InvalidRequestError("The search text must be text.")
        text = clean_text(query, "search text", MAX_QUERY_CHARS)
        top_k = whole_number(top_k, "top_k", 1, MAX_TOP_K)
        use_itm = flag(rerank, "rerank")
        k = whole_number(rerank_k, "rerank_k", 1, MAX_TOP_K) if use_itm else 0
        overflow = self.engine.retrieval_text_overflow(text)
        if overflow:
            gr.Warning(
                f"Only the first {MAX_RETRIEVAL_TEXT_TOKENS} tokens of the search text are read (BLIP-2's "
                f"text length); the last {overflow} were left out."
            )
        with self.galleries.use(gallery):
            self._require_gallery(gallery)  # evicted while this request waited?
            embedding = self.engine.text_features([text])[0].numpy()
            assert gallery.index is not None
            hits = gallery.index.search_text(embedding, max(top_k, k))
            if use_itm:

                def itm_scores(hashes: list[str]) -> list[float]:
                    images = [gallery.prepared(h) for h in hashes]
                    return self.engine.itm(images, [text] * len(images)).tolist()

                hits = rerank_with_itm(hits, itm_scores, k)
            return self._results(hits[:top_k], gallery)

    @guarded("searching the gallery")
    def search_image(
        self, image: Any, top_k: float = 5, session: GallerySession | None = None
    ) -> list[tuple[Any, str]]:
        """Gallery images most like the given one (the query image itself is left out)."""
        gallery = self._require_gallery(session)
        top_k = whole_number(top_k, "top_k", 1, MAX_TOP_K)
        prepared = self._prepare(image)
        with self.galleries.use(gallery):
            self._require_gallery(gallery)
            features = self.engine.image_features([prepared])
            assert gallery.index is not None
            hits = gallery.index.search_image(
                features.projections[0].numpy(), top_k, exclude_hash=prepared.content_hash
            )
            if not hits:
                gr.Warning("The gallery holds only this image: add other images to compare it with.")
            return self._results(hits, gallery)

    @guarded("clearing the gallery")
    def clear_gallery(self, session: GallerySession | None = None) -> tuple[str, GallerySession]:
        count = len(session) if isinstance(session, GallerySession) else 0
        if isinstance(session, GallerySession):
            self.galleries.forget(session)
        fresh = GallerySession(side=self.thumbnail_side)
        if not count:
            return "The gallery is already empty.", fresh
        return f"Cleared the gallery ({count} image{'s' if count != 1 else ''}).", fresh

    @staticmethod
    def gallery_preview(session: GallerySession | None) -> list[tuple[Any, str]]:
        """Thumbnails of everything indexed in this session, in insertion order."""
        if not isinstance(session, GallerySession) or session.index is None:
            return []
        return [(session.image(item.content_hash), item.name) for item in session.index.items()]

    # ----------------------------------------------------------------- model
    @guarded("reading the model status")
    def model_report(self) -> str:
        from .report import model_report_markdown

        return model_report_markdown(self.engine.info(), self.engine, self.settings)
