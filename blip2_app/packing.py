"""Packing the dynamic-int8 layers for fbgemm, before serving or while serving.

The loader gives every dynamic-int8 Linear layer as a weight-only int8 layer over the same rows
and scales (mapped from the weight cache: nothing copied), which answers at once; packing them
for fbgemm (faster per caption) costs about 15 s of both cores at real size on every start, and
torch's serialisation cannot store packed weights (decision 0011). `LayerPacker` packs them one
by one and swaps each packed layer in where the weight-only one was: before `load_engine`
returns (`--packing startup`, and always for models too small for the wait to matter), or on
low-priority threads while the app already serves (`--packing background`): a request meanwhile
runs through whichever kind each layer is at that moment, both the same int8 rows.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from . import quantization
from .precisions import COMPONENT_MODULES, DYNAMIC_INT8, ComponentPrecisions

log = logging.getLogger(__name__)

# Below this many int8 bytes in all, packing takes well under a second (every tiny and demo
# model): it is done before serving, so results are final from the first request.
BACKGROUND_MIN_BYTES = 256 * 1024 * 1024
# Background packers run at this nice value, so that requests (niceness 0) get the cores first.
BACKGROUND_NICENESS = 10


@dataclass(frozen=True)
class _Slot:
    parent: torch.nn.Module
    name: str
    layer: quantization.WeightOnlyInt8Linear


def slots_to_pack(model: torch.nn.Module, precisions: ComponentPrecisions) -> list[_Slot]:
    """The weight-only layers of `model` that stand for dynamic-int8 ones (`precisions` being
    the requested ones): every WeightOnlyInt8Linear under a dynamic-int8 component."""
    slots = []
    for component, names in COMPONENT_MODULES.items():
        if getattr(precisions, component) != DYNAMIC_INT8:
            continue
        for name in names:
            part = getattr(model, name, None)
            if isinstance(part, quantization.WeightOnlyInt8Linear):  # a projection of the model's own
                slots.append(_Slot(model, name, part))
            if not isinstance(part, torch.nn.Module):
                continue
            for parent in part.modules():
                for child_name, child in parent.named_children():
                    if isinstance(child, quantization.WeightOnlyInt8Linear):
                        slots.append(_Slot(parent, child_name, child))
    return slots


class LayerPacker:
    """Packs the given layers (several models' at once; a layer two models share counts once)."""

    def __init__(self, slots: Iterable[_Slot]) -> None:
        unique: dict[int, _Slot] = {}
        for slot in slots:
            unique.setdefault(id(slot.layer), slot)
        # Emptied as layers are packed: a weight-only layer kept here would keep its int8 rows
        # (anonymous memory on a first start, 3.8 GB at real size) beside the packed copy.
        self.slots: list[_Slot | None] = list(unique.values())
        self.total = len(self.slots)
        self.bytes = sum(quantization.packed_bytes(s.layer) for s in unique.values())
        self.done = 0
        self.background = False
        self.seconds: float | None = None  # set when every layer is packed
        self.error: BaseException | None = None
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._indices = iter(range(self.total))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running = 0
        self._started = 0.0
        self._done = not self.slots
        if not self.slots:
            self.seconds = 0.0
            self._finished.set()

    # ------------------------------------------------------------------ running
    def pack_now(self, workers: int | None = None) -> None:
        """Pack everything on every core, returning when done (errors propagate)."""
        for thread in self._launch(workers, niceness=0):
            thread.join()
        if self.error is not None:
            raise self.error

    def start(self, workers: int | None = None) -> None:
        """Pack on background threads at BACKGROUND_NICENESS; returns at once. At interpreter exit
        (a CLI job done before packing is) the threads stop after their current layer: a thread
        left inside a packing call while Python shuts down aborts the process."""
        self.background = True
        if self._finished.is_set():
            return
        atexit.register(self.stop)
        self._launch(workers, BACKGROUND_NICENESS)

    def stop(self, timeout: float = 60.0) -> None:
        """Pack no further layer; wait for the ones being packed."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _launch(self, workers: int | None, niceness: int) -> list[threading.Thread]:
        self._started = time.perf_counter()
        count = min(self.total, workers or max(1, torch.get_num_threads()))
        self._running = count
        self._threads = [
            threading.Thread(target=self._work, args=(niceness,), name=f"int8-packer-{n}", daemon=True)
            for n in range(count)
        ]
        for thread in self._threads:
            thread.start()
        return self._threads

    def _work(self, niceness: int) -> None:
        _lower_priority(niceness)
        try:
            while not self._stop.is_set():
                with self._lock:
                    index = next(self._indices, None)
                if index is None:
                    break
                self._pack(index)
        except Exception as error:  # the layers not packed keep serving as weight-only int8
            self._stop.set()
            self.error = self.error or error
            log.exception("Packing the int8 layers stopped after %d of %d", self.done, self.total)
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        if self.done == self.total:
            self.seconds = time.perf_counter() - self._started
            log.info(
                "Packed %d int8 layers for %s in %.1fs",
                self.total,
                quantization.active_int8_kernels(),
                self.seconds,
            )
        with self._lock:
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:  # before `wait()` returns: callers see the caches emptied
            callback()
        self._finished.set()
        atexit.unregister(self.stop)

    def wait(self, timeout: float | None = None) -> bool:
        """Whether every layer is packed (waiting up to `timeout` seconds; None: until it is)."""
        return self._finished.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` once every layer is packed (or packing stopped): now if it is already.
        The engine empties its feature cache then: what was computed before is keyed apart
        (`LoadedModel.weights_final`) and would never be read again."""
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback()

    def _pack(self, index: int) -> None:
        slot = self.slots[index]
        assert slot is not None  # each index is handed out once
        packed = quantization.packed_from_weight_only(slot.layer)
        setattr(slot.parent, slot.name, packed)  # one attribute store: a forward pass sees either
        self.slots[index] = None
        with self._lock:
            self.done += 1

    # ------------------------------------------------------------------ reporting
    def status(self) -> dict[str, Any]:
        return {
            "layers": self.total,
            "packed": self.done,
            "background": self.background,
            "seconds": None if self.seconds is None else round(self.seconds, 1),
            "error": None if self.error is None else str(self.error),
        }


def _lower_priority(niceness: int) -> None:
    if niceness:
        try:  # Linux: a thread's own niceness (other systems: the process's, so skipped)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        except (AttributeError, OSError) as error:
            log.debug("Could not lower the packer's priority: %s", error)
