"""A disk cache of quantized models, so the second start skips quantizing (issue 20).

Loading OPT-2.7B from its fp32 checkpoint at dynamic-int8 means reading 15 GB and quantizing
3.8 B weights; the cache keeps the finished model instead (int8 rows, their scales, and every
other tensor as loaded: about a quarter of the fp32 size) and the next start maps that; its int8
layers are usable at once as weight-only layers, and packing.py packs them for fbgemm (packed
weights cannot be stored: torch's own format unpacks them). The vision fingerprint, which decides whether two models share their vision encoder, is
remembered per file too (hashing 4 GB took 6 s).

An entry's key is the checkpoint's identity (each file's path, size and modification time), the
precisions, the model class, the versions of torch and transformers and FORMAT_VERSION: a changed
checkpoint or upgrade misses the cache and writes a new entry; older entries of the same
checkpoint are removed then. int8-weight-only reads (and writes) the dynamic-int8 entry: the same
int8 rows and scales, used unpacked and left memory-mapped (decision 0009). Entries are written to
a temporary folder and renamed into place, so a killed start leaves no half entry. Off with
`--weight-cache off`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError

from . import quantization
from .precisions import ComponentPrecisions, cache_key_precisions

log = logging.getLogger(__name__)

# 2: every tensor starts at a multiple of ALIGNMENT bytes in its shard (padding tensors between).
FORMAT_VERSION = 2
# Quantizing a small checkpoint takes less than reading a cache entry would save: not worth disk.
MIN_CHECKPOINT_BYTES = 256 * 1024 * 1024
MANIFEST = "manifest.json"
SHARD_BYTES = 64 * 1024 * 1024  # written a shard at a time: see PendingEntry
DYNAMIC_INT8, INT8_EMBEDDING, BF16_EMBEDDING = "dynamic-int8", "int8-embedding", "bf16-embedding"
INT8_PARTS = ("rows", "scales", "zero_points", "bias")
# torch's weight-only int8 kernel crashes on rows that do not start at a multiple of 16 bytes
# (measured, torch 2.13, 4 rows or more); mapped rows start where they are in the file.
ALIGNMENT = 64
PADDING = "__padding__."  # names of the filler tensors that align the next tensor


def default_location() -> Path:
    """$BLIP2_WEIGHT_CACHE, else ~/.cache/blip2-studio/weights (XDG_CACHE_HOME honoured)."""
    if os.environ.get("BLIP2_WEIGHT_CACHE"):
        return Path(os.environ["BLIP2_WEIGHT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "blip2-studio" / "weights"


@dataclass(frozen=True)
class CacheEntry:
    """One cached model: where it is and what it is for."""

    path: Path
    key: str
    checkpoint: str

    @property
    def exists(self) -> bool:
        return (self.path / MANIFEST).is_file()

    @property
    def size_bytes(self) -> int:
        return _folder_bytes(self.path)


class WeightCache:
    """Quantized models and vision fingerprints under `root`."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def from_setting(cls, value: str) -> WeightCache | None:
        """The `--weight-cache` value: "off", "auto" (default_location) or a folder."""
        if value == "off":
            return None
        return cls(default_location() if value == "auto" else Path(value).expanduser())

    def size_bytes(self) -> int:
        """Bytes of all entries (fingerprints aside)."""
        if not self.root.is_dir():
            return 0
        return sum(_folder_bytes(entry) for entry in self.root.iterdir() if entry.is_dir())

    # ------------------------------------------------------------------ keys
    @staticmethod
    def _file_identity(files: list[Path]) -> list[list[Any]]:
        stats = [(path.resolve(), path.stat()) for path in files]
        return [[str(path), stat.st_size, stat.st_mtime_ns] for path, stat in stats]

    def entry_for(
        self,
        model_class: type,
        files: list[Path],
        precisions: ComponentPrecisions,
        shares_vision: bool,
    ) -> CacheEntry | None:
        """The entry this load would use, or None when caching does not pay (small checkpoint)."""
        if sum(path.stat().st_size for path in files) < MIN_CHECKPOINT_BYTES:
            return None
        identity = {
            "format": FORMAT_VERSION,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "class": model_class.__name__,
            "files": self._file_identity(files),
            "precisions": cache_key_precisions(precisions),
            "shares_vision": shares_vision,  # such an entry holds no vision encoder
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
        checkpoint = str(files[0].resolve().parent)
        return CacheEntry(self.root / key, key, checkpoint)

    # ------------------------------------------------------------------ fingerprints
    def vision_fingerprint(self, files: list[Path], compute: Callable[[list[Path]], str]) -> str:
        """`compute(files)`, remembered per file identity."""
        store = self.root / "fingerprints.json"
        identity = json.dumps(self._file_identity(files))
        try:
            known = json.loads(store.read_text())
        except (OSError, ValueError):
            known = {}
        if identity in known:
            return str(known[identity])
        fingerprint = compute(files)
        known[identity] = fingerprint
        try:
            _write_atomically(store, json.dumps(known).encode())
        except OSError as error:  # a read-only cache folder: hashing again next time is all it costs
            log.warning("Could not remember the vision fingerprint in %s: %s", store, error)
        return fingerprint

    # ------------------------------------------------------------------ store
    def begin(self, entry: CacheEntry) -> PendingEntry | None:
        """A staging folder for `entry`, to which the loader hands int8 layers as it makes them
        (`PendingEntry.record`); `finish` writes the rest. None when the folder cannot be made."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{entry.key}-", dir=self.root))
        except OSError as error:
            log.warning("Could not write the weight cache in %s: %s", self.root, error)
            return None
        return PendingEntry(entry, staging)

    def finish(self, pending: PendingEntry, model: torch.nn.Module, skip_prefix: str | None) -> bool:
        """Write what `record` did not get, rename the entry into place, drop older entries of the
        same checkpoint. A failure (disk full, read-only) is logged and leaves nothing behind: the
        app runs on and the next start quantizes again."""
        entry, started = pending.entry, time.perf_counter()
        try:
            if pending.failure is not None:
                raise pending.failure
            for tensors in _module_tensors(model, skip_prefix, pending.manifest, pending.recorded):
                pending.add(tensors)
            pending.flush()
            pending.close()
            if pending.failure is not None:
                raise pending.failure
            pending.manifest["checkpoint"] = entry.checkpoint
            (pending.folder / MANIFEST).write_text(json.dumps(pending.manifest))
            os.replace(pending.folder, entry.path)
        except (OSError, RuntimeError) as error:
            log.warning("Could not write the weight cache %s: %s", entry.path, error)
            return False
        finally:
            pending.abandon()  # after the rename: nothing left to remove
        self._drop_older(entry)
        log.info(
            "Wrote the weight cache %s (%.2f GB); its last part in %.1fs",
            entry.path,
            entry.size_bytes / 1e9,
            time.perf_counter() - started,
        )
        return True

    def _drop_older(self, entry: CacheEntry) -> None:
        for other in self.root.iterdir():
            manifest = other / MANIFEST
            if other == entry.path or not manifest.is_file():
                continue
            try:
                same = json.loads(manifest.read_text()).get("checkpoint") == entry.checkpoint
            except (OSError, ValueError):
                continue
            if same:
                log.info("Removing the outdated weight cache %s", other)
                shutil.rmtree(other, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(
        self,
        entry: CacheEntry,
        skeleton: Callable[[], torch.nn.Module],
        shared_vision: torch.nn.Module | None,
    ) -> torch.nn.Module | None:
        """The cached model, or None when the entry is missing or unreadable (then it is removed).
        Its int8 layers are weight-only layers over the mapped file (nothing copied or packed)."""
        if not entry.exists:
            return None
        try:
            manifest = json.loads((entry.path / MANIFEST).read_text())
            model = skeleton()
            filled = _fill(model, entry.path, manifest)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
            _discard(entry, f"is unreadable ({error})")
            return None
        if shared_vision is not None:
            model.vision_model = shared_vision
            filled |= {id(t) for t in [*shared_vision.parameters(), *shared_vision.buffers()]}
        # The skeleton's tensors are allocated but hold no values: each must have been replaced.
        missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in filled]
        if missing:
            _discard(entry, f"lacks {missing[:3]}")
            return None
        return model

    def remap(self, entry: CacheEntry, model: torch.nn.Module) -> bool:
        """Put the entry's mapped tensors in place of `model`'s own (the model it was written
        from: the same values), so that they leave anonymous memory. False, logged, when the entry
        cannot be read; the model then keeps the tensors it has, wholly or in part (equal values)."""
        try:
            _fill(model, entry.path, json.loads((entry.path / MANIFEST).read_text()))
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
            log.warning("Could not map the weight cache %s just written: %s", entry.path, error)
            return False
        return True


class PendingEntry:
    """An entry being written: safetensors shards of about SHARD_BYTES in a staging folder, and
    the manifest so far. Shards are written as tensors come (a whole model at once would be a
    second copy of it in memory: 8.2 GB peak instead of 4.2 on OPT-2.7B)."""

    def __init__(self, entry: CacheEntry, folder: Path):
        self.entry, self.folder = entry, folder
        self.manifest: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "kinds": {},
            "module_aliases": {},
            "tensor_aliases": {},
            "shards": [],
        }
        self.recorded: set[str] = set()
        self.failure: BaseException | None = None
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        # Shards are written by a thread of their own, so the disk works while the cores quantize;
        # one full shard waits at most (its memory is bounded to two shards).
        self._writes: queue.Queue[tuple[str, dict[str, torch.Tensor]] | None] = queue.Queue(maxsize=1)
        self._writer = threading.Thread(target=self._write_shards, name="weight-cache-writer", daemon=True)
        self._writer.start()

    def record(self, name: str, parts: dict[str, torch.Tensor]) -> None:
        """An int8 layer's parts, from the loader as it quantizes; a failure is kept for `finish`
        (the load itself goes on)."""
        if self.failure is not None:
            return
        self.add({f"{name}.{part}": tensor for part, tensor in parts.items()})
        self.manifest["kinds"][name] = DYNAMIC_INT8
        self.recorded.add(name)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self._shard.update(tensors)  # names are unique: each module's own tensors come once
        self._shard_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if self._shard_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._shard and self.manifest["shards"]:
            return
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        self.manifest["shards"].append(name)
        self._writes.put((name, self._shard))
        self._shard, self._shard_bytes = {}, 0

    def abandon(self) -> None:
        """Stop writing and remove the staging folder (what `finish` renamed is not there)."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        """Wait for the shards handed over so far to be written (or to fail)."""
        if self._writer.is_alive():
            self._writes.put(None)
            self._writer.join()

    def _write_shards(self) -> None:
        while (job := self._writes.get()) is not None:
            if self.failure is None:
                try:
                    save_aligned(job[1], self.folder / job[0])
                except (OSError, RuntimeError) as error:
                    self.failure = error


def _module_tensors(
    model: torch.nn.Module, skip_prefix: str | None, manifest: dict[str, Any], recorded: set[str]
) -> Iterator[dict[str, torch.Tensor]]:
    """Each module's own tensors under unique names, one module at a time (an int8 layer's rows
    are unpacked only when its turn comes), recording in `manifest` the special modules (int8
    layers, int8 and bf16 tables) and the names that alias another."""
    kinds, module_aliases, tensor_aliases = (
        manifest["kinds"],
        manifest["module_aliases"],
        manifest["tensor_aliases"],
    )
    first_module: dict[int, str] = {}
    first_tensor: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if skip_prefix and (name + ".").startswith(skip_prefix):
            continue
        if id(module) in first_module:
            module_aliases[name] = first_module[id(module)]
            continue
        first_module[id(module)] = name
        prefix = f"{name}." if name else ""
        if quantization.is_int8_linear(module):  # packed or weight-only: stored alike
            kinds[name] = DYNAMIC_INT8
            if name in recorded:  # written while loading
                continue
            parts = quantization.layer_int8_parts(module)
            yield {prefix + part: t.contiguous() for part, t in parts.items()}
            continue
        if isinstance(module, quantization.Int8Embedding):
            kinds[name] = INT8_EMBEDDING
        elif isinstance(module, quantization.Bf16Embedding):
            kinds[name] = BF16_EMBEDDING
        tensors = {}
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None:
                continue
            if id(tensor) in first_tensor:
                tensor_aliases[prefix + attr] = first_tensor[id(tensor)]
                continue
            first_tensor[id(tensor)] = prefix + attr
            tensors[prefix + attr] = tensor.detach().contiguous()
        if tensors:
            yield tensors


_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_aligned(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file in which every tensor starts at a multiple of ALIGNMENT bytes, so that
    tensors mapped from it (safetensors maps, it does not copy) are aligned as allocated ones are.
    safetensors' own writer aligns to 8 bytes; the format allows a header padded with spaces and
    needs tensors back to back, hence the filler tensors (PADDING), which readers skip."""
    header: dict[str, Any] = {}
    layout: list[torch.Tensor | int] = []  # tensors, and filler byte counts, in file order
    offset = 0
    for name, tensor in tensors.items():
        gap = -offset % ALIGNMENT
        if gap:
            header[f"{PADDING}{len(layout)}"] = {
                "dtype": "U8",
                "shape": [gap],
                "data_offsets": [offset, offset + gap],
            }
            layout.append(gap)
            offset += gap
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        layout.append(tensor)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)  # the data then starts aligned too
    with open(path, "wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        for item in layout:
            if isinstance(item, int):
                out.write(bytes(item))
            elif item.numel():
                out.write(item.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _fill(model: torch.nn.Module, folder: Path, manifest: dict[str, Any]) -> set[int]:
    """Rebuild the cached model in `model` (a skeleton of the same class, weights not initialised).
    Int8 layers become weight-only int8 layers over the tensors safetensors maps from the file (no
    copy; packing.py packs them for fbgemm afterwards). Returns the ids of the tensors it put in place."""
    from safetensors import safe_open

    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"format {manifest.get('format')}, expected {FORMAT_VERSION}")
    kinds: dict[str, str] = manifest["kinds"]
    for name in [n for n, k in kinds.items() if k == BF16_EMBEDDING]:
        model.get_submodule(name).__class__ = quantization.Bf16Embedding
    filled: set[int] = set()
    for shard in manifest["shards"]:
        with safe_open(str(folder / shard), framework="pt") as handle:
            keys = set(handle.keys())
            for key in sorted(keys):
                if key not in keys or key.startswith(PADDING):  # read with its layer already
                    continue
                owner = key.rpartition(".")[0]
                kind = kinds.get(owner)
                if kind == DYNAMIC_INT8:
                    names = [f"{owner}.{p}" for p in INT8_PARTS if f"{owner}.{p}" in keys]
                    keys -= set(names)
                    layer = quantization.weight_only_from_parts(
                        {n.rpartition(".")[2]: handle.get_tensor(n) for n in names}
                    )
                    _set_module(model, owner, layer)
                    filled |= {id(t) for t in layer.buffers()}
                elif kind == INT8_EMBEDDING:
                    rows, scales = handle.get_tensor(f"{owner}.rows"), handle.get_tensor(f"{owner}.scales")
                    keys -= {f"{owner}.rows", f"{owner}.scales"}
                    _set_module(model, owner, quantization.Int8Embedding(rows, scales))
                    filled |= {id(rows), id(scales)}
                else:
                    filled.add(id(_set_tensor(model, key, handle.get_tensor(key))))
    for alias, source in manifest["module_aliases"].items():
        _set_module(model, alias, model.get_submodule(source))
    for alias, source in manifest["tensor_aliases"].items():
        owner_name, _, attr = source.rpartition(".")
        _set_tensor(model, alias, getattr(model.get_submodule(owner_name), attr))
    return filled


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _set_tensor(model: torch.nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._buffers:
        owner._buffers[attr] = value
        return value
    if not isinstance(value, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=False)
    owner._parameters[attr] = value
    return value


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir()) if folder.is_dir() else 0


def _discard(entry: CacheEntry, why: str) -> None:
    log.warning("The weight cache %s %s: removing it and loading the checkpoint.", entry.path, why)
    shutil.rmtree(entry.path, ignore_errors=True)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
