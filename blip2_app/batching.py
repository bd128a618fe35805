"""Caption and answer requests that arrive together run as one engine batch.

Decoding is bound by reading the weights, so a batch of 8 costs little more per token than a
batch of 1; serving visitors one at a time wasted that (issue 20: eight concurrent captions took
8.9x one alone).

Why this small batcher and not Gradio's `batch=True`: Gradio runs a batch as one event, so an
exception from the batch function, or from Gradio's own preprocessing of any one request in it
(a Radio value it does not offer, a slider out of bounds, a forged file payload), is sent to every
request of the batch; its per-request `validator` runs before the queue and answers 422 with a
`ValidationError`, not the `AppError` sentence the API promises; and it never waits for a batch to
fill. Here each request stays a Gradio event of its own (request guards, fair share, `@gpu`
booking, validation and its own error sentence all as before), and only the engine call is shared:
the first request to arrive leads, waits for others while they keep coming (BatchLimits),
runs each group of compatible requests as one engine call, and hands every waiting request its own
result or its own error. A group whose call fails is run again one request at a time, so a bad
request fails alone. Requests that arrive while a batch runs wait for the next one.

Compatible means the same decoding settings (those `generate` receives); prompts may differ (left padding keeps each row's
result equal to its own: tests/test_parity.py). Sampled requests, and every request of a model
whose batched rows depend on each other (`exact_batches`), call the engine directly, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .engine import Engine, Generated, PreparedImage
from .generation import GenerationSettings
from .precisions import COMPONENTS

log = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchLimits:
    max_size: int = 8  # requests in one engine call at most; 1: one at a time
    # A batch starts once no request has joined it for `wait_s`, and at the latest `max_wait_s`
    # after its leader began to wait: visitors who click together reach the batcher spread over a
    # few hundred milliseconds (each uploads its photo first), with gaps of up to ~50 ms at real
    # size, so a fixed 30 ms wait split eight of them 6+2 (docs/performance.md).
    wait_s: float = 0.1
    max_wait_s: float = 0.5

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError(f"max_size must be at least 1; got {self.max_size}.")
        if not 0 <= self.wait_s <= 10:  # also refuses NaN
            raise ValueError(f"wait_s must be from 0 to 10 seconds; got {self.wait_s}.")
        if not self.wait_s <= self.max_wait_s <= 10:
            raise ValueError(f"max_wait_s must be from wait_s to 10 seconds; got {self.max_wait_s}.")


class _Slot(Generic[J, R]):
    """One waiting request: its job, then its result or its error."""

    def __init__(self, job: J, arrived: float):
        self.job = job
        self.arrived = arrived
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None

    def finish(self, result: R | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True


class Batcher(Generic[J, R]):
    """Jobs submitted from several threads at about the same time run together.

    `run(jobs)` returns one result per job, in order; `key(job)` says which jobs may share a call
    (equal keys). No thread of its own: a waiting request's thread runs the batch (the leader),
    the others sleep until their slot is filled, and take the lead in turn if theirs was not in it.
    """

    def __init__(
        self,
        run: Callable[[list[J]], list[R]],
        key: Callable[[J], Hashable],
        limits: BatchLimits,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.run = run
        self.key = key
        self.limits = limits
        self.clock = clock
        self._changed = threading.Condition()
        self._waiting: list[_Slot[J, R]] = []
        self._leading = False
        # (requests, engine calls) of the latest batches, for tests and diagnostics (bounded).
        self.history: deque[tuple[int, int]] = deque(maxlen=100)

    def submit(self, job: J) -> R:
        """`job`'s result, or its error raised here, once its batch has run."""
        slot: _Slot[J, R] = _Slot(job, self.clock())
        with self._changed:
            self._waiting.append(slot)
            self._changed.notify_all()  # a leader waiting for a full batch counts this one
        while True:
            with self._changed:
                while not slot.done and self._leading:
                    self._changed.wait()
                if slot.done:
                    break
                self._leading = True
            try:
                self._lead()
            finally:
                with self._changed:
                    self._leading = False
                    self._changed.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]  # set with done and no error

    def _lead(self) -> None:
        batch = self._collect()
        started = self.clock()
        groups: dict[Hashable, list[_Slot[J, R]]] = {}
        for slot in batch:
            groups.setdefault(self.key(slot.job), []).append(slot)
        try:
            for group in groups.values():
                self._run(group)
        finally:  # even a KeyboardInterrupt must not leave a follower asleep forever
            for slot in batch:
                if not slot.done:
                    slot.finish(error=RuntimeError("The batch this request was in did not run."))
        self.history.append((len(batch), len(groups)))
        if len(batch) > 1:
            arrivals = [slot.arrived for slot in batch]
            log.info(
                "Ran %d requests as %d engine call(s); they arrived over %.0f ms, the batch started "
                "%.0f ms after the first.",
                len(batch),
                len(groups),
                (max(arrivals) - min(arrivals)) * 1000,
                (started - min(arrivals)) * 1000,
            )

    def _collect(self) -> list[_Slot[J, R]]:
        """The oldest waiting requests, once `max_size` wait, or none has arrived for `wait_s`, or
        `max_wait_s` has passed. Requests that queued behind the previous batch start at once."""
        latest = self.clock() + self.limits.max_wait_s
        with self._changed:
            while len(self._waiting) < self.limits.max_size:
                quiet_until = self._waiting[-1].arrived + self.limits.wait_s if self._waiting else 0.0
                left = min(quiet_until, latest) - self.clock()
                if left <= 0:
                    break
                self._changed.wait(left)
            batch = self._waiting[: self.limits.max_size]
            del self._waiting[: len(batch)]
        return batch

    def _run(self, group: list[_Slot[J, R]]) -> None:
        try:
            results = self.run([slot.job for slot in group])
        except Exception as error:
            if len(group) == 1:
                group[0].finish(error=error)
                return
            # One bad request must not fail its batch-mates: each runs alone and gets its own
            # result or error (the handlers validate before submitting, so this is rare).
            log.info("A batch of %d failed (%s); running its requests one at a time.", len(group), error)
            for slot in group:
                self._run([slot])
            return
        for slot, result in zip(group, results, strict=True):
            slot.finish(result=result)


# ----------------------------------------------------------------------------- the engine's jobs
@dataclass(frozen=True)
class TextJob:
    """One caption or answer request, validated: its image, its prompt and its decoding."""

    image: PreparedImage
    prompt: str
    generation: GenerationSettings
    clean: bool  # an answer: cleaned as the engine cleans answers (captions are kept as written)


def exact_batches(engine: Engine) -> bool:
    """Whether a batch gives each request the tokens it would get alone: a model in this process
    (a vLLM server batches on its own) with no batch-dependent precision."""
    loaded = engine.text.loaded if engine.text is not None else None
    if loaded is None:
        return False
    return not loaded.batch_dependent(*COMPONENTS)


class TextBatcher:
    """Caption and answer requests of all sessions, batched on one engine (one per app). Where
    batching is off, or cannot keep results equal (see `exact_batches`; sampling), a request
    calls the engine directly, exactly as before batching existed."""

    def __init__(self, engine: Engine, limits: BatchLimits, batch_quantized: bool = False):
        self.engine = engine
        in_process = engine.text is not None and engine.text.loaded is not None
        self.batches = limits.max_size > 1 and in_process and (batch_quantized or exact_batches(engine))
        self.batcher: Batcher[TextJob, list[Generated]] = Batcher(self._run, self._key, limits)

    @classmethod
    def one_at_a_time(cls, engine: Engine) -> TextBatcher:
        """No batching: handlers built without an app (tests, scripts)."""
        return cls(engine, BatchLimits(max_size=1, wait_s=0))

    def caption(
        self, image: PreparedImage, style: str, prompt: str | None, generation: GenerationSettings
    ) -> list[Generated]:
        """`Engine.caption` for one image, batched with whatever else is waiting."""
        if not self._batched(generation):
            return self.engine.caption([image], style, prompt, generation)[0]
        return self._submit(TextJob(image, self.engine.caption_text(style, prompt), generation, clean=False))

    def answer(
        self,
        image: PreparedImage,
        question: str,
        generation: GenerationSettings,
        short: bool,
        instruction: str,
    ) -> Generated:
        """`Engine.answer`, batched with whatever else is waiting."""
        if not self._batched(generation):
            return self.engine.answer(image, question, generation, short=short, instruction=instruction)
        text = self.engine.answer_text(question, short=short, instruction=instruction)
        return self._submit(TextJob(image, text, generation.replace(num_captions=1), clean=True))[0]

    def _batched(self, generation: GenerationSettings) -> bool:
        # Sampling draws every row from one random stream: a batch would change each answer.
        return self.batches and generation.decoding != "nucleus"

    def _submit(self, job: TextJob) -> list[Generated]:
        self.engine.check_prompt(job.prompt, job.generation)  # too long: refused here, alone
        return self.batcher.submit(job)

    @staticmethod
    def _key(job: TextJob) -> Hashable:
        # What reaches `generate`, so knobs a decoding ignores (a seed or a top_p with greedy
        # search) do not split a batch; the prompts of one call may differ.
        return tuple(sorted(job.generation.generate_kwargs().items()))

    def _run(self, jobs: list[TextJob]) -> list[list[Generated]]:
        images, prompts = [job.image for job in jobs], [job.prompt for job in jobs]
        return self.engine.complete(images, prompts, jobs[0].generation, [job.clean for job in jobs])
