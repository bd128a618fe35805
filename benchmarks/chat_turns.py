"""Chat turn 1 and turn 2, with and without reusing the chat's prefix (issue 20, point 3).

    python benchmarks/chat_turns.py --model /work/bench/real-size/blip2-opt-2.7b-random --precision dynamic-int8
    python benchmarks/chat_turns.py --model tiny-random --out /tmp/chat-turns   # checks the script works

One process, one loaded model, both ways side by side: each repeat runs turn 1 (vision encoder
included: its feature cache is emptied first, as for a new photo) and turn 2 (the question after
turn 1's own answer; the image features are cached, as in the app) without reuse, then the same
two turns with a fresh chat prefix slot, which turn 2 reuses. Each answer is forced to 10 new
tokens (min_new_tokens = max_new_tokens, greedy), so random weights cannot change the work done.

`--answers natural` (the default) makes each answer a fixed English sentence, as a trained model
writes: a hook on the language model's output puts all the weight on the sentence's next token
(the forward pass itself is unchanged). Random weights otherwise write token runs that the
tokenizer reads back differently when they return as history text, which stops prefix reuse at
the first answer; a trained model's answers read back to their own ids. `--answers model` keeps
the model's own (random) tokens. Also recorded: the positions turn 2 prefills, the prefill's own seconds (its forward pass), the
bytes the kept prefix holds, and whether both ways wrote the same tokens. Writes
<out>/chat_turns.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENS = 10
QUESTIONS = ("what is in the image?", "what colour is it?")
# What a trained model might answer (each at least TOKENS tokens long for OPT's tokenizer).
NATURAL_ANSWERS = (
    "an astronaut in a white space suit standing in front of a flag on a launch pad",
    "white, with a blue and red flag on the left side of the picture behind him",
)
# `--exemplars N`: the first N of these go before every turn, as the Chat tab's few-shot table
# sends them (examples about other photos, written by the visitor).
EXEMPLARS = (
    ("what is the man holding?", "a red umbrella in his left hand"),
    ("where was this photo taken?", "on a sandy beach at sunset, with boats far out at sea"),
    ("how many dogs are in the picture?", "two, a brown one and a small white one"),
)
MODES = ("no_reuse", "reuse")
ANSWER_KINDS = {
    "natural": "a fixed English sentence, as a trained model writes",
    "model": "the model's own tokens",
}


def forced(engine):
    return engine.default_generation().replace(
        decoding="greedy",
        max_new_tokens=TOKENS,
        min_new_tokens=TOKENS,
        no_repeat_ngram_size=0,
        num_captions=1,
    )


class ForwardClock:
    """Start time and length of every forward pass of the language model."""

    def __init__(self, language_model):
        self.passes: list[tuple[float, int]] = []
        self.handle = language_model.register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs) -> None:
        tensor = kwargs.get("inputs_embeds")
        tensor = tensor if tensor is not None else kwargs.get("input_ids")
        self.passes.append((time.perf_counter(), int(tensor.shape[1])))

    def prefill(self) -> tuple[int, float]:
        """Positions of the first pass since the last reset and its seconds (to the second pass)."""
        (start, length), (after, _) = self.passes[0], self.passes[1]
        return length, after - start


class ScriptedAnswer:
    """Makes greedy decoding write `ids` (one per forward pass since the last `start`): the
    language model's logits at the last position are replaced by a one-hot of the next id."""

    def __init__(self, language_model):
        self.ids: list[int] = []
        self.step = 0
        self.handle = language_model.register_forward_hook(self._steer, with_kwargs=True)

    def start(self, ids: list[int]) -> None:
        self.ids, self.step = ids, 0

    def _steer(self, module, args, kwargs, output) -> None:
        if self.step < len(self.ids):
            logits = output.logits[:, -1, :]
            logits.fill_(-1e4)
            logits[:, self.ids[self.step]] = 1e4
        self.step += 1


def natural_ids(engine) -> list[list[int]]:
    """The first TOKENS ids of each natural answer, as the tokenizer reads it after 'Answer:'."""
    tokenizer = engine.text.tokenizer
    scripts = [
        tokenizer(" " + answer, add_special_tokens=False).input_ids[:TOKENS] for answer in NATURAL_ANSWERS
    ]
    assert all(len(ids) == TOKENS for ids in scripts), "each natural answer needs TOKENS tokens"
    return scripts


def one_chat(engine, image, prefix, answers: str = "natural", exemplars: int = 0) -> dict:
    """Turn 1 then turn 2 (after turn 1's own answer): seconds, turn 2's prefill, the answers."""
    from blip2_app.prompts import ChatTurn

    examples = [ChatTurn(q, a) for q, a in EXEMPLARS[:exemplars]]
    generation = forced(engine)
    language_model = engine.text.loaded.model.language_model
    clock = ForwardClock(language_model)
    script = ScriptedAnswer(language_model) if answers == "natural" else None
    scripts = natural_ids(engine) if script is not None else []
    result: dict = {}
    history: list = []
    try:
        engine.cache.clear()  # turn 1 is a new photo: the vision encoder runs
        for number, question in enumerate(QUESTIONS, start=1):
            clock.passes.clear()
            if script is not None:
                script.start(scripts[number - 1])
            started = time.perf_counter()
            events = list(
                engine.chat_stream(image, question, history, examples, generation=generation, prefix=prefix)
            )
            result[f"turn{number}_s"] = time.perf_counter() - started
            positions, seconds = clock.prefill()
            result[f"turn{number}_prefill_positions"] = positions
            result[f"turn{number}_prefill_s"] = seconds
            result[f"turn{number}_answer"] = events[-1].text
            history.append(ChatTurn(question, events[-1].text))
    finally:
        clock.handle.remove()
        if script is not None:
            script.handle.remove()
    result["kept_prefix_bytes"] = prefix.held.nbytes if prefix is not None and prefix.held else 0
    return result


def run(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from blip2_app.chat_prefix import PrefixBudget
    from blip2_app.config import Settings
    from blip2_app.startup import load_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    engine = load_engine(
        Settings(
            model=args.model,
            retrieval_model="none",
            precision=args.precision,
            int8_kernels=args.int8_kernels,
            packing="startup",  # steady-state timings: every layer packed before the first
        )
    )
    load_s = time.perf_counter() - started
    photo = sorted((ROOT / "assets" / "examples").glob("*.*"))[0]
    image = engine.prepare(str(photo))[0]
    budget = PrefixBudget(2**40)  # no eviction here: one chat at a time

    for mode in MODES:  # warm-up: first calls of each shape pick kernels and grow the allocator
        one_chat(engine, image, budget.slot() if mode == "reuse" else None, args.answers, args.exemplars)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):  # alternating, so a change in the machine's load hits both
        for mode in MODES:
            slot = budget.slot() if mode == "reuse" else None
            runs[mode].append(one_chat(engine, image, slot, args.answers, args.exemplars))

    summary: dict = {}
    for mode, results in runs.items():
        row: dict = {}
        for key in results[0]:
            values = [r[key] for r in results]
            if key.endswith("_s"):
                row[key] = round(statistics.median(values), 3)
            elif key.endswith(("_positions", "_bytes")):
                row[key] = int(statistics.median(values))
        summary[mode] = row
    same = all(
        a[f"turn{n}_answer"] == b[f"turn{n}_answer"]
        for a, b in zip(runs["no_reuse"], runs["reuse"], strict=True)
        for n in (1, 2)
    )
    return {
        "model": args.model,
        "precision": args.precision,
        "int8_kernels": engine.text.loaded.int8_kernels,
        "device": engine.text.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(),
        "load_avg": round(os.getloadavg()[0], 2),
        "repeats": args.repeats,
        "new_tokens_per_turn": TOKENS,
        "answers": args.answers,
        "exemplars": args.exemplars,
        "load_s": round(load_s, 1),
        "same_answers": same,
        "results": summary,
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = f"chat_turns_{results['exemplars']}shot" if results.get("exemplars") else "chat_turns"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        "| | turn 1 s | turn 2 s | turn 2 prefill positions | turn 2 prefill s | kept prefix MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        r = results["results"][mode]
        rows.append(
            f"| {mode.replace('_', ' ')} | {r['turn1_s']:.2f} | {r['turn2_s']:.2f} | "
            f"{r['turn2_prefill_positions']} | {r['turn2_prefill_s']:.3f} | {r['kept_prefix_bytes'] / 2**20:.1f} |"
        )
    plain, reuse = results["results"]["no_reuse"], results["results"]["reuse"]
    text = "\n".join(
        [
            "# Chat turns with and without prefix reuse",
            "",
            f"`python benchmarks/chat_turns.py --model {results['model']} --precision {results['precision']} "
            f"--answers {results['answers']} --exemplars {results.get('exemplars', 0)}`, "
            f"{results['measured_at']}: {results['device']}, {results['threads']} threads, torch "
            f"{results['torch']}, transformers {results['transformers']}, load average "
            f"{results['load_avg']} at the end. Medians of {results['repeats']} runs of each, alternating; "
            f"{results['new_tokens_per_turn']} new tokens forced per turn (greedy; answers: "
            f"{ANSWER_KINDS[results['answers']]}); {results.get('exemplars', 0)} few-shot examples before "
            "each turn; turn 1 runs the vision encoder, turn 2 reads its cached features.",
            "",
            *rows,
            "",
            f"With reuse, turn 2 is {reuse['turn1_s'] - reuse['turn2_s']:.2f} s faster than turn 1 "
            f"(without: {plain['turn1_s'] - plain['turn2_s']:.2f} s). "
            f"Turn 2 saves {plain['turn2_s'] - reuse['turn2_s']:.2f} s with reuse "
            f"({plain['turn2_prefill_positions']} -> {reuse['turn2_prefill_positions']} positions prefilled). "
            f"Same greedy answers both ways: {'yes' if results['same_answers'] else 'no'}.",
            "",
        ]
    )
    (out / f"{name}.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (or a registry name)")
    parser.add_argument("--precision", default="auto", help="as the app's --precision [auto]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8-kernels", default="fbgemm", help="as the app's --int8-kernels [fbgemm]")
    parser.add_argument(
        "--answers", choices=sorted(ANSWER_KINDS), default="natural", help="what each answer's tokens are"
    )
    parser.add_argument(
        "--exemplars",
        type=int,
        choices=range(len(EXEMPLARS) + 1),
        default=0,
        help="few-shot examples before each turn, as the Chat tab sends them (writes chat_turns_Nshot.*)",
    )
    parser.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: its choice)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    results = run(args)
    write(results, Path(args.out))
    print(json.dumps(results["results"], indent=2), "\nsame answers:", results["same_answers"])


if __name__ == "__main__":
    main()
