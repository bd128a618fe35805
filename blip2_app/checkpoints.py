"""Checkpoint facts, written once: path or hub id, where a checkpoint is, its safetensors headers,
which component a tensor belongs to, and what the hub client raises when it cannot fetch one.

Loading (`loading.py`), the registry (`registry.py`), start-up (`startup.py`) and the memory
estimate (`memory.py`) all ask here. No torch import: the tiny test checkpoints (built with torch)
are imported only when one is asked for.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlparse

from .errors import CheckpointUnreachableError, ModelLoadError
from .precisions import COMPONENT_MODULES

if TYPE_CHECKING:
    from .registry import ModelEntry

TINY_PREFIX = "tiny:"  # a checkpoint built on demand by testing.py (random weights)
SAFETENSORS_PATTERNS = ["*.safetensors", "*.json"]


# --------------------------------------------------------------------------- path or hub id
def looks_like_path(name: str) -> bool:
    """The one rule: a folder rather than a hub id (`owner/name`, exactly one slash) or a tiny
    model. Absolute, starting with `.` or `~`, more than one slash, or the system's own separator
    where it is not `/`. Whether the folder exists is not asked: `./missing` is still a path."""
    if name.startswith(TINY_PREFIX):
        return False
    return (
        Path(name).is_absolute()
        or name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def is_hub_id(name: str) -> bool:
    """`owner/name`: exactly one slash and not a path."""
    return name.count("/") == 1 and not looks_like_path(name)


# --------------------------------------------------------------------------- where it is
def checkpoint_location(entry: ModelEntry) -> str:
    """Local folder or hub id to pass to `from_pretrained`; tiny checkpoints are built on demand.

    A folder that does not exist is a `ModelLoadError`; a hub id neither cached nor reachable is a
    `CheckpointUnreachableError` (raised in seconds, see `require_hub`)."""
    if entry.checkpoint.startswith(TINY_PREFIX):
        from .testing import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint(entry.checkpoint[len(TINY_PREFIX) :]))
    if Path(entry.checkpoint).expanduser().is_dir():
        return entry.checkpoint
    if looks_like_path(entry.checkpoint):
        hint = " (train it: python -m blip2_app.training.train --config shapes-demo)"
        raise ModelLoadError(
            f"The checkpoint folder of {entry.name}, {entry.checkpoint}, does not exist"
            + (hint if entry.name.startswith("shapes-demo") else "")
            + "."
        )
    if not _in_hub_cache(entry.checkpoint):
        require_hub(entry.checkpoint)
    return entry.checkpoint


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    validate_hub_id(repo_id)
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def validate_hub_id(repo_id: str) -> None:
    """A hub id the hub client refuses (spaces, `..`, too long) is the user's typo, not a network
    failure: its own sentence, and no fallback."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ModelLoadError(f"{repo_id!r} is not a valid hub id: {error}") from error


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub checkpoint (its safetensors and JSON files), or None
    when it is not in the Hugging Face cache or has no safetensors file there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    validate_hub_id(repo_id)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=SAFETENSORS_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    return folder if any(folder.glob("*.safetensors")) else None


def weight_files(location: str) -> list[Path]:
    """The checkpoint's safetensors files (downloaded for a hub id), or [] if it has none."""
    folder = Path(location)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(location, allow_patterns=SAFETENSORS_PATTERNS))
    return sorted(folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- the hub
def hub_fetch_errors() -> tuple[type[BaseException], ...]:
    """What the hub client raises when a checkpoint cannot be fetched from here.

    Its own errors are all OSErrors: `LocalEntryNotFoundError` (not cached, offline),
    `OfflineModeIsEnabled`, `HfHubHTTPError` and its `RepositoryNotFoundError` / `GatedRepoError`
    (test_checkpoints.py checks this, so an upgrade that changes it fails a test). Its HTTP
    library's transport errors (no route, timeout, proxy) are not OSErrors: named here. Anything
    else, a `KeyError` or `TypeError`, is a bug and must propagate."""
    import httpx2  # huggingface_hub's HTTP client (a dependency of huggingface_hub 2.x)

    return (OSError, httpx2.TransportError)


def require_hub(repo_id: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when the hub cannot be reached: huggingface_hub retries a
    dead network with back-off for over two minutes before giving up."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise CheckpointUnreachableError(
            unreachable_checkpoint_message(repo_id, OSError("HF_HUB_OFFLINE is set"))
        )
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise CheckpointUnreachableError(unreachable_checkpoint_message(repo_id, error)) from error


def hub_config(repo_id: str) -> dict[str, Any]:
    """config.json of a hub checkpoint: the local cache first, then the network."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    validate_hub_id(repo_id)
    try:
        path = hf_hub_download(repo_id, "config.json", local_files_only=True)
    except LocalEntryNotFoundError:
        require_hub(repo_id)
        try:
            path = hf_hub_download(repo_id, "config.json")
        except hub_fetch_errors() as error:  # offline, missing or gated repo, network
            raise CheckpointUnreachableError(unreachable_checkpoint_message(repo_id, error)) from error
    return read_json(Path(path))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file; a missing, unreadable or malformed one is a `ModelLoadError` naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        if path.name == "config.json":
            raise ModelLoadError(
                f"{path.parent} is not a checkpoint folder: it has no config.json."
            ) from error
        raise ModelLoadError(f"{path} does not exist.") from error
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, or bytes that are not UTF-8
        raise ModelLoadError(f"Cannot read {path}: {error}.") from error


def unreachable_checkpoint_message(checkpoint: str, error: BaseException) -> str:
    return (
        f"Could not load the model {checkpoint!r}: it is not in the local Hugging Face cache and could "
        f"not be downloaded ({describe(error)}). "
        "If you have the checkpoint on disk, pass its folder: --model /path/to/blip2-opt-2.7b "
        "(or set BLIP2_MODEL). To start offline, use --model shapes-demo (the bundled demo model, "
        "trained on synthetic shapes only), --fallback-model shapes-demo (start on it whenever the "
        "model cannot be fetched) or --model tiny-random (random weights: the app works, its words "
        "are noise)."
    )


def describe(error: BaseException) -> str:
    """`Type: first line of the message`, for a sentence that names a library's error."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# --------------------------------------------------------------------------- safetensors headers
class TensorInfo(NamedTuple):
    name: str
    dtype: str  # as stored: "F32", "BF16", "I64", ...
    shape: tuple[int, ...]


class SafetensorsHeaderError(ValueError):
    """A file whose safetensors header cannot be parsed (truncated, not JSON, fields missing)."""


@dataclass(frozen=True)
class SafetensorsHeader:
    data_start: int  # where the data section begins in the file (8 + header length)
    entries: dict[str, dict[str, Any]]  # tensor name -> {"dtype", "shape", "data_offsets"}

    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(name, e["dtype"], tuple(e["shape"])) for name, e in self.entries.items()]


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The header of a safetensors file (8-byte little-endian length, then JSON), without reading
    a single weight. `__metadata__` is left out. Raises OSError or `SafetensorsHeaderError`."""
    with open(path, "rb") as handle:
        try:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        except (struct.error, ValueError) as error:  # too short; not UTF-8 or not JSON
            raise SafetensorsHeaderError(f"{path} has no readable safetensors header ({error})") from error
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"{path}: the safetensors header is not a JSON object")
    entries = {name: info for name, info in header.items() if name != "__metadata__"}
    for name, info in entries.items():
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and isinstance(info.get("data_offsets"), list)
        ):
            raise SafetensorsHeaderError(f"{path}: tensor {name!r} has no dtype, shape or data_offsets")
    return SafetensorsHeader(8 + size, entries)


# --------------------------------------------------------------------------- components
def component_of(tensor_name: str) -> str | None:
    """ "vision", "qformer" or "llm" for a tensor or module name of any BLIP-2 / InstructBLIP / ITM
    class, by its top-level module; None for anything else."""
    top = tensor_name.split(".", 1)[0]
    return next((c for c, names in COMPONENT_MODULES.items() if top in names), None)
