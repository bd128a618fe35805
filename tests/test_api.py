"""The public API: `python app.py --model tiny-random` on a free port, driven with gradio_client.

Each `Client` is its own session, so two clients must see separate chats and galleries.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("BLIP2_TINY_CACHE", tempfile.mkdtemp(prefix="blip2-tiny-"))

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from running_app import running_app

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = [str(p) for p in sorted((ROOT / "assets" / "examples").glob("*.*"))[:3]]
HOSTILE = ROOT / "tests" / "data" / "hostile"
ENDPOINTS = {
    "/caption",
    "/answer",
    "/chat",
    "/index_gallery",
    "/search_text",
    "/search_image",
    "/clear_gallery",
    "/caption_batch",
    "/match",
    "/explain",
    "/classify",
}
UPLOAD_LIMIT_MB = 2
# Issue 18 (search, chat and API): public endpoints of the new controls.
ENDPOINTS |= {
    "/answer_topk",
    "/chat_undo",
    "/chat_edit",
    "/chat_export",
    "/more_like_this",
    "/search_caption",
    "/search_combined",
    "/set_min_score",
    "/results_json",
    "/download_gallery",
    "/load_gallery",
    "/search_images",  # API-only: the stateless gallery search agents call (MCP)
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app as users start it, with a small upload limit; yields its URL."""
    args = ["--concurrency", "1", "--max-queue", "8", "--max-upload-mb", str(UPLOAD_LIMIT_MB)]
    with running_app(tmp_path_factory.mktemp("app"), args) as app:
        yield app.url


@pytest.fixture
def client(server) -> Client:
    return Client(server, verbose=False)


def texts(messages) -> list[tuple[str, str]]:
    """(role, text) pairs from a Chatbot value in messages format (content: str or parts)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        out.append((message["role"], content))
    return out


def test_public_endpoints_are_exactly_the_contract(client):
    info = client.view_api(return_format="dict", print_info=False)
    assert set(info["named_endpoints"]) == ENDPOINTS
    assert not info["unnamed_endpoints"], "UI helper events must stay private"
    first = {
        name: [p["parameter_name"] for p in ep["parameters"]] for name, ep in info["named_endpoints"].items()
    }
    assert first["/caption"][:3] == ["image", "style", "prompt"]
    assert first["/answer"][:2] == ["image", "question"]
    assert first["/chat"][:2] == ["image", "message"]
    assert first["/index_gallery"] == ["files", "caption_images"]
    assert first["/search_text"][:2] == ["query", "top_k"]
    assert first["/search_image"] == ["image", "top_k"]
    assert first["/clear_gallery"] == []
    assert first["/caption_batch"][:4] == ["files", "style", "question", "decoding"]
    assert first["/match"] == ["image", "text"]
    assert first["/explain"] == ["image", "text"]
    assert first["/classify"][:3] == ["image", "labels", "template"]
    assert first["/search_images"][:3] == ["images", "query", "top_k"]
    optional = {p["parameter_name"] for p in info["named_endpoints"]["/caption"]["parameters"][2:]}
    assert optional == {
        p["parameter_name"]
        for p in info["named_endpoints"]["/caption"]["parameters"][2:]
        if p["parameter_has_default"]
    }, "everything after (image, style) is optional"


def test_caption_and_answer(client):
    image = handle_file(PHOTOS[0])
    caption = client.predict(image, "short", api_name="/caption")
    assert isinstance(caption, str) and caption and "\n" not in caption
    several = client.predict(
        image, "detailed", num_captions=3, num_beams=3, max_new_tokens=6, api_name="/caption"
    )
    assert len(several.split("\n")) == 3
    custom = client.predict(image, "custom", "A picture of", decoding="nucleus", seed=1, api_name="/caption")
    assert custom
    answer = client.predict(image, "What is in the picture?", api_name="/answer")
    assert isinstance(answer, str) and answer


def test_chat_streams_and_remembers(client):
    image = handle_file(PHOTOS[0])
    job = client.submit(image, "What is this?", decoding="greedy", max_new_tokens=12, api_name="/chat")
    updates = [texts(update) for update in job]
    assert len(updates) >= 3, "the answer arrives in several updates"
    final = texts(job.result())
    assert [role for role, _ in final] == ["user", "assistant"] and final[1][1]
    growing = [u[-1][1] for u in updates if len(u) == 2]
    assert len(set(growing)) >= 2, "the answer grows while streaming"

    second = texts(
        client.predict(image, "And the colour?", decoding="greedy", max_new_tokens=6, api_name="/chat")
    )
    assert [text for role, text in second if role == "user"] == ["What is this?", "And the colour?"]

    few_shot = {"headers": ["question", "answer"], "data": [["Is it a photo?", "yes"]]}
    third = client.predict(image, "Is it blue?", few_shot, "", "greedy", 6, api_name="/chat")
    assert len(third) == 6, "few-shot examples go into the prompt, not into the visible chat"


def test_two_clients_have_separate_chats_and_galleries(server):
    alice, bob = Client(server, verbose=False), Client(server, verbose=False)
    image = handle_file(PHOTOS[0])
    alice.predict(image, "Alice asks?", decoding="greedy", max_new_tokens=4, api_name="/chat")
    bob_chat = texts(bob.predict(image, "Bob asks?", decoding="greedy", max_new_tokens=4, api_name="/chat"))
    assert [text for role, text in bob_chat if role == "user"] == ["Bob asks?"]
    alice_chat = texts(
        alice.predict(image, "Alice again?", decoding="greedy", max_new_tokens=4, api_name="/chat")
    )
    assert [text for role, text in alice_chat if role == "user"] == ["Alice asks?", "Alice again?"]

    status = alice.predict([handle_file(p) for p in PHOTOS], api_name="/index_gallery")
    assert status.startswith("Indexed 3 new images")
    assert len(alice.predict("a photo", 5, api_name="/search_text")) == 3
    with pytest.raises(AppError, match="gallery is empty"):
        bob.predict("a photo", 5, api_name="/search_text")


def test_gallery_index_search_clear(client):
    status = client.predict([handle_file(p) for p in PHOTOS], api_name="/index_gallery")
    assert status == "Indexed 3 new images; the gallery now holds 3."

    results = client.predict("a photo of a cat", 2, api_name="/search_text")
    assert len(results) == 2
    for rank, item in enumerate(results, start=1):
        assert Path(item["image"]).is_file()
        assert (
            item["caption"].startswith(f"#{rank} ")
            and "cosine" in item["caption"]
            and " p " in item["caption"]
        )

    reranked = client.predict("a photo of a cat", 3, True, 2, api_name="/search_text")
    assert [("ITM" in item["caption"]) for item in reranked] == [True, True, False]

    similar = client.predict(handle_file(PHOTOS[1]), 5, api_name="/search_image")
    assert len(similar) == 2 and all(Path(PHOTOS[1]).name not in item["caption"] for item in similar)

    assert client.predict(api_name="/clear_gallery") == "Cleared the gallery (3 images)."
    assert client.predict(api_name="/clear_gallery") == "The gallery is already empty."


def test_bad_input_gets_a_specific_sentence_and_the_server_keeps_serving(client):
    with pytest.raises(AppError, match="not a recognised image"):
        client.predict(handle_file(str(HOSTILE / "made_random_bytes.jpg")), "short", api_name="/caption")
    with pytest.raises(AppError, match="pixels"):
        client.predict(
            handle_file(str(HOSTILE / "pillow_decompression_bomb.gif")), "short", api_name="/caption"
        )
    with pytest.raises(AppError, match="sonnet"):  # Gradio checks Radio values itself
        client.predict(handle_file(PHOTOS[0]), "sonnet", api_name="/caption")
    with pytest.raises(AppError, match="limit is 2,000 characters"):
        client.predict(handle_file(PHOTOS[0]), "why? " * 100_000, api_name="/answer")
    with pytest.raises(AppError, match="1000"):  # Gradio enforces the slider bounds (generation.LIMITS)
        client.predict(handle_file(PHOTOS[0]), "short", num_beams=1000, api_name="/caption")
    assert client.predict(handle_file(PHOTOS[0]), "short", api_name="/caption")


def test_security_defaults(server, tmp_path):
    # api_open=False: the REST route cannot skip the queue (and its limits).
    direct = httpx.post(f"{server}gradio_api/run/caption", json={"data": [None, "short"]}, timeout=10)
    assert direct.status_code >= 400
    assert httpx.get(f"{server}gradio_api/monitoring", timeout=10).status_code == 404
    config = httpx.get(f"{server}config", timeout=10).json()
    assert config.get("max_file_size") == UPLOAD_LIMIT_MB * 1024 * 1024
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom((UPLOAD_LIMIT_MB + 1) * 1024 * 1024))
    with pytest.raises(Exception, match="(?i)413|too large|exceeds|maximum"):
        Client(server, verbose=False).predict(handle_file(str(big)), "short", api_name="/caption")


def test_search_and_chat_endpoints_take_their_documented_parameters(client):
    """Issue 18's endpoints: first parameters in the order docs/api.md gives."""
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    first = {name: [p["parameter_name"] for p in ep["parameters"]] for name, ep in info.items()}
    assert first["/answer_topk"] == ["image", "question", "k"]
    assert first["/chat_undo"] == [] and first["/chat_export"] == ["fmt"]
    assert first["/chat_edit"][:2] == ["image", "message"]
    assert first["/more_like_this"] == ["item", "top_k"] == first["/search_caption"]
    assert first["/search_combined"] == ["query", "image", "negative", "top_k"]
    assert first["/set_min_score"] == ["min_score", "score"]
    assert first["/results_json"] == [] == first["/download_gallery"]
    assert first["/load_gallery"] == ["archive"]
