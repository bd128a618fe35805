"""Issue 18: what people expect from a gallery search, a chat box and an agent-callable model.

On the bundled demo model (shapes-demo), where meaning matters: "more like this", the minimum
score, the combined query with a negative text, gallery archives (round trip between two
gradio_client sessions, another model's gallery refused, hostile archives refused with the
session's gallery kept), chat undo / edit / export with the prompt checked, /answer_topk against
/answer. MCP on the tiny random model: a real MCP client (the `mcp` SDK) lists the tools and gets
a caption; with --mcp off nothing answers on the MCP route; the body limit still holds; the
stateless gallery search (`search_images`) ranks a list of images as a brute-force cosine does,
through the MCP client and gradio_client, with its limits.

Skipped only when the bundled demo checkpoint is missing (as tests/test_demo_model.py).
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import io
import json
import shutil
import socket
import zipfile
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from blip2_app.config import Settings
from blip2_app.gallery import GalleryArchiveError, read_archive
from blip2_app.startup import load_engine
from blip2_app.training import synthetic
from blip2_app.ui import build_demo, launch_options
from blip2_app.ui.sessions import ChatSession, GallerySession
from blip2_app.ui.tabs.chat import ChatHandlers
from blip2_app.ui.tabs.retrieval import RetrievalHandlers, SearchReport, SearchView

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "assets" / "models" / "blip2-shapes"
PHOTO = str(sorted((ROOT / "assets" / "examples").glob("*.*"))[0])
GALLERY_SIZE = 120  # single-shape test scenes: 24 (colour, shape) kinds, about 5 of each
needs_demo = pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason=f"{BUNDLED} is missing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(settings: Settings, engine):
    demo = build_demo(settings, engine)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(settings))
    try:
        yield f"http://127.0.0.1:{settings.port}/"
    finally:
        demo.close()


def texts(messages) -> list[str]:
    """The texts of a Chatbot value in messages format (content: a string or a list of parts)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        out.append(content)
    return out


def app_settings(model: str, *flags: str) -> Settings:
    return Settings.from_sources(["--model", model, "--port", str(free_port()), *flags], env={})


# --------------------------------------------------------------------------- demo model fixtures
@pytest.fixture(scope="module")
def demo_engine():
    if not (BUNDLED / "config.json").exists():
        pytest.skip(f"{BUNDLED} is missing: train it first")
    return load_engine(Settings(model="shapes-demo"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """(path, colour, shape) of GALLERY_SIZE single-shape scenes the model never trained on."""
    return single_shape_scenes(tmp_path_factory.mktemp("shapes"), 777)


def single_shape_scenes(folder: Path, seed: int) -> list[tuple[str, str, str]]:
    return synthetic.single_shape_gallery(folder, seed, GALLERY_SIZE)


@pytest.fixture(scope="module")
def searches(demo_engine) -> RetrievalHandlers:
    return RetrievalHandlers(demo_engine, Settings(model="shapes-demo"))


@pytest.fixture(scope="module")
def gallery(searches, scenes) -> GallerySession:
    _, session = searches.index_gallery([path for path, _, _ in scenes], False, None)
    assert len(session) == GALLERY_SIZE
    return session


def kind_of(name: str) -> tuple[str, str]:
    """(colour, shape) from a result's name, e.g. "#1 007-red-circle.png · cosine ..."."""
    stem = name.split(" ")[1] if name.startswith("#") else name
    _, colour, shape = Path(stem).stem.split("-")
    return colour, shape


def hits(report: SearchReport) -> list[tuple[str, str]]:
    return [kind_of(hit.name) for hit in report.hits]


# --------------------------------------------------------------------------- retrieval on the demo model
@pytest.fixture(scope="module")
def galleries(searches, gallery, scenes, tmp_path_factory) -> list[tuple[list, GallerySession]]:
    """(scenes, session) of six galleries: this module's and five more of fresh single-shape test
    scenes. The ranking tests below count over all six: one gallery holds 4-9 red circles and
    about 20 red shapes, too few to tell two retrieval twins apart."""
    out = [(scenes, gallery)]
    for seed in range(778, 783):
        shown = single_shape_scenes(tmp_path_factory.mktemp(f"shapes{seed}"), seed)
        _, session = searches.index_gallery([path for path, _, _ in shown], False, None)
        out.append((shown, session))
    return out


@needs_demo
def test_more_like_this_from_a_red_circle_returns_red_circles_first(searches, galleries):
    """Every red circle of the galleries as the query (itself left out): the first result is a
    red circle for at least 3 in 4 of them. Chance: about 1 in 24. (The bundled twin: 24 of 28;
    twins of other runs 22 to 26, benchmarks/results/twin_behaviour.md.)"""
    firsts = []
    for shown, session in galleries:
        for path, colour, shape in shown:
            if (colour, shape) == ("red", "circle"):
                name = Path(path).name
                _, report = searches.more_like_this(name, 5, session, SearchView())
                assert name not in [hit.name for hit in report.hits], "the query image itself is left out"
                firsts.append(hits(report)[0])
    assert len(firsts) >= 20
    rate = sum(first == ("red", "circle") for first in firsts) / len(firsts)
    assert rate >= 0.75, (rate, firsts)


@needs_demo
def test_a_minimum_score_hides_exactly_the_results_under_it(searches, gallery):
    everything, full = searches.text_search("a small red circle", 30, False, 10, gallery, SearchView())
    cosines = [hit.cosine for hit in full.hits]
    cut = (cosines[4] + cosines[5]) / 2  # between the 5th and the 6th result
    _, report = searches.text_search("a small red circle", 30, False, 10, gallery, SearchView(cut, "cosine"))
    assert [h.name for h in report.hits] == [h.name for h in full.hits[:5]]
    assert report.hidden == 25 and "25 results under the minimum cosine" in searches.results_note(report)
    probabilities = [hit.probability for hit in full.hits]
    threshold = probabilities[2] * 0.999
    _, by_p = searches.text_search("a small red circle", 30, False, 10, gallery, SearchView(threshold, "p"))
    kept = [h.name for h in full.hits if h.probability >= threshold]
    assert [h.name for h in by_p.hits] == kept and by_p.hidden == 30 - len(kept)
    assert len(everything) == 30


@needs_demo
def test_shapes_like_this_one_but_not_red_rank_non_red_look_alikes_first(searches, gallery, scenes):
    """Each red shape of the gallery as the example image, negative text "a red shape": the first
    result is a look-alike (same shape) that is not red for at least half of them (chance about
    1 in 5), and more often than with the image alone (which finds red ones)."""
    reds = [(p, shape) for p, colour, shape in scenes if colour == "red"]
    look_alike_first = image_alone = 0
    for path, shape in reds:
        _, report = searches.combined_search("", path, "a red shape", 5, gallery, SearchView())
        found = hits(report)
        look_alike_first += found[0][0] != "red" and found[0][1] == shape
        _, alone = searches.combined_search("", path, "", 5, gallery, SearchView())
        image_alone += hits(alone)[0][0] != "red" and hits(alone)[0][1] == shape
    n = len(reds)
    assert look_alike_first / n >= 0.5 and look_alike_first > image_alone, (look_alike_first, image_alone, n)


@needs_demo
def test_but_not_red_keeps_red_shapes_out_of_the_top_three(searches, galleries):
    """Every red shape of the galleries as the example image, negative text "a red shape": no red
    shape in the top 3 for at least 9 in 10 of them. (The bundled twin: 110 of 110; twins whose
    stage 1 saw full captions only, 84 to 105: benchmarks/results/twin_behaviour.md.)"""
    no_red_top3 = total = 0
    for shown, session in galleries:
        for path in [p for p, colour, _ in shown if colour == "red"]:
            _, report = searches.combined_search("", path, "a red shape", 5, session, SearchView())
            no_red_top3 += all(colour != "red" for colour, _ in hits(report)[:3])
            total += 1
    assert no_red_top3 / total >= 0.9, (no_red_top3, total)


@needs_demo
def test_search_with_its_caption_needs_a_stored_caption(searches, gallery):
    with pytest.raises(gr.Error, match="has no stored caption"):
        searches.caption_search(gallery.index.items()[0].name, 3, gallery, SearchView())


@needs_demo
def test_results_download_as_json(searches, gallery):
    _, report = searches.text_search("a large blue square", 4, False, 10, gallery, SearchView())
    record = json.loads(Path(searches.results_json(report)).read_text())
    assert record["query"] == {"text": "a large blue square"}
    assert [r["rank"] for r in record["results"]] == [1, 2, 3, 4]
    assert [r["name"] for r in record["results"]] == [h.name for h in report.hits]
    assert set(record["results"][0]) == {"rank", "name", "sha256", "cosine", "p", "itm", "caption"}


# --------------------------------------------------------------------------- gallery archives
def zip_rewrite(source: Path, target: Path, change) -> Path:
    """A copy of the archive with members changed by `change(name, data) -> [(name, data), ...]`."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            for name, data in change(info.filename, old.read(info)):
                new.writestr(name, data)
    return target


@pytest.fixture(scope="module")
def archive(searches, scenes, tmp_path_factory) -> Path:
    _, small = searches.index_gallery([path for path, _, _ in scenes[:8]], False, None)
    path = tmp_path_factory.mktemp("archive") / "gallery.zip"
    shutil.copy(searches.download_gallery(small), path)
    return path


def hostile_archives(archive: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (archive, what the refusal says)."""

    def manifest(change):
        def edit(name, data):
            if name != "manifest.json":
                return [(name, data)]
            record = json.loads(data)
            change(record)
            return [(name, json.dumps(record))]

        return edit

    def add(extra_name, extra_data):
        return lambda name, data: (
            [(name, data)] + ([(extra_name, extra_data)] if name == "manifest.json" else [])
        )

    cases = {
        "traversal": (add("../../evil.txt", b"x"), "not part of a gallery"),
        "absolute": (add("/etc/evil", b"x"), "not part of a gallery"),
        "bomb": (add("images/" + "0" * 64 + ".jpg", b"\0" * 50_000_000), "zip bomb"),
        "wrong version": (manifest(lambda m: m.update(version=99)), "newer BLIP-2 Studio"),
        "forged checksum": (
            lambda name, data: [(name, data[:-4] + b"\x00\x00\x80\x3f" if name.endswith(".npy") else data)],
            "fails its checksum",
        ),
        "other model": (
            manifest(lambda m: m.update(embedding_model="blip2-itm-vit-g")),
            "This gallery was made with blip2-itm-vit-g",
        ),
    }
    out = {
        name: (zip_rewrite(archive, folder / f"{i}.zip", change), said)
        for i, (name, (change, said)) in enumerate(cases.items())
    }
    truncated = folder / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    out["truncated"] = (truncated, "not a gallery archive")
    link = folder / "link.zip"
    with zipfile.ZipFile(archive) as old, zipfile.ZipFile(link, "w") as new:
        for info in old.infolist():
            new.writestr(info, old.read(info))
        info = zipfile.ZipInfo("images/" + "1" * 64 + ".jpg")
        info.external_attr = 0o120777 << 16  # a symbolic link
        new.writestr(info, "/etc/passwd")
    out["symlink"] = (link, "links are refused")
    return out


@needs_demo
def test_hostile_archives_are_refused_and_the_session_keeps_its_gallery(
    searches, archive, tmp_path, demo_engine
):
    _, session = searches.index_gallery([PHOTO], False, None)
    before = [item.content_hash for item in session.index.items()]
    for name, (path, said) in hostile_archives(archive, tmp_path).items():
        with pytest.raises(GalleryArchiveError, match=said):
            read_archive(path, demo_engine, 200)
        with pytest.raises(gr.Error, match=said):
            searches.load_gallery(str(path), session)
        assert [item.content_hash for item in session.index.items()] == before, name
    assert not list(tmp_path.parent.glob("evil*")) and not Path("/tmp/evil.txt").exists()


@needs_demo
def test_a_gallery_downloaded_by_one_client_is_found_the_same_by_another(demo_engine, scenes):
    settings = app_settings("shapes-demo")
    with serving(settings, demo_engine) as url:
        alice, bob = Client(url, verbose=False), Client(url, verbose=False)
        files = [handle_file(path) for path, _, _ in scenes[:24]]
        assert "Indexed 24 new images" in alice.predict(files, False, api_name="/index_gallery")
        before = alice.predict("a small red circle", 5, api_name="/search_text")
        archive = alice.predict(api_name="/download_gallery")
        with pytest.raises(Exception, match="The gallery is empty"):
            bob.predict("a small red circle", 5, api_name="/search_text")
        assert "Loaded a gallery of 24 images" in bob.predict(handle_file(archive), api_name="/load_gallery")
        after = bob.predict("a small red circle", 5, api_name="/search_text")
        assert [r["caption"] for r in after] == [r["caption"] for r in before]  # names and scores
        forged = zip_rewrite(
            Path(archive),
            Path(archive).with_name("other.zip"),
            lambda n, d: [
                (n, d.replace(b'"shapes-demo-itm"', b'"blip2-itm-vit-g"') if n == "manifest.json" else d)
            ],
        )
        with pytest.raises(Exception, match="made with blip2-itm-vit-g"):
            bob.predict(handle_file(str(forged)), api_name="/load_gallery")
        assert [r["caption"] for r in bob.predict("a small red circle", 5, api_name="/search_text")] == [
            r["caption"] for r in before
        ], "bob keeps the gallery he had"


# --------------------------------------------------------------------------- chat
@needs_demo
def test_chat_undo_edit_and_export_follow_the_server_side_history(demo_engine, scenes, tmp_path):
    prompts: list[str] = []
    build = demo_engine.build_chat_prompt

    def recording(*args, **kwargs):
        built = build(*args, **kwargs)
        prompts.append(built.text)
        return built

    demo_engine.build_chat_prompt = recording
    settings = app_settings("shapes-demo")
    try:
        with serving(settings, demo_engine) as url:
            client = Client(url, verbose=False)
            image = handle_file(scenes[0][0])

            def ask(question, api="/chat"):
                return texts(
                    client.predict(
                        image=image, message=question, decoding="greedy", max_new_tokens=10, api_name=api
                    )
                )

            first = ask("what colour is the shape?")
            undone = ask("what shape is it?")
            undone_answer = undone[-1]
            assert texts(client.predict(api_name="/chat_undo")) == first
            prompts.clear()
            third = ask("how many shapes are there?")
            prompt = prompts[-1]
            assert "what colour is the shape?" in prompt and first[-1] in prompt
            assert "what shape is it?" not in prompt and undone_answer not in prompt, prompt
            prompts.clear()
            edited = ask("is the shape large?", api="/chat_edit")
            assert "how many shapes" not in prompts[-1] and "is the shape large?" in prompts[-1]
            assert edited[:2] == third[:2] and edited[2] == "is the shape large?"
            exported = json.loads(Path(client.predict("json", api_name="/chat_export")).read_text())
            assert exported["model"] == "shapes-demo"
            assert exported["image"]["name"] == Path(scenes[0][0]).name
            assert (
                exported["decoding"]["decoding"] == "greedy" and exported["decoding"]["max_new_tokens"] == 10
            )
            turns = [(t["question"], t["answer"]) for t in exported["turns"]]
            shown = [(edited[i], edited[i + 1]) for i in range(0, len(edited), 2)]
            assert turns == shown and len(turns) == 2
            markdown = Path(client.predict("markdown", api_name="/chat_export")).read_text()
            assert "shapes-demo" in markdown and "**Q2:** is the shape large?" in markdown
            client.predict(api_name="/chat_undo")
            client.predict(api_name="/chat_undo")
            with pytest.raises(Exception, match="nothing to undo"):
                client.predict(api_name="/chat_undo")
    finally:
        demo_engine.build_chat_prompt = build


def test_chat_session_export_round_trips():
    session = ChatSession("abc", [], image_name="cat.png", decoding={"decoding": "greedy"})
    assert json.loads(session.export("m", "json"))["turns"] == []


# --------------------------------------------------------------------------- answer_topk
@needs_demo
def test_answer_topk_first_is_right_as_often_as_answer_and_scores_right_answers_higher(demo_engine):
    """30 single-shape scenes, "what colour is the shape?": top-1 of /answer_topk is right exactly
    as often as /answer, and the mean score of right answers (any rank) beats that of wrong ones."""
    chats = ChatHandlers(demo_engine, Settings(model="shapes-demo"))
    right_single = right_first = 0
    right_scores, wrong_scores = [], []
    for i in range(30):
        scene = synthetic.make_scene(20262, "test", i, count=1)
        buffer = io.BytesIO()
        scene.render().save(buffer, format="PNG")
        image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        want = scene.objects[0].colour
        right_single += chats.answer(image, "what colour is the shape?") == want
        ranked = chats.answer_topk(image, "what colour is the shape?", 3)
        assert [a["score"] for a in ranked] == sorted((a["score"] for a in ranked), reverse=True)
        assert all(0 < a["score"] <= 1 for a in ranked) and 1 <= len(ranked) <= 3
        right_first += ranked[0]["answer"] == want
        for a in ranked:
            (right_scores if a["answer"] == want else wrong_scores).append(a["score"])
    assert right_first == right_single
    assert sum(right_scores) / len(right_scores) > sum(wrong_scores) / len(wrong_scores)


def test_answer_topk_refuses_k_over_the_beams():
    engine = load_engine(Settings(model="tiny-random"))
    chats = ChatHandlers(engine, Settings(model="tiny-random"))
    with pytest.raises(gr.Error, match="k must be between 1 and 10"):
        chats.answer_topk(PHOTO, "what is it?", 11)
    with pytest.raises(Exception, match="k must be a whole number from 1 to num_beams"):
        engine.answer_topk(PHOTO, "what is it?", 4, engine.text.entry.answer_decoding.replace(num_beams=3))


# --------------------------------------------------------------------------- MCP
async def mcp_tools_and_caption(url: str, image: str) -> tuple[list[str], str]:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async with streamablehttp_client(url) as (read, write, _), ClientSession(read, write) as session:
        await session.initialize()
        tools = (await session.list_tools()).tools
        result = await session.call_tool("caption", {"image": image, "style": "short"})
        assert not result.isError, result
        return [tool.name for tool in tools], result.content[0].text


def data_url(path: str) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def test_mcp_client_lists_the_tools_and_gets_a_caption():
    pytest.importorskip("mcp")
    settings = app_settings("tiny-random", "--mcp", "--max-upload-mb", "1")
    engine = load_engine(settings)
    with serving(settings, engine) as url:
        names, caption = asyncio.run(mcp_tools_and_caption(url + "gradio_api/mcp/", data_url(PHOTO)))
        assert {"caption", "answer", "answer_topk", "match", "classify", "search_images"} <= set(names)
        assert not {"chat", "text_search", "index_gallery", "chat_undo"} & set(names), "session-bound"
        assert "caption_batch" not in names, "a file list: Gradio's MCP server cannot pass one"
        assert caption == Client(url, verbose=False).predict(handle_file(PHOTO), "short", api_name="/caption")
        # The MCP route sits behind the same middleware: a body over the limit is refused there.
        big = "data:image/png;base64," + base64.b64encode(b"\0" * 3 * 1024 * 1024).decode()
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "caption", "arguments": {"image": big}},
        }
        headers = {"Accept": "application/json, text/event-stream"}
        refused = httpx.post(url + "gradio_api/mcp/", json=call, headers=headers, timeout=60)
        assert refused.status_code == 413, refused.text[:200]


def test_without_mcp_nothing_answers_on_the_mcp_route():
    settings = app_settings("tiny-random")
    engine = load_engine(settings)
    with serving(settings, engine) as url:
        for path in ("gradio_api/mcp/", "gradio_api/mcp/sse", "gradio_api/mcp/schema"):
            assert httpx.get(url + path).status_code == 404, path
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        assert httpx.post(url + "gradio_api/mcp/", json=body).status_code in (404, 405)


def test_answer_topk_on_the_vllm_backend_is_refused_with_a_sentence_before_any_request():
    from blip2_app.backends.vllm import UnsupportedDecodingError, VLLMOptions, connect
    from blip2_app.engine import Engine
    from blip2_app.registry import Registry

    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path.endswith("/models"):  # connect() asks which model is served
            return httpx.Response(200, json={"data": [{"id": "tiny-random", "max_model_len": 512}]})
        return httpx.Response(500)

    entry = Registry.load([]).resolve("tiny-random")
    engine = Engine(
        connect(entry, VLLMOptions("http://vllm.test:8000/v1"), transport=httpx.MockTransport(record))
    )
    before = len(sent)
    with pytest.raises(UnsupportedDecodingError, match="Scored top-k answers come from beam search"):
        engine.answer_topk(PHOTO, "what is it?", 2)
    assert len(sent) == before


# --------------------------------------------------------------------------- /search_images (MCP)
PHOTOS = [str(p) for p in sorted((ROOT / "assets" / "examples").glob("*.*"))]


async def mcp_call(url: str, tool: str, arguments: dict):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async with streamablehttp_client(url) as (read, write, _), ClientSession(read, write) as session:
        await session.initialize()
        return await session.call_tool(tool, arguments)


def brute_force_ranking(engine, images: list[str], text: str) -> list[tuple[int, float]]:
    """(position, ITC cosine) of every image, best first: max over the queries of the cosine,
    straight from the engine's features, no index in between."""
    projections = engine.image_features(images).projections.numpy()  # (n, queries, dim)
    query = engine.text_features([text])[0].numpy()
    cosines = (projections @ query).max(axis=1)
    return sorted(((i, float(c)) for i, c in enumerate(cosines)), key=lambda pc: -pc[1])


def test_mcp_search_images_ranks_a_list_of_images_as_brute_force_cosine():
    pytest.importorskip("mcp")
    settings = app_settings("tiny-random", "--mcp")
    engine = load_engine(settings)
    text = "a cat on a sofa"
    expected = brute_force_ranking(engine, PHOTOS, text)
    with serving(settings, engine) as url:
        arguments = {"images": [data_url(p) for p in PHOTOS], "query": text, "top_k": len(PHOTOS)}
        result = asyncio.run(mcp_call(url + "gradio_api/mcp/", "search_images", arguments))
        assert not result.isError, result
        record = ast.literal_eval(result.content[0].text)
        got = [(hit["index"], hit["cosine"]) for hit in record["results"]]
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [c for _, c in got] == pytest.approx([c for _, c in expected], abs=1e-4)
        assert [hit["rank"] for hit in record["results"]] == list(range(1, len(PHOTOS) + 1))
        assert [hit["name"] for hit in record["results"]] == [f"image {i}" for i, _ in expected]
        # A minimum score leaves out exactly the results under it, and counts them.
        p = [hit["p"] for hit in record["results"]]
        arguments |= {"min_score": (p[1] + p[2]) / 2, "score": "p"}
        record = ast.literal_eval(
            asyncio.run(mcp_call(url + "gradio_api/mcp/", "search_images", arguments)).content[0].text
        )
        assert [hit["index"] for hit in record["results"]] == [expected[0][0], expected[1][0]]
        assert record["hidden_below_minimum"] == len(PHOTOS) - 2
        # Nothing is kept between calls: the session-bound gallery search is not a tool, and a
        # call without images is refused rather than searching the last call's images.
        result = asyncio.run(
            mcp_call(url + "gradio_api/mcp/", "search_images", {"images": [], "query": text})
        )
        assert result.isError and "Please choose one or more images" in result.content[0].text


def test_search_images_endpoint_and_its_limits(tmp_path):
    settings = app_settings("tiny-random", "--max-gallery-images", "3")
    engine = load_engine(settings)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    photos = PHOTOS[:3]
    with serving(settings, engine) as url:
        client = Client(url, verbose=False)
        files = [handle_file(p) for p in photos]
        record = client.predict(
            files, "a rocket", top_k=3, rerank=True, rerank_k=2, api_name="/search_images"
        )
        expected = brute_force_ranking(engine, photos, "a rocket")
        results = record["results"]
        assert {hit["index"] for hit in results} == {0, 1, 2}
        assert {hit["name"] for hit in results} == {Path(p).name for p in photos}
        # With ITM re-ranking, the best two by ITC come first, sorted by their ITM probability.
        head = results[:2]
        assert {hit["index"] for hit in head} == {expected[0][0], expected[1][0]}
        assert head[0]["itm"] >= head[1]["itm"] and results[2]["itm"] is None
        assert results[2]["index"] == expected[2][0]
        # An example image alone: itself left out of its results.
        by_image = client.predict(
            [handle_file(p) for p in photos], "", image=handle_file(photos[0]), api_name="/search_images"
        )
        assert [hit["index"] for hit in by_image["results"]] and 0 not in [
            h["index"] for h in by_image["results"]
        ]
        # Limits, each with its sentence; the session keeps no gallery.
        with pytest.raises(AppError, match="4 files were sent; index at most 3 images at a time"):
            client.predict([handle_file(p) for p in PHOTOS[:4]], "a rocket", api_name="/search_images")
        with pytest.raises(AppError, match=r"images\[1\] \(notes.txt\) could not be read"):
            client.predict(
                [handle_file(photos[0]), handle_file(str(notes))], "a rocket", api_name="/search_images"
            )
        with pytest.raises(AppError, match="Image URLs are not fetched by this server"):
            client.predict(["https://example.com/cat.png"], "a cat", api_name="/search_images")
        with pytest.raises(AppError, match="The search text is 5,000 characters long; the limit is 500"):
            client.predict([handle_file(photos[0])], "x" * 5000, api_name="/search_images")
        with pytest.raises(AppError, match="The gallery is empty"):
            client.predict("a rocket", api_name="/search_text")
