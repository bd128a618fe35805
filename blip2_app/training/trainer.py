"""One optimisation loop for every phase: AdamW, warm-up + cosine schedule, gradient clipping,
a progress bar, and checkpoints a run resumes from.

A checkpoint holds the phase's modules, the optimizer, the step and the losses so far. Because
each step's batch depends only on (seed, phase, step) and nothing else is random, a resumed run
continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .config import PhaseConfig

CLIP_NORM = 1.0


@dataclass
class PhaseOutcome:
    name: str
    steps_done: int
    finished: bool
    losses: list[float] = field(default_factory=list)
    validation: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        tail = self.losses[-50:]
        return {
            "steps": self.steps_done,
            "seconds": round(self.seconds, 1),
            "first_loss": round(self.losses[0], 4) if self.losses else None,
            "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
            "validation": {k: round(v, 4) for k, v in self.validation.items()},
        }


def learning_rate(config: PhaseConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def use_threads(count: int, before_more: Callable[[], None] | None = None) -> None:
    if count == torch.get_num_threads():
        return
    if count > torch.get_num_threads() and before_more is not None:
        before_more()
    torch.set_num_threads(count)


def save_atomically(path: Path, payload: dict) -> None:
    """Write-then-rename: an interrupted save never leaves a half-written checkpoint behind."""
    scratch = path.with_name(path.name + ".tmp")
    torch.save(payload, scratch)
    os.replace(scratch, path)


class Phase(Protocol):
    """What `run_phase` drives: the phase classes of `phases.py` (torch modules with these two)."""

    def step(self, step: int, batch_size: int) -> Any: ...

    # With `PhaseConfig.micro_batches` > 1 also `parts(step, batch_size, count)`: the step's
    # micro-batches, each a callable returning its share of the loss (`phases.Part`).

    def validate(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


def run_phase(
    name: str,
    phase: Phase,
    parameters: Sequence[torch.nn.Parameter],
    config: PhaseConfig,
    work_dir: Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    threads: Callable[[int], int] | None = None,
    before_more_threads: Callable[[], None] | None = None,
    workers: Callable[[], int] | None = None,
) -> PhaseOutcome:
    """Train `phase` (which has `step(step, batch_size)` and `validate()`) for `config.steps` steps.

    With `work_dir`, resumes from `<work_dir>/<name>.pt` and saves there every
    `config.checkpoint_every` steps and at the end. `stop_after` ends the run early at that step
    (as an interruption would), leaving a checkpoint to resume from. `threads(step)` is the
    PyTorch thread count of each step; `before_more_threads` runs before a step that raises it
    (the parallel run waits there for its other process to free the second core). `workers()`:
    how many of a step's micro-batches may run at once now (one when None); the weights do not
    depend on it, so the parallel run raises it as soon as its other process is done."""
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    checkpoint = work_dir / f"{name}.pt" if work_dir is not None else None
    outcome = PhaseOutcome(name, 0, False)
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        phase.load_state_dict(saved["state"])
        optimizer.load_state_dict(saved["optimizer"])
        outcome = PhaseOutcome(
            name, saved["step"], saved["finished"], saved["losses"], saved["validation"], saved["seconds"]
        )
        if outcome.finished:
            return outcome

    def save() -> None:
        if checkpoint is not None:
            payload = {
                "state": phase.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": outcome.steps_done,
                "finished": outcome.finished,
                "losses": outcome.losses,
                "validation": outcome.validation,
                "seconds": outcome.seconds,
            }
            save_atomically(checkpoint, payload)

    phase.train()
    pools: dict[int, ThreadPoolExecutor] = {}  # by size: at most `workers()` parts at once
    started = time.perf_counter() - outcome.seconds
    bar = tqdm(
        total=config.steps, initial=outcome.steps_done, desc=name, disable=not progress, mininterval=2.0
    )
    for step in range(outcome.steps_done, config.steps):
        if stop_after is not None and step >= stop_after:
            break
        if threads is not None:
            use_threads(threads(step), before_more_threads)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        if config.micro_batches > 1:
            parts = phase.parts(step, config.batch_size, config.micro_batches)  # type: ignore[attr-defined]
        else:
            parts = [functools.partial(phase.step, step, config.batch_size)]
        at_once = min(len(parts), workers() if workers is not None else 1)
        if at_once > 1 and at_once not in pools:
            pools[at_once] = ThreadPoolExecutor(at_once)
        pool = pools.get(at_once)
        loss, logs = accumulate_gradients(parts, parameters, pool)
        torch.nn.utils.clip_grad_norm_(parameters, CLIP_NORM)
        optimizer.step()
        outcome.losses.append(loss)
        outcome.steps_done = step + 1
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4f}", **{k: f"{v:.3f}" for k, v in logs.items()})
        if (step + 1) % config.checkpoint_every == 0:
            outcome.seconds = time.perf_counter() - started
            save()
    bar.close()
    for pool in pools.values():
        pool.shutdown()
    phase.eval()
    outcome.finished = outcome.steps_done >= config.steps
    if outcome.finished:
        outcome.validation = phase.validate()
    outcome.seconds = time.perf_counter() - started
    save()
    return outcome


def accumulate_gradients(
    parts: Sequence[Callable[[], Any]],
    parameters: Sequence[torch.nn.Parameter],
    pool: ThreadPoolExecutor | None,
) -> tuple[float, dict[str, float]]:
    """Run each part (a `phases.StepResult` of its share of the loss) and set each parameter's
    `.grad` to the sum of the parts' gradients, added in the parts' order: the same bits whether
    `pool` ran them side by side (each on one PyTorch thread) or they ran here one after another.
    Returns the step's loss and logs, summed over the parts."""

    def run(part: Callable[[], Any]) -> tuple[Any, tuple[torch.Tensor | None, ...]]:
        result = part()
        return result, torch.autograd.grad(result.loss, parameters, allow_unused=True)

    done = list(pool.map(run, parts)) if pool is not None and len(parts) > 1 else [run(p) for p in parts]
    for index, parameter in enumerate(parameters):
        total = None
        for _, grads in done:
            grad = grads[index]
            if grad is not None:
                total = grad if total is None else total + grad
        parameter.grad = total
    logs: dict[str, float] = {}
    for result, _ in done:
        for key, value in result.logs.items():
            logs[key] = logs.get(key, 0.0) + value
    return sum(result.loss.item() for result, _ in done), logs
