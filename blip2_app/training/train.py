"""Train the bundled shapes model end to end: `python -m blip2_app.training.train --config shapes-demo`.

Writes two checkpoints in transformers' BLIP-2 format, each with its processor, loadable by the
app's own loader: the captioning/VQA model (Blip2ForConditionalGeneration, OPT family) and its
retrieval twin (Blip2ForImageTextRetrieval). Both hold byte-identical vision weights (the frozen
encoder), so the app shares one encoder between them. Re-running the same command after an
interruption resumes from the work folder's checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from . import synthetic, vocab
from .config import TrainConfig
from .phases import (
    GenerativePretraining,
    LanguagePretraining,
    QFormerPretraining,
    VisionPretraining,
)
from .shapes_data import ShapesData, fill_pixels, new_rows, render_pixels
from .synthetic import Scene
from .trainer import PhaseOutcome, run_phase, save_atomically, use_threads

DEFAULT_OUT = Path("assets/models/blip2-shapes")
INFO_FILE = "training.json"
# In the work folder: the language model's scenes and the pictures of those the first process does
# not render itself, from the `--parallel` helper, read back by the first process for stage 2.
CAPTIONING_PICTURES = "captioning-pictures.pt"


def twin_folder(out_dir: Path) -> Path:
    """Where the retrieval twin of a captioning checkpoint lives: `<folder>-itm` beside it."""
    return out_dir.with_name(out_dir.name + "-itm")


def default_work_dir(config: TrainConfig) -> Path:
    return Path.home() / ".cache" / "blip2-studio" / "training" / f"{config.name}-seed{config.seed}"


@dataclass
class TrainReport:
    config: TrainConfig
    phases: dict[str, PhaseOutcome] = field(default_factory=dict)
    seconds: float = 0.0
    finished: bool = False
    out_dir: Path | None = None
    itm_dir: Path | None = None

    def as_dict(self) -> dict:
        return {
            "config": self.config.as_dict(),
            "seconds": round(self.seconds, 1),
            "finished": self.finished,
            "phases": {name: outcome.summary() for name, outcome in self.phases.items()},
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        }


# Long because it is the recipe read top to bottom: data, then each phase in its order, then the
# two exports; each phase's work lives in its class in phases.py.
def train(
    config: TrainConfig,
    out_dir: Path | None = DEFAULT_OUT,
    itm_dir: Path | None = None,
    work_dir: Path | None = None,
    progress: bool = True,
    stop_after: tuple[str, int] | None = None,
    parallel: bool = False,
    language_only: bool = False,
) -> TrainReport:
    """Run the four phases (skipping any a previous run finished in `work_dir`) and, when all are
    done and `out_dir` is given, write both checkpoints. `stop_after=(phase, step)` interrupts.

    The language model reads only scene codes and text, and stage 1 only the vision encoder, so
    with `parallel` (two cores) a second process trains the language model in `work_dir` while
    this one trains the vision encoder and stage 1; stage 2 then loads its checkpoint. Each phase
    seeds itself and runs on the thread counts of the config's schedule (a switch to more threads
    waits for the other process); a phase in micro-batches computes one at a time until the other
    process is done, then `config.workers` at once, which sums the same. So the weights equal
    those of one process. `language_only` is that process."""
    if (parallel or language_only) and work_dir is None:
        raise ValueError("A parallel run needs a work folder: the two processes meet there.")
    started = time.perf_counter()
    # The config's `threads` (one in shapes-demo, whose phases run in micro-batches of one thread
    # each) wherever two phases share the machine; a config may give a phase its own `threads` for
    # where it has the machine to itself: two threads ran stage 2 thirty times slower whenever
    # another process held a core (`--threads 1` on a busy machine). The Rust tokenizers' own
    # thread pool is kept out of the way for the same reason.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(config.threads)
    # Deterministic kernels where torch has them; warn (not fail) where it has none.
    torch.use_deterministic_algorithms(True, warn_only=True)
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    arch, seed = config.architecture, config.seed
    captioning, retrieval = vocab.processors(arch.image_size, arch.num_query_tokens, arch.question_aware)
    report = TrainReport(config)

    def build(
        classic_share: float, borrow: tuple[ShapesData, ShapesData] | None = None
    ) -> tuple[ShapesData, ShapesData]:
        return render_data(config, captioning.image_processor, classic_share, borrow)

    # Started first: on the other core the helper renders the pictures stage 2 needs that this
    # process does not render, then trains the language model.
    helper = _start_language_process(config, work_dir, progress) if parallel and work_dir else None

    def wait_for_helper() -> None:
        if helper is not None:
            _wait_for(helper)

    def workers() -> int:
        """Micro-batches at once: one while the two processes share the machine (in the helper,
        and here until the helper is done), then the config's."""
        if language_only or (helper is not None and helper.poll() is None):
            return 1
        return min(config.workers, available_cores())

    def run(name: str, phase, parameters) -> bool:
        stop = stop_after[1] if stop_after and stop_after[0] == name else None
        outcome = run_phase(
            name,
            phase,
            parameters,
            getattr(config, name),
            work_dir,
            progress,
            stop,
            threads=lambda step: config.threads_at(name, step),
            # With `parallel`, more threads only once the language model's process is done: two
            # processes asking for three cores made every step wait on a preempted thread.
            before_more_threads=wait_for_helper,
            workers=workers,
        )
        report.phases[name] = outcome
        if progress:
            print(f"{name}: {json.dumps(outcome.summary())}", file=sys.stderr)
        return outcome.finished

    def set_up(name: str) -> None:
        """A phase's set-up (seed, and the features some compute) on the threads of its step 0."""
        use_threads(config.threads_at(name, 0), wait_for_helper)
        torch.manual_seed(seed + TrainConfig.PHASES.index(name))  # vision: seed, language: seed + 1, ...

    def train_language(scenes: tuple[list[Scene], list[Scene]]) -> LanguagePretraining | None:
        set_up("language")
        language = LanguagePretraining(
            arch,
            *scenes,
            captioning.tokenizer,
            seed,
            config.prefix_fraction,
            config.lm_prefix,
            config.lm_caption_fraction,
            config.lm_questions_per_text,
            config.chat_fraction,
            config.lm_prompt_variety,
        )
        return language if run("language", language, list(language.parameters())) else None

    if language_only:
        # The language model reads scenes alone. Stage 2's pictures are the first process's
        # where the scene is the same (most of them in shapes-demo): render only the others,
        # and first, so they wait in the work folder long before stage 2 starts.
        captioning_scenes = scene_lists(config, config.data.captioning_share)
        if work_dir is not None and config.data.captioning_share != config.data.classic_share:
            _save_pictures(
                work_dir / CAPTIONING_PICTURES,
                config,
                captioning_scenes,
                scene_lists(config, config.data.classic_share),
                captioning.image_processor,
            )
        report.finished = train_language(captioning_scenes) is not None
        return _stopped(report, started)
    # The vision encoder's and stage 1's data; the language model's and stage 2's are the same
    # data when the classic shares are equal.
    same_share = config.data.classic_share == config.data.captioning_share
    train_data, val_data = build(config.data.classic_share)

    try:
        set_up("vision")
        vision = VisionPretraining(arch, train_data, val_data, seed)
        if not run("vision", vision, list(vision.parameters())):
            return _stopped(report, started)
        vision_state = vision.vision.state_dict()

        set_up("stage1")
        phrase_share = config.stage1_phrase_share
        stage1 = QFormerPretraining(
            arch,
            train_data,
            val_data,
            retrieval,
            vision_state,
            seed,
            phrase_share,
            config.attribute_queries,
            feature_workers=workers(),
        )
        if not run("stage1", stage1, stage1.trainable_parameters()):
            return _stopped(report, started)
        wait_for_helper()
    finally:
        if helper is not None and helper.poll() is None:  # stopped or failed here: stop it too
            helper.terminate()
    captioning_data = (
        (train_data, val_data)
        if same_share
        else _load_pictures(
            work_dir / CAPTIONING_PICTURES if work_dir else None, config, (train_data, val_data)
        )
        or build(config.data.captioning_share, borrow=(train_data, val_data))
    )
    # with `parallel`: the helper's finished checkpoint
    language = train_language((captioning_data[0].scenes, captioning_data[1].scenes))
    if language is None:
        return _stopped(report, started)
    captioning_train, captioning_val = captioning_data

    set_up("stage2")
    stage2 = GenerativePretraining(
        arch,
        captioning_train,
        captioning_val,
        captioning,
        retrieval.tokenizer,
        vision_state,
        stage1.model.qformer.state_dict(),
        stage1.model.query_tokens.data,
        language.lm.state_dict(),
        seed,
        config.caption_fraction,
        config.lm_prefix,
        config.code_loss_weight,
        stage1.model.embeddings.state_dict(),
        config.chat_fraction,
        config.prompt_variety,
        feature_workers=workers(),
    )
    if not run("stage2", stage2, stage2.trainable_parameters()):
        return _stopped(report, started)

    report.finished = True
    report.seconds = time.perf_counter() - started
    if out_dir is not None:
        itm_dir = itm_dir or twin_folder(out_dir)
        info = report.as_dict()
        _export(stage2.model, captioning, out_dir, info)
        _export(stage1.model, retrieval, itm_dir, info)
        report.out_dir, report.itm_dir = out_dir, itm_dir
    return report


def render_data(
    config: TrainConfig,
    image_processor,
    classic_share: float,
    borrow: tuple[ShapesData, ShapesData] | None = None,
) -> tuple[ShapesData, ShapesData]:
    """A phase's (train, val) data; validation captions are unique so retrieval on them is well
    defined. Pictures of `borrow`'s (train, val) whose scene is the same are not rendered again."""
    arch = config.architecture
    grid = arch.image_size // arch.patch_size
    train_split, val_split = (
        ShapesData.rendered(scenes, image_processor, grid, borrow[index] if borrow else None)
        for index, scenes in enumerate(scene_lists(config, classic_share))
    )
    return train_split, val_split


def scene_lists(config: TrainConfig, classic_share: float) -> tuple[list[Scene], list[Scene]]:
    """The (train, val) scenes `render_data` renders (`data.style` is never "paint": DataConfig)."""
    train_scenes, val_scenes = (
        synthetic.generate_split(
            config.seed,
            split,
            size,
            unique_captions=split != "train",
            style=config.data.style,
            classic_share=classic_share,
        )
        for split, size in _splits(config)
    )
    return train_scenes, val_scenes


def _splits(config: TrainConfig) -> tuple[tuple[str, int], tuple[str, int]]:
    return ("train", config.data.train_images), ("val", config.data.val_images)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _start_language_process(config: TrainConfig, work_dir: Path, progress: bool) -> subprocess.Popen:
    """`python -m blip2_app.training.train --language-only` on this config, in `work_dir`."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config_file = work_dir / "parallel-config.json"
    config_file.write_text(json.dumps(config.as_dict(), indent=2) + "\n")
    command = [sys.executable, "-m", "blip2_app.training.train", "--config", str(config_file)]
    command += ["--work-dir", str(work_dir), "--language-only", "--keep-work"]
    return subprocess.Popen(command if progress else [*command, "--no-progress"])


def _data_key(config: TrainConfig) -> dict:
    """What the rendered data depends on: the data section, the seed, the image size and the patch
    grid its patch labels are counted on."""
    arch = config.architecture
    return {
        "data": dataclasses.asdict(config.data),
        "seed": config.seed,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
    }


def _save_pictures(
    path: Path,
    config: TrainConfig,
    scenes: tuple[list[Scene], list[Scene]],
    known: tuple[list[Scene], list[Scene]],
    image_processor,
) -> None:
    """(train, val) `scenes`, and the pictures of those not at the same index of `known`."""
    splits = []
    for wanted, have in zip(scenes, known, strict=True):
        rows = new_rows(wanted, have)
        splits.append(
            {
                "scenes": wanted,
                "rows": rows,
                "pixels": render_pixels([wanted[i] for i in rows], image_processor),
            }
        )
    save_atomically(path, {"key": _data_key(config), "splits": splits})


def _load_pictures(
    path: Path | None, config: TrainConfig, borrow: tuple[ShapesData, ShapesData]
) -> tuple[ShapesData, ShapesData] | None:
    """The helper's (train, val) data, its pictures completed from `borrow`'s, when it was rendered
    for this config's data section and against `borrow`'s scenes; else None."""
    if path is None or not path.exists():
        return None
    saved = torch.load(path, weights_only=False)
    if saved["key"] != _data_key(config):
        return None
    grid = config.architecture.image_size // config.architecture.patch_size
    data = []
    for split, known in zip(saved["splits"], borrow, strict=True):
        scenes, rows = split["scenes"], split["rows"]
        if rows != new_rows(scenes, known.scenes):
            return None
        data.append(
            ShapesData.from_scenes(scenes, fill_pixels(len(scenes), rows, split["pixels"], known), grid)
        )
    return data[0], data[1]


def _wait_for(helper: subprocess.Popen) -> None:
    if helper.wait() != 0:
        raise RuntimeError(
            f"The language model's process (--parallel) failed with exit status {helper.returncode}; "
            "run the same command again: finished phases are kept in the work folder."
        )


def _stopped(report: TrainReport, started: float) -> TrainReport:
    report.seconds = time.perf_counter() - started
    return report


def _export(model, processor, folder: Path, info: dict) -> None:
    """save_pretrained (safetensors) + the processor, into a fresh folder swapped in at the end."""
    scratch = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    model.eval()
    model.save_pretrained(scratch)
    # Training's batched calls leave padding and truncation set on the Rust tokenizer, which
    # tokenizer.json would keep as defaults; the shipped file holds the vocabulary alone.
    for tokenizer in (processor.tokenizer, getattr(processor, "qformer_tokenizer", None)):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.no_padding()
            backend.no_truncation()
    processor.save_pretrained(scratch)
    (scratch / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    for path in scratch.iterdir():  # safetensors writes 0600; the app may run as another user
        path.chmod(0o644)
    if folder.exists():
        shutil.rmtree(folder)
    scratch.rename(folder)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_app.training.train", description="Train the bundled BLIP-2 shapes model."
    )
    parser.add_argument("--config", default="shapes-demo", help="config name (training/configs) or JSON path")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"captioning checkpoint folder [{DEFAULT_OUT}]"
    )
    parser.add_argument("--itm-out", type=Path, help="retrieval twin folder [<out>-itm]")
    parser.add_argument(
        "--work-dir", type=Path, help="resumable checkpoints [~/.cache/blip2-studio/training/...]"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore checkpoints of an earlier run")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder after success")
    parser.add_argument("--seed", type=int, help="override the config's seed")
    parser.add_argument("--threads", type=int, help="override the config's PyTorch thread count")
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="train the language model in a second process beside the vision encoder and stage 1 "
        "(two cores; the same weights as one process)",
    )
    parser.add_argument("--language-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = TrainConfig.load(args.config)
    if args.seed is not None:
        config = config.replace(seed=args.seed)
    if args.threads is not None:
        config = config.with_threads(args.threads)
    work_dir = args.work_dir or default_work_dir(config)
    if args.fresh:
        shutil.rmtree(work_dir, ignore_errors=True)
    report = train(
        config,
        None if args.language_only else args.out,
        args.itm_out,
        work_dir,
        progress=not args.no_progress,
        parallel=args.parallel,
        language_only=args.language_only,
    )
    print(json.dumps(report.as_dict()["phases"], indent=2))
    if args.language_only:
        return 0 if report.finished else 1
    print(f"Trained in {report.seconds / 60:.1f} min; wrote {report.out_dir} and {report.itm_dir}.")
    if not args.keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
