"""Per-session state of the UI: one chat and one gallery per visitor, nothing shared.

These objects live in `gr.State` (server side, one value per browser tab or gradio_client
session, evicted by Gradio) and are plain Python, so the handlers can be tested without Gradio.
Nothing here is module-level: a mutable default shared by every visitor is the bug this avoids.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from PIL import Image

from ..chat_prefix import PrefixSlot
from ..engine import PreparedImage
from ..errors import InvalidRequestError
from ..prompts import ChatTurn
from ..retrieval import GalleryIndex

# A session's gallery keeps a JPEG copy per image (for the result thumbnails and for ITM
# re-ranking) plus 32 x 256 float32 projections: about 60 KB per image at the default size.
MAX_GALLERY_IMAGES = 200
THUMBNAIL_QUALITY = 90
PLACEHOLDER_GREY = (128, 128, 128)


F = TypeVar("F", bound=Callable[..., Any])

# Gradio's MCP server (--mcp) lists an endpoint as a tool unless its function carries another
# `_mcp_type` (gradio/mcp.py, list_tools). It calls every tool with the State's default value,
# never a kept one: a chat or a gallery cannot live across tool calls, so such endpoints are not
# offered to agents (docs/deploy.md, "MCP"). Agents search images with /search_images instead,
# which takes the images with the query and keeps nothing (ui/tabs/search_images.py).
NOT_AN_MCP_TOOL = "session"


def session_bound(fn: F) -> F:
    """Marks an event handler whose meaning needs the session's state: not an MCP tool."""
    fn._mcp_type = NOT_AN_MCP_TOOL  # type: ignore[attr-defined]  # read by gradio/mcp.py
    return fn


def takes_a_file_list(fn: F) -> F:
    """Marks an event handler whose input is a list of files: not an MCP tool either.

    Gradio 6.31's MCP server cannot pass one (docs/deploy.md, "MCP"), so such a tool would be
    listed and fail on every call; agents caption one image at a time with `caption`."""
    fn._mcp_type = "file-list"  # type: ignore[attr-defined]  # read by gradio/mcp.py
    return fn


@dataclass
class ChatSession:
    """The conversation about one image: earlier turns are sent back to the model as context."""

    image_hash: str | None = None
    turns: list[ChatTurn] = field(default_factory=list)
    image_name: str = ""  # the file name the image was uploaded as (for the export)
    decoding: dict[str, Any] = field(default_factory=dict)  # the last answer's decoding settings
    # The language model's keys and values of the last turn, for the next one (chat_prefix.py);
    # shared by the session's successive objects, dropped with the session. None: no reuse.
    prefix: PrefixSlot | None = field(default=None, repr=False, compare=False)

    def undone(self) -> ChatSession:
        """The conversation without its last turn (a new object: the state changes only on success)."""
        return replace(self, turns=self.turns[:-1])

    def export(self, model: str, fmt: str) -> str:
        """The conversation as Markdown or JSON text: image name, model, decoding settings, turns."""
        record = {
            "format": "blip2-studio.chat",
            "version": 1,
            "model": model,
            "image": {"name": self.image_name, "sha256": self.image_hash},
            "decoding": self.decoding,
            "turns": [{"question": turn.question, "answer": turn.answer} for turn in self.turns],
        }
        if fmt == "json":
            return json.dumps(record, ensure_ascii=False, indent=2)
        settings = ", ".join(f"{key} {value}" for key, value in self.decoding.items()) or "defaults"
        lines = [
            "# Chat about an image",
            "",
            f"- Image: {self.image_name or '(unnamed)'} (sha256 {self.image_hash})",
            f"- Model: {model}",
            f"- Decoding: {settings}",
            "",
        ]
        for number, turn in enumerate(self.turns, start=1):
            lines += [
                f"**Q{number}:** {turn.question}",
                "",
                f"**A{number}:** {turn.answer or '(no answer)'}",
                "",
            ]
        return "\n".join(lines)

    def messages(self) -> list[dict[str, str]]:
        """The Chatbot's value (messages format) for the finished turns."""
        return turn_messages(self.turns)


_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def shown(text: str) -> str:
    """Chat text as the Chatbot should show it: literally. The Chatbot renders (sanitised) HTML even
    without Markdown, so a tag-like "<s>" in a question or an answer would vanish or strike text through."""
    return _TAG_START.sub("&lt;", text)


def message(role: str, text: str) -> dict[str, str]:
    return {"role": role, "content": shown(text)}


def turn_messages(turns: Iterable[ChatTurn]) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    for turn in turns:
        messages.append(message("user", turn.question))
        messages.append(message("assistant", turn.answer or "(no answer)"))
    return messages


@dataclass
class GallerySession:
    """A visitor's searchable gallery: the index plus one small JPEG per indexed image."""

    index: GalleryIndex | None = None
    images: dict[str, bytes] = field(default_factory=dict)  # content hash -> JPEG bytes
    side: int = 256  # long side of the stored copies (at least the retrieval model's input size)
    evicted: bool = False  # emptied by GalleryBudget to make room for another session's gallery
    owner: str = ""  # the client address that indexed it (GalleryBudget's per-client share)

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else 0

    @property
    def room(self) -> int:
        return MAX_GALLERY_IMAGES - len(self)

    def keep_image(self, prepared: PreparedImage) -> None:
        """Store a downscaled copy: shown in results and fed to ITM when the feature cache missed it."""
        if prepared.content_hash in self.images:
            return
        copy = prepared.image.copy()
        copy.thumbnail((self.side, self.side), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        copy.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
        self.images[prepared.content_hash] = buffer.getvalue()

    def image(self, content_hash: str) -> Image.Image:
        """The stored copy; a grey square for an image loaded without one (a zipped CLI index)."""
        if content_hash not in self.images:
            return Image.new("RGB", (64, 64), PLACEHOLDER_GREY)
        with Image.open(io.BytesIO(self.images[content_hash])) as stored:
            return stored.convert("RGB")

    def prepared(self, content_hash: str) -> PreparedImage:
        """The stored copy under its original content hash, so cached features are reused."""
        if content_hash not in self.images:
            raise InvalidRequestError(
                "Some images of this gallery were loaded without their pictures (an index made by the "
                "command line), so they cannot be re-ranked: search without ITM re-ranking."
            )
        return PreparedImage(self.image(content_hash), content_hash)

    def adopt(self, index: GalleryIndex, images: dict[str, Image.Image]) -> None:
        """Take a loaded gallery (gallery.read_archive) in place of this one."""
        self.clear()
        self.index = index
        for content_hash, image in images.items():
            self.keep_image(PreparedImage(image, content_hash))

    def forget(self, content_hash: str) -> None:
        if self.index is not None:
            self.index.remove(content_hash)
        self.images.pop(content_hash, None)

    def clear(self) -> None:
        self.index = None
        self.images.clear()

    def evict(self) -> None:
        self.clear()
        self.evicted = True


class GalleryBudget:
    """At most `limit` galleries hold images at once, over all sessions of one app.

    Galleries live in `gr.State`, one per session, and Gradio keeps up to `state_session_capacity`
    sessions for hours; without this bound, memory would grow with the number of visitors. When a
    gallery needs room, the least recently used gallery that no request is using is emptied
    (`evict()`; its owner is told to index again). The budget holds weak references only, so a
    session Gradio drops frees its gallery as before. Thread-safe: requests run in worker threads.
    """

    def __init__(self, limit: int, per_owner: int | None = None):
        if limit < 1 or (per_owner is not None and per_owner < 1):
            raise ValueError(f"GalleryBudget limits must be at least 1; got {limit}, {per_owner}.")
        self.limit = limit
        # One client's share: past it, that client's own least recently used gallery goes first,
        # so 33 one-image galleries from one address cannot empty everyone else's (finding 5).
        self.per_owner = per_owner
        self._lock = threading.Lock()
        self._order: OrderedDict[int, weakref.ref[GallerySession]] = OrderedDict()  # oldest first
        self._busy: Counter[int] = Counter()
        self.evictions = 0

    def _prune(self) -> None:
        for key in [key for key, ref in self._order.items() if ref() is None]:
            del self._order[key]

    def __len__(self) -> int:
        with self._lock:
            self._prune()
            return len(self._order)

    @contextlib.contextmanager
    def use(self, session: GallerySession) -> Iterator[None]:
        """Mark `session` as used now (most recent) and not evictable until the block ends."""
        key = id(session)
        with self._lock:
            self._busy[key] += 1
            self._touch(session)
        try:
            yield
        finally:
            with self._lock:
                self._busy[key] -= 1
                if self._busy[key] <= 0:
                    del self._busy[key]
                if len(session) == 0:  # nothing held: it does not count against the budget
                    self._order.pop(key, None)
                else:
                    self._touch(session)
                    self._evict_over_limit(keep=key)

    def forget(self, session: GallerySession) -> None:
        with self._lock:
            ref = self._order.get(id(session))
            if ref is not None and ref() is session:
                del self._order[id(session)]

    def _touch(self, session: GallerySession) -> None:
        key = id(session)
        ref = self._order.get(key)
        if ref is None or ref() is not session:  # new, or an id reused after garbage collection
            self._order[key] = weakref.ref(session)
        self._order.move_to_end(key)

    def _evict_over_limit(self, keep: int) -> None:
        self._prune()
        kept = self._order[keep]() if keep in self._order else None
        if kept is not None and kept.owner and self.per_owner is not None:
            while self._evict_one(keep, owner=kept.owner):
                pass
        while len(self._order) > self.limit and self._evict_one(keep):
            pass

    def _evict_one(self, keep: int, owner: str | None = None) -> bool:
        """Empty the least recently used gallery that no request is using (of `owner`, if given,
        and only while that owner holds more than its share); False when there is none."""
        candidates = [
            key
            for key, ref in self._order.items()
            if key != keep and not self._busy.get(key) and (owner is None or _owner(ref) == owner)
        ]
        if owner is not None:
            held = sum(1 for ref in self._order.values() if _owner(ref) == owner)
            if self.per_owner is None or held <= self.per_owner:
                return False
        if not candidates:  # the others are in use right now: try again next time
            return False
        victim = self._order.pop(candidates[0])()
        if victim is not None:
            victim.evict()
            self.evictions += 1
        return True


def _owner(ref: weakref.ref[GallerySession]) -> str | None:
    session = ref()
    return session.owner if session is not None else None
