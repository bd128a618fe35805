"""The trainer on a tiny config (seconds), the exported checkpoints through the app's loader, the
evaluate command, and the bundled shapes model (skipped only when its folder does not exist)."""

import dataclasses
import functools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from blip2_app.config import Settings
from blip2_app.loading import auto_vision_precision
from blip2_app.prompts import ChatTurn, chat_prompt
from blip2_app.registry import Registry
from blip2_app.startup import load_engine
from blip2_app.training import architecture, synthetic, vocab
from blip2_app.training import evaluate as evaluate_module
from blip2_app.training.config import ArchitectureConfig, PhaseConfig, TrainConfig
from blip2_app.training.phases import (
    IGNORE,
    INSTRUCTIONS,
    GenerativePretraining,
    LanguagePretraining,
    SceneCode,
    StepResult,
    code_embeddings,
    sample_prompt,
    varied_prompt,
)
from blip2_app.training.train import CAPTIONING_PICTURES, train, twin_folder
from blip2_app.training.trainer import accumulate_gradients, run_phase

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "assets" / "models" / "blip2-shapes"
# Two runs of one seed on one machine and thread count give bit-identical weights; across
# machines / BLAS builds float summation order may differ, hence a tolerance, not equality.
REPRODUCE_ATOL = 1e-5


@pytest.fixture(scope="module")
def smoke_config():
    return TrainConfig.load("smoke")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, smoke_config):
    folder = tmp_path_factory.mktemp("smoke")
    report = train(smoke_config, folder / "model", work_dir=folder / "work", progress=False)
    return report


def test_configs_are_validated():
    config = TrainConfig.load("shapes-demo")
    assert config.architecture.question_aware and config.architecture.num_query_tokens == 13
    assert config.lm_prefix == "scene"
    with pytest.raises(ValueError, match="question_aware needs"):
        TrainConfig.from_dict({"name": "x", "lm_prefix": "scene", "architecture": {"question_aware": True}})
    with pytest.raises(ValueError, match="multiple of 3"):
        TrainConfig.from_dict({"name": "x", "lm_prefix": "slots", "architecture": {"num_query_tokens": 4}})
    with pytest.raises(ValueError, match="code_loss_weight needs"):
        TrainConfig.from_dict({"name": "x", "lm_prefix": "caption", "code_loss_weight": 1.0})
    with pytest.raises(ValueError, match="attribute_queries must not be negative"):
        TrainConfig.from_dict({"name": "x", "attribute_queries": -0.1})
    with pytest.raises(ValueError, match="phrase_share must be a positive"):
        TrainConfig.from_dict({"name": "x", "phrase_share": 0})
    with pytest.raises(ValueError, match="phrase_share must be a whole number"):
        TrainConfig.from_dict({"name": "x", "phrase_share": 2.5})
    # phrase pairs in stage 1 only with object_phrases; one image in phrase_share otherwise
    assert (config.object_phrases, config.stage1_phrase_share) == (True, config.phrase_share)
    assert TrainConfig.from_dict({"name": "x", "phrase_share": 2}).stage1_phrase_share == 0
    with pytest.raises(ValueError, match="positive"):
        PhaseConfig(steps=0, batch_size=8, lr=1e-3)
    with pytest.raises(ValueError, match="multiple of"):
        ArchitectureConfig(vision_hidden=90, vision_heads=4)
    with pytest.raises(ValueError, match="Unknown training config keys"):
        TrainConfig.from_dict({"name": "x", "learning_rate": 1})
    with pytest.raises(ValueError, match="Unknown keys in 'stage1'"):
        TrainConfig.from_dict({"name": "x", "stage1": {"steps": 1, "batch_size": 1, "lr": 1, "momentum": 0}})
    with pytest.raises(ValueError, match="No training config"):
        TrainConfig.load("no-such-config")
    # the language model's prompt-variety share follows stage 2's unless set apart
    assert TrainConfig.from_dict({"name": "x", "prompt_variety": 0.25}).lm_prompt_variety == 0.25
    apart = TrainConfig.from_dict({"name": "x", "prompt_variety": 0.25, "language_prompt_variety": 0.1})
    assert (apart.prompt_variety, apart.lm_prompt_variety) == (0.25, 0.1)
    with pytest.raises(ValueError, match="language_prompt_variety"):
        TrainConfig.from_dict({"name": "x", "language_prompt_variety": 1.5})


class _ThreadRecorder(torch.nn.Module):
    """A phase that remembers the thread count each of its steps ran on."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.threads: list[int] = []

    def step(self, step, batch_size):
        self.threads.append(torch.get_num_threads())
        return StepResult((self.weight**2).sum(), {})

    def validate(self):
        return {}


def test_each_step_runs_on_the_threads_of_the_schedule(tmp_path):
    config = TrainConfig.from_dict(
        {
            "name": "x",
            "threads": 1,
            "vision": {"steps": 6, "batch_size": 1, "lr": 0.1, "threads": 2, "threads_from_step": 4},
        }
    )
    assert [config.threads_at("vision", step) for step in range(6)] == [1, 1, 1, 1, 2, 2]
    assert config.threads_at("stage1", 0) == 1  # no schedule: the config's count
    everywhere = config.with_threads(3)  # --threads
    assert {everywhere.threads_at(phase, 5) for phase in TrainConfig.PHASES} == {3}
    with pytest.raises(ValueError, match="needs threads"):
        PhaseConfig(steps=4, batch_size=1, lr=1.0, threads_from_step=2)
    with pytest.raises(ValueError, match="between 0 and steps"):
        PhaseConfig(steps=4, batch_size=1, lr=1.0, threads=2, threads_from_step=5)

    before, waits = torch.get_num_threads(), []
    schedule = dict(
        threads=lambda step: config.threads_at("vision", step),
        before_more_threads=lambda: waits.append(torch.get_num_threads()),
    )
    try:
        first = _ThreadRecorder()
        run_phase("vision", first, list(first.parameters()), config.vision, tmp_path, False, 5, **schedule)
        assert first.threads == [1, 1, 1, 1, 2] and waits == [1]  # waited once, before raising
        torch.set_num_threads(1)
        resumed = _ThreadRecorder()
        run_phase("vision", resumed, list(resumed.parameters()), config.vision, tmp_path, False, **schedule)
        assert resumed.threads == [2] and waits == [1, 1]  # a resumed run keeps the schedule
    finally:
        torch.set_num_threads(before)


class _PartsRecorder(torch.nn.Module):
    """A phase in micro-batches that remembers how many of its parts ran at once."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.lock, self.running, self.most = threading.Lock(), 0, 0

    def parts(self, step, batch_size, count):
        return [functools.partial(self._part, k) for k in range(count)]

    def _part(self, k):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)  # long enough for the others to start, were they allowed to
        with self.lock:
            self.running -= 1
        return StepResult((self.weight * (k + 1)).sum() / 100, {"k": float(k)})  # under the clip norm

    def step(self, step, batch_size):
        raise AssertionError("a phase in micro-batches is run by its parts")

    def validate(self):
        return {}


def test_at_most_workers_parts_run_at_once_and_their_gradients_add_up():
    config = PhaseConfig(steps=2, batch_size=4, lr=1e-9, warmup_steps=0, weight_decay=0.0, micro_batches=4)
    for allowed, most in ((1, 1), (2, 2), (8, 4)):
        phase = _PartsRecorder()
        outcome = run_phase(
            "vision", phase, list(phase.parameters()), config, None, False, workers=lambda a=allowed: a
        )
        assert phase.most == most and outcome.losses == pytest.approx([0.2, 0.2])  # (1 + 2 + 3 + 4) * 2 / 100
        assert phase.weight.grad is not None and phase.weight.grad.tolist() == pytest.approx(
            [0.1, 0.1]
        )  # summed


def test_losses_go_down(smoke):
    assert smoke.finished
    for name, outcome in smoke.phases.items():
        first, last = np.mean(outcome.losses[:5]), np.mean(outcome.losses[-5:])
        assert last < 0.95 * first, f"{name}: loss {first:.3f} -> {last:.3f}"


def test_only_answer_tokens_are_supervised(smoke_config):
    arch = smoke_config.architecture
    captioning, retrieval = vocab.processors(arch.image_size, arch.num_query_tokens, arch.question_aware)
    data = _tiny_data(arch, captioning)
    tokenizer = captioning.tokenizer
    *states, text_embeddings = _fresh_states(arch, captioning, retrieval)
    phase = GenerativePretraining(
        arch, data, data, captioning, retrieval.tokenizer, *states, 0, 0.5, "scene", 1.0, text_embeddings
    )
    idx, ids, labels, prompts, answers = phase._batch(data, np.random.default_rng(0), 8, caption_fraction=0.5)
    image = tokenizer.convert_tokens_to_ids("<image>")
    for row, label in zip(ids.tolist(), labels.tolist(), strict=False):
        length = sum(t != tokenizer.pad_token_id for t in row)
        supervised = [i for i, v in enumerate(label) if v != IGNORE]
        # labels[t] is the target at position t: the next token, so answer tokens + EOS only
        assert supervised == list(range(supervised[0], length - 1))
        assert row[: arch.num_query_tokens] == [image] * arch.num_query_tokens
        assert supervised[0] >= arch.num_query_tokens  # never the image or the prompt
        assert label[length - 2] == tokenizer.eos_token_id  # the answer ends with EOS
        assert [label[i] for i in supervised] == row[supervised[0] + 1 : length]
        prompt = tokenizer.decode(row[arch.num_query_tokens : supervised[0] + 1])
        assert prompt.startswith("</s>") and (prompt == "</s>" or prompt.endswith("Short answer:"))
    # the code's answer slot (the stage-2 target of the 13th query token): the answer to the
    # question asked, "no" under a caption; the Q-Former reads the prompt the LM reads
    targets = phase.code_targets([data.scenes[int(i)] for i in idx], answers)
    embedding = phase.model.get_input_embeddings().weight
    for target, prompt, answer in zip(targets, prompts, answers, strict=True):
        assert (answer is None) == (prompt == "")
        word = tokenizer(f" {answer.strip() if answer else 'no'}", add_special_tokens=False).input_ids
        torch.testing.assert_close(target[-1], embedding[word[0]])
    qformer_tokenizer = phase.processor.qformer_tokenizer
    read = qformer_tokenizer.decode(qformer_tokenizer(prompts[0]).input_ids, skip_special_tokens=True)
    assert read.replace(" ", "") == prompts[0].lower().replace(" ", "")  # WordPiece spaces out ":"
    for prefix in ("caption", "scene", "slots"):
        language = LanguagePretraining(
            arch, data.scenes, data.scenes, tokenizer, 0, prefix_fraction=1.0, prefix=prefix
        )
        ids, labels, extra = language._sample(data.scenes, np.random.default_rng(0), 4)
        # "slots": further words summed into the prefix positions only, never into the text
        assert extra.shape[-1] == (3 if prefix == "slots" else 0)
        for row, label, more in zip(ids.tolist(), labels.tolist(), extra.tolist(), strict=True):
            assert all(w == -1 for m in more[row.index(tokenizer.bos_token_id) :] for w in m)
            bos = row.index(tokenizer.bos_token_id)
            assert bos > 0  # a description of the scene stands where the image will be
            supervised = [i for i, v in enumerate(label) if v != IGNORE]
            # only the answer (or caption) and EOS: never the prefix, never the prompt
            answer = tokenizer.decode([row[i + 1] for i in supervised])
            assert answer.endswith("</s>") and "Question" not in answer and "Short" not in answer
            prompt = tokenizer.decode(row[bos : supervised[0] + 1])
            assert prompt == "</s>" or prompt.endswith("Short answer:")
    # several questions about one scene code: each answer and its EOS supervised, nothing else
    language = LanguagePretraining(
        arch, data.scenes, data.scenes, tokenizer, 0, 1.0, "scene", 0.0, questions_per_text=3
    )
    ids, labels, _ = language._sample(data.scenes, np.random.default_rng(0), 4)
    for row, label in zip(ids.tolist(), labels.tolist(), strict=True):
        text = tokenizer.decode([t for t in row if t != tokenizer.pad_token_id])
        assert text.count("Question:") == text.count("Short answer:") == 3
        answers = tokenizer.decode([row[i + 1] for i, v in enumerate(label) if v != IGNORE])
        assert answers.count("</s>") == 3 and "Question" not in answers


def test_slot_code_sums_each_objects_words(smoke_config):
    arch = smoke_config.architecture
    captioning, _ = vocab.processors(arch.image_size, 12)
    tokenizer = captioning.tokenizer
    code = SceneCode(tokenizer, "slots", 12)
    scene = synthetic.make_scene(0, "test", 0, count=2)
    ids, extra = code(scene)
    assert len(ids) == len(extra) == 12  # four positions per slot: left, middle, right
    by_position = {o.position: o for o in scene.objects}
    for slot, position in enumerate(synthetic.POSITIONS):
        obj = by_position.get(position)
        words = [position, *((obj.size, obj.colour, obj.shape) if obj else ("no",))]
        for k in range(4):
            got = [ids[4 * slot + k], *(w for w in extra[4 * slot + k] if w >= 0)]
            assert tokenizer.decode(got).split() == words
    embedding = torch.nn.Embedding(len(tokenizer), 8)
    dense = code_embeddings(embedding, torch.tensor([ids]), code.extra_tensor([extra], 12))[0]
    for position in range(12):  # each position: the sum of its slot's word embeddings
        words = [ids[position], *(w for w in extra[position] if w >= 0)]
        torch.testing.assert_close(dense[position], embedding.weight[words].sum(0))


def test_chat_prompts_are_the_chat_tabs_own():
    """With chat_fraction, questions also come as the app's chat sends them (earlier turns, then
    `Question: ... Answer:`), built by the app's prompt builder with the demo model's templates;
    without it, the random stream is untouched (older configs train exactly as before)."""
    templates = Registry.load().resolve("shapes-demo").templates
    scene = synthetic.make_scene(0, "train", 7, count=3)
    answers = {qa.question: qa.answer for qa in scene.qa}
    seen = set()
    for seed in range(40):
        prompt, answer = sample_prompt(scene, np.random.default_rng(seed), 0.0, chat_fraction=1.0)
        turns = prompt.split(". Question: ")
        question = turns[-1].removeprefix("Question: ").removesuffix(" Answer:")
        history = [ChatTurn(*t.removeprefix("Question: ").split(" Answer: ")) for t in turns[:-1]]
        assert prompt == chat_prompt(templates, question, history).text
        assert answer == f" {answers[question]}"
        assert all(answers[t.question] == t.answer for t in history)  # earlier turns answered right
        seen.add(len(history))
    assert seen == {0, 1}
    plain = [sample_prompt(scene, np.random.default_rng(seed), 0.3) for seed in range(20)]
    assert plain == [sample_prompt(scene, np.random.default_rng(seed), 0.3, 0.0) for seed in range(20)]
    assert all(p == "" or p.endswith("Short answer:") for p, _ in plain)


def test_prompts_with_instructions_and_few_shot_examples():
    """With `variety`, a question comes as the chat tab can send it: after an instruction and / or
    one or two few-shot examples (about other scenes: their answers are not this image's), built
    by the app's own prompt builder; the question asked is always the last, and its answer is the
    target. Without `variety` the random stream is untouched."""
    templates = Registry.load().resolve("shapes-demo").templates
    scene = synthetic.make_scene(0, "train", 7, count=3, style="random")
    pool = [synthetic.make_scene(0, "train", i, style="random") for i in range(20)]
    answers = {qa.question: qa.answer for qa in scene.qa}
    kinds = set()
    for seed in range(60):
        prompt, answer = sample_prompt(scene, np.random.default_rng(seed), 0.0, 0.0, variety=1.0, pool=pool)
        question = next(q for q in answers if prompt.endswith((f"{q} Answer:", f"{q} Short answer:")))
        assert answer == f" {answers[question]}"
        instruction = next((i for i in INSTRUCTIONS if prompt.startswith(i)), "")
        body = prompt.removeprefix(instruction).strip()
        exemplars = body.count("Question:") - 1
        assert 0 <= exemplars <= 2 and (instruction or exemplars)
        if body.endswith("Short answer:"):
            assert body == f"Question: {question} Short answer:" and instruction
        else:
            turns = [t.removeprefix("Question: ").split(" Answer: ") for t in body.split(". Question: ")[:-1]]
            history = [ChatTurn(q, a) for q, a in turns]
            assert prompt == chat_prompt(templates, question, exemplars=history, instruction=instruction).text
        kinds.add((bool(instruction), exemplars))
    assert {(True, 0), (False, 1), (False, 2), (True, 1)} <= kinds
    rng = np.random.default_rng(3)
    assert all(
        varied_prompt("what shape is it?", rng, pool).endswith(("it? Answer:", "it? Short answer:"))
        for _ in range(10)
    )
    plain = [sample_prompt(scene, np.random.default_rng(seed), 0.3, 0.1) for seed in range(20)]
    assert plain == [
        sample_prompt(scene, np.random.default_rng(seed), 0.3, 0.1, 0.0, pool) for seed in range(20)
    ]


def test_training_never_sees_the_evaluation_renderer():
    from blip2_app.training.config import DataConfig
    from blip2_app.training.shapes_data import ShapesData

    with pytest.raises(ValueError, match="evaluation only"):
        DataConfig(style="paint")
    with pytest.raises(ValueError, match="evaluation only"):
        ShapesData.build(0, "train", 2, None, 8, style="paint")
    bundled = TrainConfig.load("shapes-demo")  # the recipe of the bundled model
    assert bundled.data.style == "random" and bundled.object_phrases
    trained_with = json.loads((BUNDLED / "training.json").read_text())["config"]
    assert TrainConfig.from_dict(trained_with) == bundled
    # Micro-batches in every phase (decision 0013), stage 1's attribute queries (0014), and stage 2
    # asked more few-shot and instruction prompts than the language model it reads (0015).
    assert bundled.attribute_queries > 0 and bundled.prompt_variety > bundled.lm_prompt_variety > 0
    for phase in TrainConfig.PHASES:
        assert getattr(bundled, phase).micro_batches > 1 and getattr(bundled, phase).threads is None


def test_captioning_phases_can_see_more_classic_scenes():
    from blip2_app.training.config import DataConfig

    assert DataConfig(style="random", classic_share=0.2).captioning_share == 0.2
    assert (
        DataConfig(style="random", classic_share=0.2, captioning_classic_share=0.35).captioning_share == 0.35
    )
    with pytest.raises(ValueError, match="captioning_classic_share"):
        DataConfig(captioning_classic_share=1.5)


def _tiny_data(arch, captioning):
    from blip2_app.training.shapes_data import ShapesData

    return ShapesData.build(0, "train", 16, captioning.image_processor, arch.image_size // arch.patch_size)


def _fresh_states(arch, captioning, retrieval):
    from blip2_app.training import architecture

    itm = architecture.new_retrieval_model(arch, retrieval)
    itm.query_tokens.data.normal_(0.0, 0.02)  # as stage 1 starts them
    lm = architecture.new_language_model(arch, captioning.tokenizer)
    return (
        itm.vision_model.state_dict(),
        itm.qformer.state_dict(),
        itm.query_tokens.data,
        lm.state_dict(),
        itm.embeddings.state_dict(),
    )


def _smoke_phases(config):
    """Every phase of the smoke recipe on fresh weights and 16 images, with its trainable parameters."""
    from blip2_app.training.phases import QFormerPretraining, VisionPretraining

    arch = config.architecture
    captioning, retrieval = vocab.processors(arch.image_size, arch.num_query_tokens, arch.question_aware)
    data = _tiny_data(arch, captioning)
    *states, text_embeddings = _fresh_states(arch, captioning, retrieval)
    torch.manual_seed(0)
    phases = {
        "vision": VisionPretraining(arch, data, data, 0),
        "language": LanguagePretraining(
            arch, data.scenes, data.scenes, captioning.tokenizer, 0, 0.8, "scene", 0.5
        ),
        "stage1": QFormerPretraining(arch, data, data, retrieval, states[0], 0, 4),
        "stage2": GenerativePretraining(
            arch, data, data, captioning, retrieval.tokenizer, *states, 0, 0.3, "scene", 1.0, text_embeddings
        ),
    }
    return {
        name: (phase, [p for p in phase.parameters() if p.requires_grad]) for name, phase in phases.items()
    }


def _gradients(phase, parameters, parts, pool=None):
    loss, logs = accumulate_gradients(parts, parameters, pool)
    grads = [None if p.grad is None else p.grad.clone() for p in parameters]
    for p in parameters:
        p.grad = None
    return loss, logs, grads


def test_micro_batches_give_the_same_bits_side_by_side_or_one_after_another(smoke_config):
    """`micro_batches`: the parts of a step on two threads at once give the gradients they give one
    after another, to the bit (so the parallel run may add a worker whenever a core frees up), and
    their losses add up to the step's: exactly where the loss is a mean over the whole batch
    (language model, stage 1's ITC and ITM, stage 2's LM loss), to a few percent where a part's
    mean stands in for it (the vision encoder's per-object term, stage 2's code loss)."""
    from concurrent.futures import ThreadPoolExecutor

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(2) as pool:
            for name, (phase, parameters) in _smoke_phases(smoke_config).items():
                count = 4 if name in ("language", "stage2") else 2
                whole, _, _ = _gradients(phase, parameters, [lambda phase=phase: phase.step(3, 16)])
                alone = _gradients(phase, parameters, phase.parts(3, 16, count))
                together = _gradients(phase, parameters, phase.parts(3, 16, count), pool)
                assert len(phase.parts(3, 16, count)) == count
                assert alone[0] == together[0] and alone[1] == together[1], name
                assert all(
                    (a is None and b is None) or torch.equal(a, b)
                    for a, b in zip(alone[2], together[2], strict=True)
                ), name
                assert any(g is not None and g.abs().sum() > 0 for g in alone[2]), name
                exact = name in ("language", "stage1")
                assert alone[0] == pytest.approx(whole, rel=1e-5 if exact else 0.05), name
    finally:
        torch.set_num_threads(before)


def test_length_groups_pad_each_micro_batch_to_its_own_length():
    from blip2_app.training.phases import length_groups, split_rows

    pad = 1
    lengths = [5, 2, 7, 3, 3, 6]
    ids = torch.tensor([[9] * n + [pad] * (7 - n) for n in lengths])
    groups = length_groups(ids, pad, 3)
    assert [rows.tolist() for rows, _ in groups] == [[1, 3], [4, 0], [5, 2]]  # shortest first, stable
    assert [width for _, width in groups] == [3, 5, 7]
    assert [rows.tolist() for rows, _ in length_groups(ids, pad, 1)] == [list(range(6))]  # one: as drawn
    assert split_rows(7, 3) == [slice(0, 2), slice(2, 4), slice(4, 7)]
    with pytest.raises(ValueError, match="Cannot split"):
        split_rows(2, 3)
    with pytest.raises(ValueError, match="micro_batches"):
        PhaseConfig(steps=4, batch_size=2, lr=1.0, micro_batches=3)
    assert TrainConfig.load("shapes-demo").with_threads(1).workers == 1  # --threads: parts in turn


def test_interrupted_training_resumes_exactly(smoke, smoke_config, tmp_path):
    work = tmp_path / "work"
    stopped = train(smoke_config, None, work_dir=work, progress=False, stop_after=("stage1", 13))
    assert not stopped.finished and stopped.phases["stage1"].steps_done == 13
    assert (work / "stage1.pt").exists()
    resumed = train(smoke_config, tmp_path / "model", work_dir=work, progress=False)
    assert resumed.finished
    for name, outcome in smoke.phases.items():
        np.testing.assert_allclose(
            resumed.phases[name].losses, outcome.losses, atol=REPRODUCE_ATOL, err_msg=name
        )


def test_same_seed_reproduces_weights_and_metrics(smoke, smoke_config, tmp_path):
    again = train(smoke_config, tmp_path / "model", work_dir=tmp_path / "work", progress=False)
    for folder in (lambda r: r.out_dir, lambda r: r.itm_dir):
        first = load_file(folder(smoke) / "model.safetensors")
        second = load_file(folder(again) / "model.safetensors")
        assert first.keys() == second.keys()
        for key in first:
            torch.testing.assert_close(first[key], second[key], atol=REPRODUCE_ATOL, rtol=0, msg=key)
    dataset = "shapes:size=6"
    metrics = [
        evaluate_module.evaluate(str(r.out_dir), dataset, limit=6, progress=False)["headline"]
        for r in (smoke, again)
    ]
    assert metrics[0].keys() == metrics[1].keys()
    for key in metrics[0]:
        assert metrics[0][key] == pytest.approx(metrics[1][key], abs=REPRODUCE_ATOL), key


def test_checkpoints_load_through_the_app(smoke):
    model_dir, itm_dir = smoke.out_dir, smoke.itm_dir
    assert itm_dir == twin_folder(model_dir)
    for folder in (model_dir, itm_dir):
        assert (folder / "model.safetensors").exists() and (folder / "processor_config.json").exists()
        assert json.loads((folder / "training.json").read_text())["finished"]
        saved = json.loads((folder / "tokenizer.json").read_text())
        assert saved["padding"] is None and saved["truncation"] is None  # no defaults left behind
    engine = load_engine(Settings(model=str(model_dir), retrieval_model=str(itm_dir)))
    assert engine.text.entry.family.name == "instructblip-opt"
    assert engine.matcher.entry.family.name == "blip2-itm"
    assert any("Vision encoder shared" in note for note in engine.matcher.notes)
    image = synthetic.make_scene(0, "test", 0).render()
    assert isinstance(engine.caption([image])[0][0].text, str)
    assert isinstance(engine.answer(image, "what colour is the shape?").text, str)
    assert engine.itc([image], ["a red circle", "a blue square"]).shape == (1, 2)


def test_the_blip2_format_recipe_still_trains_and_loads(smoke_config, tmp_path):
    """`question_aware: false` (12 query tokens): the plain BLIP-2 recipe, whose Q-Former sees
    only the image, exported as `Blip2ForConditionalGeneration` and loaded as family blip2-opt."""
    arch = dataclasses.replace(smoke_config.architecture, question_aware=False, num_query_tokens=12)
    report = train(smoke_config.replace(architecture=arch), tmp_path / "model", progress=False)
    config = json.loads((report.out_dir / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForConditionalGeneration"] and config["num_query_tokens"] == 12
    engine = load_engine(Settings(model=str(report.out_dir), retrieval_model=str(report.itm_dir)))
    assert engine.text.entry.family.name == "blip2-opt"
    assert isinstance(
        engine.answer(synthetic.make_scene(0, "test", 0).render(), "what colour is it?").text, str
    )


def test_evaluate_reports_every_task(smoke, tmp_path):
    out = tmp_path / "report" / "eval"
    assert (
        evaluate_module.main(
            [
                "--model",
                str(smoke.out_dir),
                "--dataset",
                "shapes:size=5",
                "--limit",
                "5",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["retrieval_model"] == str(smoke.itm_dir)
    assert result["captioning"]["images"] == 5 and result["vqa"]["questions"] == 5
    assert result["retrieval"]["images"] == 5
    for value in result["headline"].values():
        assert 0.0 <= value <= 10.0
    assert "| vqa_accuracy |" in out.with_suffix(".md").read_text()
    # A checkpoint folder loads at the app's CPU default (the vision encoder in bf16 on AMX CPUs).
    vision = auto_vision_precision(torch.device("cpu"))
    default = f"vision {vision}, qformer dynamic-int8, llm dynamic-int8" if vision else "dynamic-int8"
    assert result["precision"] == {"captioner": default, "retrieval": default}


def test_evaluate_runs_at_the_precision_asked_for(smoke, tmp_path):
    """The registry's demo models run at fp32 and a folder at int8: --precision compares the
    two like for like, and the report says which precision each model ran at."""
    out = tmp_path / "eval-fp32"
    argv = ["--model", str(smoke.out_dir), "--dataset", "shapes:size=4", "--limit", "4", "--no-progress"]
    assert evaluate_module.main([*argv, "--precision", "fp32", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["precision"] == {"captioner": "fp32", "retrieval": "fp32"}
    assert "precision: captioner fp32, retrieval fp32" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        evaluate_module.main([*argv, "--precision", "fp64"])


def test_evaluate_compares_renderers_and_prompted_questions(smoke, tmp_path):
    """Several --dataset in one report (a column each), and --prompted: the same questions asked
    with two few-shot examples about other images and with an instruction training never used."""
    out = tmp_path / "eval"
    datasets = ["shapes:size=3", "shapes:size=3,renderer=paint"]
    argv = ["--model", str(smoke.out_dir), "--limit", "6", "--prompted", "--out", str(out), "--no-progress"]
    assert evaluate_module.main(argv + [a for d in datasets for a in ("--dataset", d)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["datasets"]) == datasets
    for result in report["datasets"].values():
        assert result["vqa"]["questions"] == result["vqa_few_shot"]["questions"] == 6
        assert {"vqa_accuracy_few_shot", "vqa_accuracy_instruction"} <= set(result["headline"])
    table = out.with_suffix(".md").read_text()
    assert "| metric | `shapes:size=3` | `shapes:size=3,renderer=paint` |" in table


def test_prompted_questions_hold_two_examples_from_other_images():
    from blip2_app.training.datasets import load_records

    records = [r for r in load_records("shapes:size=12,task=vqa", "test")]

    class Engine:  # what prompted_vqa_prompts reads of an engine
        class text:
            class entry:
                templates = Registry.load().resolve("shapes-demo").templates

    few_shot = evaluate_module.prompted_vqa_prompts(Engine, records, "few_shot")
    for record, prompt in zip(records, few_shot, strict=True):
        assert prompt.endswith(f"Question: {record.question} Answer:") and prompt.count("Question:") == 3
        others = {r.question + " Answer: " + r.answers[0] for r in records if r.image_id != record.image_id}
        assert all(turn.removeprefix("Question: ") in others for turn in prompt.split(". ")[:2])
    instructed = evaluate_module.prompted_vqa_prompts(Engine, records, "instruction")
    assert (
        instructed[0]
        == f"{evaluate_module.HELD_OUT_INSTRUCTION} Question: {records[0].question} Short answer:"
    )
    assert evaluate_module.HELD_OUT_INSTRUCTION not in INSTRUCTIONS


# ----------------------------------------------------------------------------- the bundled model

needs_bundled = pytest.mark.skipif(
    not (BUNDLED / "config.json").exists(),
    reason=f"{BUNDLED} does not exist yet: train it with `python -m blip2_app.training.train --config shapes-demo`",
)


@pytest.fixture(scope="module")
def bundled_engine():
    return load_engine(Settings(model=str(BUNDLED), retrieval_model=str(twin_folder(BUNDLED))))


@needs_bundled
def test_bundled_model_names_the_colour_of_fresh_shapes(bundled_engine):
    # a seed the training never used: freshly generated images
    scenes = [synthetic.make_scene(20260, "test", i, count=1) for i in range(12)]
    answers = bundled_engine.answer_batch(
        [s.render() for s in scenes], ["what colour is the shape?"] * len(scenes)
    )
    expected = [s.objects[0].colour for s in scenes]
    got = [a.text for a in answers]
    assert sum(g == e for g, e in zip(got, expected, strict=False)) >= 11, list(
        zip(got, expected, strict=False)
    )
    captions = bundled_engine.caption([s.render() for s in scenes[:4]])
    for scene, caption in zip(scenes, captions, strict=False):
        obj = scene.objects[0]
        assert f"{obj.colour} {obj.shape}" in caption[0].text


@needs_bundled
def test_bundled_model_retrieves_by_description(bundled_engine):
    scenes = synthetic.generate_split(20261, "test", 12, unique_captions=True)
    similarity = bundled_engine.itc([s.render() for s in scenes], [s.caption for s in scenes])
    assert (similarity.argmax(dim=0) == torch.arange(len(scenes))).float().mean() >= 0.75


@needs_bundled
def test_bundled_model_is_small_and_in_the_app_format():
    files = [p for folder in (BUNDLED, twin_folder(BUNDLED)) for p in folder.iterdir()]
    assert sum(p.stat().st_size for p in files) < 25 * 1024 * 1024
    assert json.loads((BUNDLED / "config.json").read_text())["architectures"] == [
        "InstructBlipForConditionalGeneration"
    ]
    itm_config = json.loads((twin_folder(BUNDLED) / "config.json").read_text())
    assert itm_config["architectures"] == ["Blip2ForImageTextRetrieval"]


def test_stage_2_pictures_are_rendered_once_and_borrowed_where_the_scene_is_the_same(smoke_config, tmp_path):
    """The captioning data (its own classic share) takes the pixels of the vision data's pictures
    where the scene is the same and renders the rest: the same tensors as rendering it whole, one
    process or two (the helper's file). The file is read back only for its data section."""
    from blip2_app.training.shapes_data import new_rows
    from blip2_app.training.train import _load_pictures, _save_pictures, render_data, scene_lists

    config = smoke_config.replace(data=dataclasses.replace(smoke_config.data, train_images=60, val_images=20))
    processor = vocab.image_processor(config.architecture.image_size)
    vision_share, captioning_share = config.data.classic_share, config.data.captioning_share
    assert vision_share != captioning_share
    vision = render_data(config, processor, vision_share)
    whole = render_data(config, processor, captioning_share)
    borrowed = render_data(config, processor, captioning_share, borrow=vision)
    path = tmp_path / CAPTIONING_PICTURES
    _save_pictures(
        path, config, scene_lists(config, captioning_share), scene_lists(config, vision_share), processor
    )
    helped = _load_pictures(path, config, vision)
    assert helped is not None
    rows = [len(new_rows(w.scenes, v.scenes)) for w, v in zip(whole, vision, strict=True)]
    assert 0 < rows[0] < len(whole[0])  # some pictures borrowed, some rendered
    for data in (borrowed, helped):
        for mine, theirs in zip(data, whole, strict=True):
            assert mine.scenes == theirs.scenes
            for field in ("pixels", "patch_labels", "object_labels", "slot_labels", "counts"):
                assert torch.equal(getattr(mine, field), getattr(theirs, field)), field
    other_grid = config.replace(architecture=dataclasses.replace(config.architecture, patch_size=16))
    assert _load_pictures(path, other_grid, vision) is None  # patch labels counted on another grid
    assert _load_pictures(path, config.replace(seed=1), vision) is None
    assert _load_pictures(tmp_path / "missing.pt", config, vision) is None
    assert _load_pictures(path, config, whole) is None  # rendered against other scenes


def test_vision_features_side_by_side_are_the_features_of_one_thread(smoke_config):
    from blip2_app.training.phases import vision_features

    arch = smoke_config.architecture
    _, retrieval = vocab.processors(arch.image_size, arch.num_query_tokens, arch.question_aware)
    torch.manual_seed(0)
    vision = architecture.new_retrieval_model(arch, retrieval).vision_model
    pixels = torch.randn(70, 3, arch.image_size, arch.image_size)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = vision_features(vision, pixels, chunk=16)
        two = vision_features(vision, pixels, chunk=16, workers=2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and not one.requires_grad


def test_stage1_from_an_encoder_retrains_the_twin_of_that_run(smoke, tmp_path, capsys):
    """benchmarks/stage1_from_encoder.py: stage 1 alone on a finished run's encoder gives that
    run's own twin (the smoke run's, to tolerance), so a twin's weakness can be put on its encoder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "stage1_from_encoder", ROOT / "benchmarks" / "stage1_from_encoder.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    work = smoke.itm_dir.parent / "work"
    assert module.main([str(work / "vision.pt"), "--config", "smoke", "--out", str(tmp_path / "itm")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stage1"]["validation"] == smoke.phases["stage1"].summary()["validation"]
    again, shipped = (load_file(folder / "model.safetensors") for folder in (tmp_path / "itm", smoke.itm_dir))
    for key in shipped:
        torch.testing.assert_close(again[key], shipped[key], atol=REPRODUCE_ATOL, rtol=0, msg=key)


def test_vision_encoder_fit_reads_a_run_as_its_own_validation_did(smoke, smoke_config, tmp_path):
    """benchmarks/vision_encoder_fit.py: on a run's vision.pt its "val" row is the run's own
    validation of the encoder, and it writes one table row per run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "vision_encoder_fit", ROOT / "benchmarks" / "vision_encoder_fit.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vision = smoke.itm_dir.parent / "work" / "vision.pt"
    seed = smoke_config.seed
    before = torch.get_num_threads()
    try:
        argv = [
            f"smoke={vision}:{seed}",
            "--config",
            "smoke",
            "--train-pictures",
            "8",
            "--test-pictures",
            "8",
        ]
        assert module.main([*argv, "--out", str(tmp_path / "fit")]) == 0
    finally:
        torch.set_num_threads(before)
    rows = json.loads((tmp_path / "fit.json").read_text())["smoke"]
    assert list(rows) == ["train", "val", "first generator"]
    expected = smoke.phases["vision"].summary()["validation"]
    assert rows["val"] == pytest.approx(expected, abs=1e-4)
    assert "| `smoke` |" in (tmp_path / "fit.md").read_text()


def test_training_steps_benchmark_times_every_phase_four_ways(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("training_steps", ROOT / "benchmarks" / "training_steps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = torch.get_num_threads()
    try:
        argv = ["--config", "smoke", "--steps", "1", "--images", "16", "--out", str(tmp_path / "steps")]
        assert module.main(argv) == 0
    finally:
        torch.set_num_threads(before)
    steps = json.loads((tmp_path / "steps.json").read_text())["steps"]
    assert list(steps) == list(TrainConfig.PHASES)
    assert all(row[way] > 0 for row in steps.values() for way in module.WAYS)
    assert "| stage2 | 4 |" in (tmp_path / "steps.md").read_text()


def test_a_parallel_run_gives_the_weights_of_one_process(smoke, smoke_config, tmp_path):
    """`--parallel`: the language model trained by a second process, the rest here, same weights."""
    report = train(
        smoke_config, tmp_path / "model", work_dir=tmp_path / "work", progress=False, parallel=True
    )
    assert report.finished and (tmp_path / "work" / "parallel-config.json").exists()
    # stage 2 read the pictures the helper rendered (the smoke recipe's captioning share is its own)
    assert smoke_config.data.captioning_share != smoke_config.data.classic_share
    assert (tmp_path / "work" / CAPTIONING_PICTURES).exists()
    for folder in (lambda r: r.out_dir, lambda r: r.itm_dir):
        one, two = (load_file(folder(r) / "model.safetensors") for r in (smoke, report))
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=REPRODUCE_ATOL, rtol=0, msg=key)
    np.testing.assert_allclose(report.phases["language"].losses, smoke.phases["language"].losses)


def test_attribute_queries_name_every_colour_and_shape_once_and_where_each_is_true():
    from blip2_app.training.shapes_data import COLOUR_FORMS, SHAPE_FORMS, attribute_queries

    scenes = [synthetic.make_scene(5, "train", i, count=1 + i % 3) for i in range(12)]
    texts, truth = attribute_queries(scenes, np.random.default_rng(0))
    colours, shapes = list(synthetic.COLOURS), list(synthetic.SHAPES)
    assert len(texts) == len(colours) + len(shapes) and truth.shape == (12, len(texts))
    for text, word in zip(texts, colours + shapes, strict=True):
        forms = COLOUR_FORMS if word in colours else SHAPE_FORMS
        assert text in {form.format(word) for form in forms}
    for scene, row in zip(scenes, truth.tolist(), strict=True):
        shown = {o.colour for o in scene.objects} | {o.shape for o in scene.objects}
        assert row == [word in shown for word in colours + shapes]
    drawn = {attribute_queries(scenes, np.random.default_rng(seed))[0][0] for seed in range(40)}
    assert len(drawn) > 1, "the form is drawn, not fixed"


def test_supervised_contrast_ranks_each_true_pair_against_the_false_ones_only():
    from blip2_app.training.shapes_data import supervised_contrast

    generator = torch.Generator().manual_seed(0)
    sim = torch.randn(5, 6, generator=generator)
    positive = torch.rand(5, 6, generator=generator) < 0.4
    positive[0] = True  # a row with no false pair adds nothing
    positive[1] = False
    positive[1, 2] = True
    expected = []
    for r in range(5):
        false = sim[r][~positive[r]]
        if len(false) == 0:
            continue
        for c in positive[r].nonzero().flatten().tolist():
            expected.append(-torch.log(sim[r, c].exp() / (sim[r, c].exp() + false.exp().sum())))
    assert supervised_contrast(sim, positive).item() == pytest.approx(
        torch.stack(expected).mean().item(), rel=1e-6
    )
    # Another true pair's score does not enter a true pair's loss: each competes with the false one.
    both = torch.tensor([[True, True, False]])
    softplus = torch.nn.functional.softplus
    for other in (1.0, 9.0):
        loss = supervised_contrast(torch.tensor([[2.0, other, 0.0]]), both)
        assert loss.item() == pytest.approx(
            ((softplus(torch.tensor(-2.0)) + softplus(torch.tensor(-other))) / 2).item(), rel=1e-5
        )
