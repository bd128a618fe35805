"""An ASGI middleware that reads `/gradio_api/upload` as it streams past, before Gradio keeps it.

Gradio 6.31's upload route has three gaps (threat model, findings 1 and 3):
- a form field without a filename is kept in memory whole (no `max_file_size` applies to it);
- one request may carry 1,000 files, each up to `max_file_size`, so a few requests fill the disk;
- a request cut off midway leaves its partial `tmp*` files in the upload folder, never deleted.

The guard parses the multipart body alongside Gradio (python-multipart, which Gradio itself
uses) and stops the request at the first part that breaks a limit: a field that is not a file
(Gradio's own upload form sends only files), more files than a gallery holds, more bytes than
`max_request_bytes`, or more upload bytes from one client than its share per window. It then
answers 413 with a sentence, whatever Gradio made of the cut-off stream.

Partial files: a completed upload is renamed into `<upload folder>/<sha>/<name>`, so a `tmp*`
file left at the top of the folder belongs to a request still running or to one that died. When
no upload is in flight any more, the guard deletes such orphans.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from .guard import ASGIApp, Message, Receive, Scope, Send, client_address, header, reply

log = logging.getLogger(__name__)

UPLOAD_PATH_SUFFIX = "/gradio_api/upload"
FILES_FIELD = "files"  # the only form field Gradio's upload route reads
MAX_HEADER_BYTES = 8 * 1024


def gradio_upload_folder() -> Path:
    """Where Gradio streams uploads (gradio.utils.get_upload_folder, without importing Gradio)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


class UploadRefused(Exception):
    """A limit was broken; the message is the sentence the client gets (HTTP 413 or 400)."""

    def __init__(self, message: str, status: int = 413) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int
    max_files: int
    max_request_bytes: int
    # Upload bytes one client (IP address) may send per window; the disk holds uploads for
    # --upload-ttl-minutes, so this is what one address can occupy at most.
    client_bytes_per_window: int
    window_s: float = 3600.0

    def __post_init__(self) -> None:
        if min(self.max_file_bytes, self.max_files, self.max_request_bytes, self.client_bytes_per_window) < 1:
            raise ValueError("upload limits must be positive")


@dataclass
class ClientLedger:
    """Upload bytes per client address over a sliding window (bounded: the oldest clients go)."""

    window_s: float
    max_clients: int = 10_000
    sent: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    def used(self, client: str) -> int:
        entries = self.sent.get(client)
        if not entries:
            return 0
        horizon = self.clock() - self.window_s
        while entries and entries[0][0] < horizon:
            entries.popleft()
        return sum(size for _, size in entries)

    def add(self, client: str, size: int) -> None:
        if client not in self.sent and len(self.sent) >= self.max_clients:
            self.sent.pop(next(iter(self.sent)))
        self.sent.setdefault(client, deque()).append((self.clock(), size))


class _PartChecker:
    """Feeds the body to a multipart parser and raises UploadRefused at the first broken limit."""

    def __init__(self, boundary: bytes, limits: UploadLimits, budget: int) -> None:
        self.limits = limits
        self.budget = budget  # bytes this client may still send
        self.total = 0
        self.files = 0
        self.part_bytes = 0
        self.is_file = False
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.header_bytes = 0
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
            },
        )

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.total > self.budget:
            raise UploadRefused(
                "You have uploaded more than this server accepts from one visitor for now "
                f"({self.limits.client_bytes_per_window // 2**20} MB an hour); please try again later."
            )
        if self.total > self.limits.max_request_bytes:
            raise UploadRefused(
                f"This upload is larger than the server accepts in one request "
                f"({self.limits.max_request_bytes // 2**20} MB): send fewer files at a time."
            )
        try:
            self.parser.write(chunk)
        except UploadRefused:
            raise
        except Exception as error:  # python-multipart's own parse errors: a malformed body
            raise UploadRefused(f"This upload is not a well-formed multipart form ({error}).", 400) from error

    def _part_begin(self) -> None:
        self.part_bytes = 0
        self.is_file = False
        self.disposition = b""
        self.header_bytes = 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.header_name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.header_value += data[start:end]

    def _count_header(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > MAX_HEADER_BYTES:
            raise UploadRefused("A part of this upload has headers larger than 8 KB.", 400)

    def _header_end(self) -> None:
        if self.header_name.strip().lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = self.header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if options.get(b"filename", b"x") == b"":
            raise UploadRefused("Each uploaded file needs a file name.", 400)
        if options.get(b"name") != FILES_FIELD.encode() or b"filename" not in options:
            raise UploadRefused(
                "Uploads take files only, in the form field 'files' (as gradio_client and the page send them).",
                400,
            )
        self.is_file = True
        self.files += 1
        if self.files > self.limits.max_files:
            raise UploadRefused(
                f"This upload has more than {self.limits.max_files} files, the most one request may carry."
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self.part_bytes += end - start
        if self.part_bytes > self.limits.max_file_bytes:
            raise UploadRefused(
                f"A file in this upload is larger than the limit of {self.limits.max_file_bytes // 2**20} MB."
            )


class UploadGuard:
    """`Middleware(UploadGuard, limits=..., folder=...)`; other routes pass through untouched."""

    def __init__(self, app: ASGIApp, limits: UploadLimits, folder: Path | None = None) -> None:
        self.app = app
        self.limits = limits
        self.folder = folder or gradio_upload_folder()
        self.ledger = ClientLedger(limits.window_s)
        self.in_flight = 0
        self.orphans_possible = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", "")).rstrip("/")
        if scope["type"] != "http" or scope.get("method") != "POST" or not path.endswith(UPLOAD_PATH_SUFFIX):
            await self.app(scope, receive, send)
            return
        client = client_address(scope)
        _, options = parse_options_header(header(scope, b"content-type"))
        boundary = options.get(b"boundary")
        if not boundary:
            await reply(send, 400, "Uploads must be multipart/form-data with a boundary.")
            return
        budget = self.limits.client_bytes_per_window - self.ledger.used(client)
        checker = _PartChecker(boundary, self.limits, budget)
        self.in_flight += 1
        try:
            await self._forward(scope, receive, send, checker)
        finally:
            self.in_flight -= 1
            self.ledger.add(client, checker.total)
            if self.in_flight == 0 and self.orphans_possible:
                self.orphans_possible = False
                remove_orphans(self.folder)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, checker: _PartChecker) -> None:
        refused: list[UploadRefused] = []
        started: list[int] = []

        async def checked_receive() -> Message:
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                try:
                    checker.feed(message.get("body", b""))
                except UploadRefused as error:
                    refused.append(error)
                    return {"type": "http.disconnect"}
            elif message["type"] == "http.disconnect":
                self.orphans_possible = True
            return message

        async def watched_send(message: Message) -> None:
            if refused:
                return  # Gradio's answer to the cut-off stream is replaced by ours below
            if message["type"] == "http.response.start":
                started.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, checked_receive, watched_send)
        except Exception:
            if not refused:
                self.orphans_possible = True
                raise
        if refused and not started:
            self.orphans_possible = True
            log.info("Upload refused from %s: %s", client_address(scope), refused[0])
            await reply(send, refused[0].status, str(refused[0]))
        elif refused or (started and started[0] != 200):
            self.orphans_possible = True


def remove_orphans(folder: Path) -> int:
    """Delete the `tmp*` files at the top of the upload folder (none is in flight); returns how many."""
    removed = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if entry.name.startswith("tmp") and entry.is_file() and not entry.is_symlink():
            try:
                entry.unlink()
                removed += 1
            except OSError as error:
                log.warning("Could not delete the partial upload %s: %s", entry, error)
    if removed:
        log.info("Deleted %d partial upload file(s) left by interrupted requests.", removed)
    return removed
