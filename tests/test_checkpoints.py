"""Checkpoint facts written once (checkpoints.py), and errors that cannot hide bugs.

The fallback model starts only when a checkpoint really cannot be fetched: a bug injected into
the resolve or load path (a KeyError, a TypeError) propagates instead of being reported as "the
network is down". The memory check is skipped only for a reason it names, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import struct

import httpx2
import numpy as np
import pytest
from huggingface_hub import errors as hub_errors
from safetensors.numpy import save_file

from blip2_app import checkpoints
from blip2_app.checkpoints import (
    SafetensorsHeaderError,
    checkpoint_location,
    component_of,
    hub_fetch_errors,
    is_hub_id,
    looks_like_path,
    read_safetensors_header,
)
from blip2_app.config import Settings
from blip2_app.errors import CheckpointUnreachableError, ModelLoadError
from blip2_app.loading import PRESETS, load_model, pick_device
from blip2_app.memory import MemoryBudget, check_memory, checkpoint_tensors
from blip2_app.registry import Registry
from blip2_app.startup import load_engine, resolve_model

UNREACHABLE = "someone/blip2-never-downloaded"  # HF_HUB_OFFLINE=1 in tests (conftest.py)


# --------------------------------------------------------------------------- path or hub id
@pytest.mark.parametrize(
    ("name", "path", "hub_id"),
    [
        ("./missing", True, False),
        ("./owner/name", True, False),
        ("~/models/blip2", True, False),
        ("/abs/blip2-opt-2.7b", True, False),
        ("models/blip2/opt", True, False),
        (".hidden", True, False),
        ("Salesforce/blip2-opt-2.7b", False, True),
        ("blip2-opt-2.7b", False, False),  # a registry name (or an unknown one), neither
        ("tiny:blip2-opt", False, False),
    ],
)
def test_one_rule_for_path_or_hub_id(name, path, hub_id):
    assert looks_like_path(name) is path
    assert is_hub_id(name) is hub_id


def test_start_up_sentences_for_a_missing_folder_and_a_file(tmp_path):
    registry = Registry.load()
    with pytest.raises(
        ModelLoadError, match=r"The model folder '\./no-such-folder' given to --model does not"
    ):
        resolve_model(registry, "./no-such-folder", "--model")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file, not a folder"):
        resolve_model(registry, str(a_file), "--retrieval-model")
    with pytest.raises(CheckpointUnreachableError):  # owner/name: a hub id, asked of the (offline) hub
        resolve_model(registry, UNREACHABLE, "--model")
    with pytest.raises(ModelLoadError, match="is not a valid hub id"):  # a typo, not a network failure
        resolve_model(registry, "someone/two words", "--model")


def test_a_missing_registry_folder_names_the_entry(tmp_path):
    entry = Registry.load().resolve("shapes-demo")
    moved = dataclasses.replace(entry, checkpoint=str(tmp_path / "gone"))
    with pytest.raises(
        ModelLoadError, match=r"The checkpoint folder of shapes-demo, .*gone, does not exist \(train"
    ):
        checkpoint_location(moved)


# --------------------------------------------------------------------------- headers, components
def test_safetensors_header_is_read_once_and_right(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(
        {"vision_model.a": np.zeros((2, 3), np.float32), "query_tokens": np.zeros((1, 4, 8), np.int64)},
        str(path),
        metadata={"format": "pt"},
    )
    header = read_safetensors_header(path)
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header.data_start == 8 + length
    assert sorted(header.tensors()) == [("query_tokens", "I64", (1, 4, 8)), ("vision_model.a", "F32", (2, 3))]
    start, end = header.entries["vision_model.a"]["data_offsets"]
    assert path.read_bytes()[header.data_start + start : header.data_start + end] == bytes(24)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(b"\x01\x02")
    not_json = tmp_path / "not-json.safetensors"
    not_json.write_bytes(struct.pack("<Q", 5) + b"hello")
    no_dtype = tmp_path / "no-dtype.safetensors"
    no_dtype.write_bytes(struct.pack("<Q", 17) + b'{"a": {"x": 1}}  ')
    for broken in (truncated, not_json, no_dtype):
        with pytest.raises(SafetensorsHeaderError, match=broken.name):
            read_safetensors_header(broken)


def test_tensor_to_component():
    assert component_of("vision_model.encoder.layers.0.mlp.fc1.weight") == "vision"
    assert component_of("query_tokens") == "qformer"
    assert component_of("qformer.encoder.layer.0.attention.self.query.weight") == "qformer"
    assert component_of("itm_head.weight") == "qformer"
    assert component_of("language_model.lm_head.weight") == "llm"
    assert component_of("lm_head.weight") is None


# --------------------------------------------------------------------------- hub errors
def test_the_hub_clients_errors_are_the_ones_caught():
    caught = hub_fetch_errors()
    for error in (
        hub_errors.LocalEntryNotFoundError,
        hub_errors.RepositoryNotFoundError,
        hub_errors.GatedRepoError,
        hub_errors.HfHubHTTPError,
        hub_errors.OfflineModeIsEnabled,
        httpx2.ConnectError,
        httpx2.ConnectTimeout,
        httpx2.ProxyError,
    ):
        assert issubclass(error, caught), error
    for bug in (KeyError, TypeError, AttributeError, ValueError):
        assert not issubclass(bug, caught), bug


def _offline_hub(monkeypatch, remote_error: BaseException) -> None:
    """Nothing in the cache; the hub answers the connection check, then the download fails."""

    def download(repo_id, filename, local_files_only=False, **kwargs):
        if local_files_only:
            raise hub_errors.LocalEntryNotFoundError(f"{repo_id} is not cached")
        raise remote_error

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    monkeypatch.setattr(checkpoints, "require_hub", lambda repo_id, timeout=5.0: None)


@pytest.mark.parametrize(
    "remote_error",
    [httpx2.ConnectError("connection refused"), hub_errors.OfflineModeIsEnabled("offline")],
    ids=["connect-error", "offline"],
)
def test_an_unreachable_checkpoint_falls_back(monkeypatch, remote_error):
    _offline_hub(monkeypatch, remote_error)
    engine = load_engine(Settings(model=UNREACHABLE, fallback_model="tiny-random", retrieval_model="none"))
    assert engine.text.entry.name == "tiny-random"
    assert len(engine.notices) == 1 and UNREACHABLE in engine.notices[0]


def test_the_offline_hub_falls_back():
    engine = load_engine(Settings(model=UNREACHABLE, fallback_model="tiny-random", retrieval_model="none"))
    assert engine.text.entry.name == "tiny-random" and UNREACHABLE in engine.notices[0]


@pytest.mark.parametrize("bug", [KeyError("config"), TypeError("unexpected argument")], ids=repr)
def test_a_bug_while_resolving_propagates_and_no_fallback_starts(monkeypatch, bug):
    """Before: any exception here became CheckpointUnreachableError, and the fallback started
    under a banner blaming the network."""

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr("huggingface_hub.hf_hub_download", broken)
    with pytest.raises(type(bug)):
        load_engine(Settings(model=UNREACHABLE, fallback_model="tiny-random", retrieval_model="none"))
    _offline_hub(monkeypatch, bug)  # the same bug in the download after the cache missed
    with pytest.raises(type(bug)):
        load_engine(Settings(model=UNREACHABLE, fallback_model="tiny-random", retrieval_model="none"))


def test_a_bug_while_loading_propagates_and_no_fallback_starts(monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("injected")

    monkeypatch.setattr("blip2_app.loading.stream_load", broken)
    with pytest.raises(TypeError, match="injected"):
        load_engine(Settings(model="tiny-random", fallback_model="tiny-random-t5", retrieval_model="none"))


def test_an_unreadable_local_checkpoint_is_not_unreachable(tmp_path):
    """A folder on disk that transformers cannot read is a load error with its own message: nothing
    was to be fetched, so the fallback does not start (it used to: OSError meant "unreachable")."""
    folder = tmp_path / "no-weights"
    shutil.copytree(checkpoint_location(Registry.load().resolve("tiny-random")), folder)
    (folder / "model.safetensors").unlink()
    entry = Registry.load().resolve(str(folder))
    with pytest.raises(ModelLoadError, match=r"Cannot read the checkpoint of .*no-weights") as raised:
        load_model(entry, PRESETS["fp32"], pick_device("cpu"))
    assert not isinstance(raised.value, CheckpointUnreachableError)
    with pytest.raises(ModelLoadError, match="Cannot read the checkpoint"):
        load_engine(Settings(model=str(folder), fallback_model="tiny-random", available_memory_mb=0))


# --------------------------------------------------------------------------- memory check
def test_memory_check_skipped_for_a_known_reason_says_why(tmp_path, caplog):
    folder = tmp_path / "no-weights"
    shutil.copytree(checkpoint_location(Registry.load().resolve("tiny-random")), folder)
    (folder / "model.safetensors").unlink()
    entry = Registry.load().resolve(str(folder))
    budget = MemoryBudget(10**12, "test")
    with caplog.at_level(logging.WARNING, logger="blip2_app.memory"):
        assert check_memory(entry, PRESETS["fp32"], budget) is budget
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "Skipping the memory check" in caplog.text and "has no safetensors files" in caplog.text

    (folder / "model.safetensors").write_bytes(b"\x00")  # truncated
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="blip2_app.memory"):
        assert check_memory(entry, PRESETS["fp32"], budget) is budget
    assert "Skipping the memory check" in caplog.text and "no readable safetensors header" in caplog.text


def test_memory_check_lets_a_bug_through(monkeypatch):
    entry = Registry.load().resolve("tiny-random")
    assert checkpoint_tensors(entry)  # the real headers are read

    def broken(path):
        raise KeyError("dtype")

    monkeypatch.setattr("blip2_app.memory.read_safetensors_header", broken)
    with pytest.raises(KeyError):
        check_memory(entry, PRESETS["fp32"], MemoryBudget(10**12, "test"))
    with pytest.raises(KeyError):
        load_engine(Settings(model="tiny-random", fallback_model="tiny-random-t5", available_memory_mb=10**6))
