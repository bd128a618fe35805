"""The request guards in front of Gradio (threat model, findings 1, 3, 4 and 6).

Upload cases go through `UploadGuard` to Gradio's own upload parser (gradio.route_utils.upload_fn)
and check the answer, what could be held and the files left on disk; body cases drive
`RequestGuard` with clients that send slowly or stop sending.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from gradio.route_utils import MultiPartException, upload_fn

from blip2_app.ui.guard import RequestGuard
from blip2_app.ui.upload_guard import ClientLedger, UploadGuard, UploadLimits, remove_orphans

MB = 2**20
LIMITS = UploadLimits(
    max_file_bytes=2 * MB, max_files=3, max_request_bytes=5 * MB, client_bytes_per_window=8 * MB
)


def gradio_like_app(folder: Path, guarded: bool) -> FastAPI:
    app = FastAPI()

    @app.post("/gradio_api/upload")
    async def upload(request: Request):  # what gradio.routes' upload_file does, minus the cache move
        try:
            files, _, _ = await upload_fn(request, folder, 2 * MB, None, force_move=True)
        except MultiPartException as exc:
            return PlainTextResponse(exc.message, status_code=413)
        return JSONResponse(files)

    if guarded:
        app.add_middleware(UploadGuard, limits=LIMITS, folder=folder)
    return app


def post(app: FastAPI, files=None, data=None, content=None, headers=None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(
                "/gradio_api/upload", files=files, data=data, content=content, headers=headers
            )

    return asyncio.run(go())


def top_level_tmp(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.name.startswith("tmp")]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "uploads"
    path.mkdir()
    return path


# --------------------------------------------------------------------------- uploads (findings 1, 3)
def test_files_within_the_limits_pass_and_land_in_hashed_folders(folder):
    files = [("files", ("a.png", b"x" * 1000)), ("files", ("b.png", b"y" * 10))]
    response = post(gradio_like_app(folder, True), files=files)
    assert response.status_code == 200, response.text
    assert [Path(p).name for p in response.json()] == ["a.png", "b.png"]
    assert top_level_tmp(folder) == []


def test_a_field_without_a_filename_is_refused_before_it_is_held(folder):
    # Finding 1: Gradio keeps such a field in memory whole (300 MB -> +850 MB RSS). Unguarded, the
    # whole field reaches Gradio's parser and the request succeeds; guarded, it is refused.
    body = {"junk": "z" * (3 * MB)}
    one_file = [("files", ("a.png", b"1"))]
    assert post(gradio_like_app(folder, False), data=body, files=one_file).status_code == 200
    response = post(gradio_like_app(folder, True), data=body, files=one_file)
    assert response.status_code == 400
    assert "files only" in response.json()["detail"]


def test_more_files_than_a_request_may_carry_are_refused_and_leave_nothing(folder):
    files = [("files", (f"{i}.png", b"p" * 100)) for i in range(LIMITS.max_files + 1)]
    unguarded = post(gradio_like_app(folder, False), files=files)
    assert unguarded.status_code == 200 and len(unguarded.json()) == LIMITS.max_files + 1  # Gradio: 1,000
    response = post(gradio_like_app(folder, True), files=files)
    assert response.status_code == 413
    assert f"more than {LIMITS.max_files} files" in response.json()["detail"]
    assert top_level_tmp(folder) == []


def test_a_request_larger_than_its_cap_is_refused_midway_without_partial_files(folder):
    files = [("files", (f"{i}.bin", b"q" * (2 * MB - 100))) for i in range(3)]  # 6 MB > 5 MB
    response = post(gradio_like_app(folder, True), files=files)
    assert response.status_code == 413
    assert "larger than the server accepts in one request" in response.json()["detail"]
    assert top_level_tmp(folder) == []


def test_a_file_over_the_size_limit_is_refused(folder):
    response = post(gradio_like_app(folder, True), files=[("files", ("big.bin", b"r" * (2 * MB + 1)))])
    assert response.status_code == 413
    assert "larger than the limit of 2 MB" in response.json()["detail"]
    assert top_level_tmp(folder) == []


def test_one_client_cannot_fill_the_disk_over_many_requests(folder):
    app = gradio_like_app(folder, True)
    one = [("files", ("f.bin", b"s" * (MB + MB // 2)))]
    statuses = [post(app, files=one).status_code for _ in range(8)]  # 12 MB > 8 MB an hour
    assert statuses[:5] == [200] * 5
    assert statuses[-1] == 413


def test_a_malformed_body_gets_400_not_500(folder):
    response = post(
        gradio_like_app(folder, True),
        content=b"--B\r\nno headers end here" * 10,
        headers={"content-type": "multipart/form-data; boundary=B"},
    )
    assert response.status_code == 400


def test_orphaned_partial_files_are_removed(folder):
    # What a cut-off upload leaves behind (finding 3): a top-level tmp file; finished uploads live
    # in sub-folders and are kept.
    (folder / "tmpabc123").write_bytes(b"partial")
    kept = folder / ("0" * 64)
    kept.mkdir()
    (kept / "photo.png").write_bytes(b"done")
    assert remove_orphans(folder) == 1
    assert top_level_tmp(folder) == [] and (kept / "photo.png").exists()


def test_the_client_ledger_forgets_after_its_window():
    now = [0.0]
    ledger = ClientLedger(window_s=10, clock=lambda: now[0])
    ledger.add("a", 5)
    assert ledger.used("a") == 5
    now[0] = 11
    assert ledger.used("a") == 0


# --------------------------------------------------------------------------- JSON bodies (finding 4)
async def _call_guard(guard, messages, method="POST", path="/gradio_api/queue/join", stall_after=None):
    """Runs one request through `guard`; `messages` are the body pieces, and the client goes silent
    after `stall_after` of them. Returns (status, body) of what the guard sent."""
    sent = []
    pieces = list(messages)
    delivered = 0

    async def receive():
        nonlocal delivered
        if stall_after is not None and delivered >= stall_after:
            await asyncio.sleep(3600)
        delivered += 1
        if not pieces:
            return {"type": "http.disconnect"}
        body = pieces.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pieces) or stall_after is not None}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "client": ("198.51.100.9", 1)}
    await guard(scope, receive, send)
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def _echo(scope, receive, send):
    message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": message.get("body", b"")})


def test_a_body_that_stops_arriving_is_dropped_after_the_read_timeout():
    guard = RequestGuard(_echo, max_body_bytes=1000, read_timeout_s=0.2)
    status, detail = asyncio.run(_call_guard(guard, [b"{"], stall_after=1))
    assert status == 408 and b"stopped arriving" in detail
    assert guard.buffered == 0  # what it held is released


def test_bodies_read_at_once_share_one_memory_bound():
    # Twenty slow bodies each just under the per-body limit held +660 MB before (finding 4).
    guard = RequestGuard(_echo, max_body_bytes=1000, max_buffered_bytes=2500, read_timeout_s=0.5)

    async def many():
        slow = [_call_guard(guard, [b"x" * 900], stall_after=1) for _ in range(4)]
        return await asyncio.gather(*slow)

    statuses = sorted(status for status, _ in asyncio.run(many()))
    assert statuses == [408, 408, 503, 503]  # two fit (1,800 bytes); the rest are refused at once
    assert guard.buffered == 0


def test_a_complete_body_still_reaches_the_app():
    guard = RequestGuard(_echo, max_body_bytes=1000)
    assert asyncio.run(_call_guard(guard, [b'{"a":', b" 1}"])) == (200, b'{"a": 1}')


def test_deep_links_are_never_published():
    guard = RequestGuard(_echo, max_body_bytes=1000)
    status, detail = asyncio.run(_call_guard(guard, [b""], method="GET", path="/gradio_api/deep_link"))
    assert status == 404 and b"Deep links are turned off" in detail
