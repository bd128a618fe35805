"""The four training phases, in BLIP-2's order. Each owns its modules and one loss per step.

1. `VisionPretraining`: a tiny ViT learns to see (per-patch and per-slot attribute classifiers);
   BLIP-2 starts from a pretrained image encoder, and without one the Q-Former has nothing to read.
2. `LanguagePretraining`: a tiny OPT learns the synthetic text (captions and answers to questions,
   most after a description of the scene, so it learns to read a prefix).
3. `QFormerPretraining` (stage 1): the Q-Former against the frozen ViT with ITC + ITM.
4. `GenerativePretraining` (stage 2): the Q-Former and projection into the frozen OPT, LM loss on
   the answer tokens only.

Batches are drawn with a generator seeded by (seed, phase, step), so step k sees the same batch
whether the run was interrupted or not: resuming is exact. `parts` splits a step's batch into
micro-batches whose losses add up to the step's loss: the trainer may compute them side by side.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import OPTForCausalLM

from ..engine import query_outputs
from ..prompts import ChatTurn, chat_prompt, vqa_prompt
from ..registry import Registry
from . import architecture, synthetic
from .config import ArchitectureConfig
from .shapes_data import (
    ATTRIBUTE_CLASSES,
    COLOURS,
    Scene,
    ShapesData,
    attribute_queries,
    perturb,
    phrase_pair,
    supervised_contrast,
)

IGNORE = -100  # label value cross_entropy skips: prompt, image and padding positions


@dataclass
class StepResult:
    loss: torch.Tensor
    logs: dict[str, float]


# One micro-batch of a step: computes its share of the step's loss (its logs add up likewise).
# Everything random is drawn before, so parts may run in any order, on any thread.
Part = Callable[[], StepResult]


def split_rows(count: int, parts: int) -> list[slice]:
    """`parts` consecutive slices of range(count), their sizes differing by at most one."""
    if not 1 <= parts <= count:
        raise ValueError(f"Cannot split {count} rows into {parts} parts.")
    bounds = [count * k // parts for k in range(parts + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def supervised_logits(
    lm: OPTForCausalLM, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """An OPT's logits at the supervised positions only (labels != IGNORE), and their targets.
    The same loss as over every position, but the vocabulary head runs on the ~15% of positions
    that are answers instead of all of them."""
    decoder = lm.model.decoder
    hidden = decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    keep = labels != IGNORE
    return lm.lm_head(hidden[keep]), labels[keep]


def length_groups(ids: torch.Tensor, pad: int, count: int) -> list[tuple[torch.Tensor, int]]:
    """The rows of a right-padded batch in `count` groups of similar length (shortest first), each
    with its own padded width: as micro-batches they compute ~20% fewer padding positions than
    the batch padded as one (56% of the language model's positions were padding)."""
    lengths = (ids != pad).long().cumsum(1).argmax(1) + 1  # up to each row's last real token
    order = torch.argsort(lengths, stable=True) if count > 1 else torch.arange(len(ids))
    return [(order[rows], int(lengths[order[rows]].max())) for rows in split_rows(len(ids), count)]


def batch_rng(seed: int, phase: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1000 + phase, step])


def _attribute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropies for colour, shape and size; logits (..., 15), labels (..., 3)."""
    total = logits.new_zeros(())
    for part, target in zip(logits.split(ATTRIBUTE_CLASSES, dim=-1), labels.unbind(-1), strict=True):
        total = total + F.cross_entropy(part.reshape(-1, part.shape[-1]), target.reshape(-1))
    return total


class VisionPretraining(nn.Module):
    INDEX = 0

    def __init__(self, arch: ArchitectureConfig, train: ShapesData, val: ShapesData, seed: int):
        super().__init__()
        self.vision = architecture.new_vision_model(arch)
        width = sum(ATTRIBUTE_CLASSES)
        self.patch_head = nn.Linear(arch.vision_hidden, width)
        self.object_head = nn.Linear(arch.vision_hidden, width)
        self.scene_head = nn.Linear(arch.vision_hidden, 3 * width + 3)
        self.train_data, self.val_data, self.seed = train, val, seed

    def _outputs(self, pixels: torch.Tensor, owners: torch.Tensor):
        hidden = self.vision(pixel_values=pixels).last_hidden_state
        patches = self.patch_head(hidden[:, 1:])
        # Each object's patch tokens averaged, then classified: one patch rarely shows a whole
        # shape, but the tokens of an object together must (and a Q-Former query that attends to
        # an object averages them in the same way).
        members = F.one_hot(owners, 4)[..., 1:].float()  # (B, patches, 3 objects)
        sizes = members.sum(dim=1)  # (B, 3)
        pooled = torch.einsum("bph,bpk->bkh", hidden[:, 1:], members) / sizes.clamp(min=1).unsqueeze(-1)
        objects = self.object_head(pooled)
        scene = self.scene_head(hidden[:, 0])
        slots, count = scene[:, :-3].reshape(len(pixels), 3, -1), scene[:, -3:]
        return patches, objects, sizes > 0, slots, count

    def _loss(self, data: ShapesData, idx: torch.Tensor) -> torch.Tensor:
        labels = data.patch_labels[idx]
        patches, objects, present, slots, count = self._outputs(data.pixels[idx], labels[..., 3])
        return (
            _attribute_loss(patches, labels[..., :3])
            + _attribute_loss(objects[present], data.object_labels[idx][present])
            + _attribute_loss(slots, data.slot_labels[idx])
            + F.cross_entropy(count, data.counts[idx])
        )

    def step(self, step: int, batch_size: int) -> StepResult:
        return self.parts(step, batch_size, 1)[0]()

    def parts(self, step: int, batch_size: int, count: int) -> list[Part]:
        data = self.train_data
        idx = torch.from_numpy(
            batch_rng(self.seed, self.INDEX, step).choice(len(data), batch_size, replace=False)
        )
        return [
            functools.partial(self._part, idx[rows], (rows.stop - rows.start) / batch_size)
            for rows in split_rows(batch_size, count)
        ]

    def _part(self, idx: torch.Tensor, share: float) -> StepResult:
        return StepResult(self._loss(self.train_data, idx) * share, {})

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        data = self.val_data
        _, objects, present, slots, count = self._outputs(data.pixels, data.patch_labels[..., 3])
        result = {}
        for name, logits, labels, keep in (
            ("object", objects, data.object_labels, present),
            ("slot", slots, data.slot_labels, torch.ones_like(present)),
        ):
            correct = torch.ones(logits.shape[:2], dtype=torch.bool)
            for part, target in zip(logits.split(ATTRIBUTE_CLASSES, dim=-1), labels.unbind(-1), strict=True):
                correct &= part.argmax(-1) == target
            result[f"{name}_accuracy"] = correct[keep].float().mean().item()
        result["count_accuracy"] = (count.argmax(-1) == data.counts).float().mean().item()
        return result


class TokenIds:
    """The tokenizer's ids of a text, remembered: the synthetic texts are a few hundred prompts and
    answers and one code per scene, and a tokenizer call (~0.1 ms) made a third of a language-model
    step. The ids are the tokenizer's own, so batches are unchanged."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._memo: dict[tuple[str, bool], list[int]] = {}

    def __call__(self, text: str, special: bool = True) -> list[int]:
        key = (text, special)
        if key not in self._memo:
            self._memo[key] = self.tokenizer(text, add_special_tokens=special).input_ids
        return self._memo[key]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


class LanguagePretraining(nn.Module):
    INDEX = 1

    def __init__(
        self,
        arch,
        train: Sequence[Scene],
        val: Sequence[Scene],
        tokenizer,
        seed: int,
        prefix_fraction: float,
        prefix: str = "caption",
        caption_fraction: float = 0.3,
        questions_per_text: int = 1,
        chat_fraction: float = 0.0,
        prompt_variety: float = 0.0,
    ):
        super().__init__()
        self.lm = architecture.new_language_model(arch, tokenizer)
        self.caption_fraction, self.questions_per_text = caption_fraction, questions_per_text
        self.chat_fraction, self.prompt_variety = chat_fraction, prompt_variety
        self.tokenizer, self.train_scenes, self.val_scenes = tokenizer, train, val
        self.ids = TokenIds(tokenizer)
        self.seed, self.prefix_fraction, self.prefix = seed, prefix_fraction, prefix
        self.code = SceneCode(tokenizer, prefix, arch.num_query_tokens, answer_slot=arch.question_aware)

    def _sample(self, scenes: Sequence[Scene], rng: np.random.Generator, batch_size: int):
        """(ids, labels, extra): `extra` (batch, length, k) holds the further words summed into
        each prefix position of a "slots" code (-1 where none; k = 0 for the text prefixes)."""
        tok = self.tokenizer
        ids, labels, extras = [], [], []
        variety = batch_variety(rng, self.prompt_variety)
        for i in rng.choice(len(scenes), batch_size, replace=False):
            scene = scenes[int(i)]
            prompt, answer = sample_prompt(
                scene, rng, self.caption_fraction, self.chat_fraction, variety, scenes
            )
            with_prefix = rng.random() < self.prefix_fraction
            prefix, extra = self.code(scene, answer if prompt else None) if with_prefix else ([], [])
            body = self.ids(prompt)  # BOS + prompt
            target = [*self.ids(answer, special=False), tok.eos_token_id]
            row = prefix + body + target
            # Only the answer (or caption) and its EOS are supervised, never the prefix (it stands
            # where the image will be) nor the prompt: an LM taught to write "Question: ..." after
            # BOS starts captions that way (70% of its texts began so) and beam search follows.
            label = [IGNORE] * (len(prefix) + len(body) - 1) + target
            if prefix and prompt and self.questions_per_text > 1:
                # More questions about the same scene after the first: "</s>" is BOS and EOS alike,
                # so each one follows "</s>" exactly as the first follows BOS. More answers to learn
                # from per step, the hard part of this phase (finding the object a question names).
                for extra_prompt, extra_answer in sample_questions(scene, rng, self.questions_per_text - 1):
                    more = self.ids(extra_prompt, special=False)
                    answer_ids = [*self.ids(extra_answer, special=False), tok.eos_token_id]
                    row += more + answer_ids
                    label += [IGNORE] * len(more) + answer_ids
            ids.append(row)
            extras.append(extra)
            labels.append([*label, IGNORE])
        padded = _pad(ids, tok.pad_token_id)
        return padded, _pad(labels, IGNORE), self.code.extra_tensor(extras, padded.shape[1])

    def _lm_inputs(self, ids: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings (the scene code's extra words summed in) and the attention mask."""
        embeds = code_embeddings(self.lm.get_input_embeddings(), ids, extra)
        return embeds, (ids != self.tokenizer.pad_token_id).long()

    def _logits(self, ids: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        embeds, mask = self._lm_inputs(ids, extra)
        return self.lm(inputs_embeds=embeds, attention_mask=mask).logits

    def _supervised_logits(self, ids: torch.Tensor, labels: torch.Tensor, extra: torch.Tensor):
        # labels[:, t] is the target for position t, i.e. ids[:, t + 1]
        return supervised_logits(self.lm, *self._lm_inputs(ids, extra), labels)

    def _loss(self, ids: torch.Tensor, labels: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(*self._supervised_logits(ids, labels, extra))

    def step(self, step: int, batch_size: int) -> StepResult:
        return self.parts(step, batch_size, 1)[0]()

    def parts(self, step: int, batch_size: int, count: int) -> list[Part]:
        ids, labels, extra = self._sample(
            self.train_scenes, batch_rng(self.seed, self.INDEX, step), batch_size
        )
        supervised = int((labels != IGNORE).sum())  # the loss is their mean over the whole batch
        return [
            functools.partial(
                self._part, ids[rows, :width], labels[rows, :width], extra[rows, :width], supervised
            )
            for rows, width in length_groups(ids, self.tokenizer.pad_token_id, count)
        ]

    def _part(
        self, ids: torch.Tensor, labels: torch.Tensor, extra: torch.Tensor, supervised: int
    ) -> StepResult:
        logits, targets = self._supervised_logits(ids, labels, extra)
        return StepResult(F.cross_entropy(logits, targets, reduction="sum") / supervised, {})

    @torch.no_grad()
    def answer_accuracy(self, scenes, limit: int | None = None) -> dict[str, float]:
        """Share of questions whose answer word is the LM's most likely next token when the scene
        code (the truth, not an image; with an answer slot, the answer in it) stands before the
        prompt: the ceiling for stage 2."""
        tok = self.tokenizer
        rows, extras, answers, kinds = [], [], [], []
        for scene in scenes:
            for qa in scene.qa:
                prefix, extra = self.code(scene, qa.answer)
                rows.append(prefix + tok(f"Question: {qa.question} Short answer:").input_ids)
                extras.append(extra)
                answers.append(tok(f" {qa.answer}", add_special_tokens=False).input_ids[0])
                kinds.append(qa.kind)
        rows, extras, answers, kinds = rows[:limit], extras[:limit], answers[:limit], kinds[:limit]
        correct = []
        for start in range(0, len(rows), 512):
            chunk = rows[start : start + 512]
            # left padding, so every row's last position is its last prompt token
            width = max(map(len, chunk))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in chunk])
            offsets = [width - len(r) for r in chunk]
            extra_ids = self.code.extra_tensor(extras[start : start + 512], width, offsets)
            predicted = self._logits(ids, extra_ids)[:, -1].argmax(-1)
            correct += (predicted == torch.tensor(answers[start : start + 512])).tolist()
        result = {"prefix_answer_accuracy": float(np.mean(correct))}
        for kind in sorted(set(kinds)):
            result[f"prefix_{kind}"] = float(
                np.mean([c for c, k in zip(correct, kinds, strict=True) if k == kind])
            )
        return result

    @torch.no_grad()
    def caption_accuracy(self, scenes) -> float:
        """Share of canonical captions whose every token (and EOS) is the LM's most likely next
        token, teacher-forced, after the true scene code: the captioning ceiling for stage 2."""
        tok = self.tokenizer
        rows, extras, labels = [], [], []
        for scene in scenes:
            prefix, extra = self.code(scene)
            body, target = self.ids(""), [*self.ids(scene.caption, special=False), tok.eos_token_id]
            rows.append(prefix + body + target)
            extras.append(extra)
            labels.append([IGNORE] * (len(prefix) + len(body) - 1) + target + [IGNORE])
        ids, targets = _pad(rows, tok.pad_token_id), _pad(labels, IGNORE)
        predicted = self._logits(ids, self.code.extra_tensor(extras, ids.shape[1])).argmax(-1)
        return 1.0 - ((predicted != targets) & (targets != IGNORE)).any(dim=1).float().mean().item()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        batch = self._sample(
            self.val_scenes, np.random.default_rng(self.seed), min(256, len(self.val_scenes))
        )
        result = {"val_loss": self._loss(*batch).item()}
        if self.prefix != "caption":
            result.update(self.answer_accuracy(self.val_scenes))
            result["prefix_caption_exact"] = self.caption_accuracy(self.val_scenes)
        return result


# The answer slot's word under a caption (no question asked): a word the code already uses.
NO_QUESTION = "no"


class SceneCode:
    """What the language model reads where the image will stand, as token ids per position.

    "caption": the canonical caption. "scene" (the shipped recipe): `synthetic.scene_code`, 12 words
    in a fixed layout, one per query token. "slots" (an experiment, kept as an option): one vector
    per slot (left, middle, right), the sum of the embeddings of its words (" left large red
    circle", or " left no"), repeated over num_query_tokens / 3 positions, so that each position
    holds a whole object. It learnt slower: with otherwise the same recipe, after 1,500 language-model
    steps it answered 0.45 of the test questions from the true code, "scene" 0.60.
    Returns (ids, extra): one id per position, plus the further words summed into it ("slots")."""

    def __init__(self, tokenizer, mode: str, num_query_tokens: int, answer_slot: bool = False):
        self.tokenizer, self.mode, self.length = tokenizer, mode, num_query_tokens
        self.answer_slot = answer_slot
        self.ids = TokenIds(tokenizer)
        self.width = 3 if mode == "slots" else 0
        self._ids: dict[str, int] = {}

    def word(self, text: str) -> int:
        if text not in self._ids:
            ids = self.tokenizer(f" {text}", add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"{text!r} is not one token")
            self._ids[text] = ids[0]
        return self._ids[text]

    def __call__(self, scene, answer: str | None = None) -> tuple[list[int], list[list[int]]]:
        """`answer`: with an answer slot, the answer to the question asked (None: a caption)."""
        if self.mode == "caption":
            ids = self.ids(scene.caption, special=False)
            return ids, [[] for _ in ids]
        if self.mode == "scene":
            # the scene code starts with a space so each of its words is one whole-word token
            ids = self.ids(" " + synthetic.scene_code(scene.objects), special=False)
            if self.answer_slot:
                ids = [*ids, self.word(answer.strip() if answer else NO_QUESTION)]
            return ids, [[] for _ in ids]
        by_position = {o.position: o for o in scene.objects}
        copies = self.length // len(synthetic.POSITIONS)
        ids, extra = [], []
        for position in synthetic.POSITIONS:
            obj = by_position.get(position)
            words = [obj.size, obj.colour, obj.shape] if obj else ["no"]
            ids += [self.word(position)] * copies
            extra += [[self.word(w) for w in words] + [-1] * (self.width - len(words))] * copies
        return ids, extra

    def extra_tensor(
        self, rows: list[list[list[int]]], length: int, offsets: list[int] | None = None
    ) -> torch.Tensor:
        """(batch, length, width) of extra word ids, -1 where none; each row's prefix starts at
        its offset (0 unless the rows are left-padded)."""
        out = torch.full((len(rows), length, self.width), -1, dtype=torch.long)
        if self.width:
            for row, extra in enumerate(rows):
                if extra:
                    start = offsets[row] if offsets else 0
                    out[row, start : start + len(extra)] = torch.tensor(extra)
        return out


def code_embeddings(embedding: nn.Embedding, ids: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """Token embeddings of `ids`, plus the embeddings of the `extra` words (-1: none) summed in."""
    embeds = embedding(ids)
    if extra.shape[-1]:
        keep = (extra >= 0).unsqueeze(-1)
        embeds = embeds + (embedding(extra.clamp(min=0)) * keep).sum(dim=-2)
    return embeds


def sample_questions(scene, rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """Up to `count` (prompt, answer) pairs about `scene`, distinct questions, VQA template."""
    picks = rng.choice(len(scene.qa), min(count, len(scene.qa)), replace=False)
    return [
        (f"Question: {scene.qa[int(i)].question} Short answer:", f" {scene.qa[int(i)].answer}") for i in picks
    ]


def batch_variety(rng: np.random.Generator, prompt_variety: float) -> float:
    """The share of a batch's questions that get instructions or few-shot examples: those rows are
    the batch's longest and set its cost, so they are gathered in a quarter of the batches (each
    holding four times `prompt_variety` of them) rather than spread over every batch."""
    if not prompt_variety:
        return 0.0
    return min(1.0, 4 * prompt_variety) if rng.random() < 0.25 else 0.0


# Earlier chat turns before a chat question in training: one is enough to learn which question
# is asked (the last), and every turn lengthens the batch's longest row, which sets its cost.
MAX_EARLIER_TURNS = 1


# What the chat tab may put before a question (`prompts.chat_prompt`): instructions, as users
# write them, and few-shot examples. The evaluation's instruction is not among these.
INSTRUCTIONS = (
    "Answer the question about the image.",
    "Answer in one word.",
    "Look at the shapes and answer briefly.",
    "You are a helpful assistant. Answer the question.",
    "Give a short answer.",
    "Answer with a colour, a shape, a size, a place, a number, yes or no.",
    "Describe what you see and answer.",
)
# Few-shot examples about no image in particular, beside ones about other scenes.
GENERIC_EXEMPLARS = (
    ChatTurn("what colour is the sky?", "blue"),
    ChatTurn("what is in the picture?", "a circle"),
    ChatTurn("is it a photo?", "no"),
    ChatTurn("how many cats are there?", "two"),
)
MAX_EXEMPLARS = 2


def sample_prompt(
    scene,
    rng: np.random.Generator,
    caption_fraction: float,
    chat_fraction: float = 0.0,
    variety: float = 0.0,
    pool=None,
) -> tuple[str, str]:
    """(prompt, answer) in the app's blip2-opt templates: caption_short is the empty prompt, VQA is
    `Question: {q} Short answer:`; with `chat_fraction`, that share of questions comes as the chat
    tab sends it, after none or one earlier turn about the image (`prompts.chat_prompt`); with
    `variety`, that share (checked first) comes with an instruction and / or few-shot examples
    about other scenes of `pool` (`varied_prompt`). Captions start without a space (they open the
    text); answers continue the prompt, so they start with one."""
    if rng.random() < caption_fraction:
        return "", scene.caption
    qa = scene.qa[int(rng.integers(len(scene.qa)))]
    if variety and rng.random() < variety:
        return varied_prompt(qa.question, rng, pool or [scene]), f" {qa.answer}"
    if chat_fraction and rng.random() < chat_fraction:
        earlier = rng.choice(len(scene.qa), int(rng.integers(0, MAX_EARLIER_TURNS + 1)), replace=False)
        history = [ChatTurn(scene.qa[int(i)].question, scene.qa[int(i)].answer) for i in earlier]
        return chat_prompt(_chat_templates(), qa.question, history).text, f" {qa.answer}"
    return f"Question: {qa.question} Short answer:", f" {qa.answer}"


def varied_prompt(question: str, rng: np.random.Generator, pool) -> str:
    """The question as the chat tab sends it with its extras: one or two few-shot examples (about
    other scenes, whose answers are wrong for this image, or generic ones), an instruction, or
    both; or the quick-answer template after an instruction."""
    templates = _chat_templates()
    instruction = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))] if rng.random() < 0.5 else ""
    if instruction and rng.random() < 0.3:
        return vqa_prompt(templates, question, short=True, instruction=instruction)
    exemplars = []
    # an instruction comes with at most one example: the longest rows set a batch's cost
    for _ in range(int(rng.integers(0, 2)) if instruction else int(rng.integers(1, MAX_EXEMPLARS + 1))):
        if rng.random() < 0.2:
            exemplars.append(GENERIC_EXEMPLARS[int(rng.integers(len(GENERIC_EXEMPLARS)))])
        else:
            other = pool[int(rng.integers(len(pool)))]
            qa = other.qa[int(rng.integers(len(other.qa)))]
            exemplars.append(ChatTurn(qa.question, qa.answer))
    return chat_prompt(templates, question, exemplars=exemplars, instruction=instruction).text


@functools.cache
def _chat_templates():
    return Registry.load().families["instructblip-opt"].templates


def vision_features(
    vision: nn.Module, pixels: torch.Tensor, chunk: int = 256, workers: int = 1
) -> torch.Tensor:
    """The frozen encoder's output for every image, computed once: later phases only read it.
    With `workers` > 1 and one PyTorch thread, that many chunks run side by side, each on its own
    thread: every chunk is the same call on the same single thread, so the features are the same
    bits (with more PyTorch threads the chunks run in turn, as the thread count decides them)."""
    vision.eval()

    def encode(start: int) -> torch.Tensor:
        with torch.no_grad():  # grad mode is per thread
            return vision(pixel_values=pixels[start : start + chunk]).last_hidden_state

    starts = range(0, len(pixels), chunk)
    if workers < 2 or torch.get_num_threads() != 1 or len(starts) < 2:
        return torch.cat([encode(start) for start in starts])
    with ThreadPoolExecutor(workers) as pool:
        return torch.cat(list(pool.map(encode, starts)))


class QFormerPretraining(nn.Module):
    """Stage 1: ITC (max over query tokens of the cosine, as BLIP-2 and the app's `itc`) and ITM
    with hard negatives: the most similar wrong text/image in the batch (sampled by ITC weight, as
    LAVIS does) and a caption with one detail changed, so matching must bind colour, shape, size
    and place to each object. Image-grounded generation is left out: transformers' retrieval
    class has no Q-Former LM head to save it in."""

    INDEX = 2

    def __init__(
        self,
        arch,
        train: ShapesData,
        val: ShapesData,
        processor,
        vision_state: dict,
        seed: int,
        phrase_share: int = 0,  # 0: no object phrases (the classic recipe); else one image in this many
        attribute_weight: float = 0.0,  # weight of the attribute-query loss (0: none)
        feature_workers: int = 1,  # threads computing the frozen encoder's features (`vision_features`)
    ):
        super().__init__()
        self.phrase_share, self.attribute_weight = phrase_share, attribute_weight
        self.model = architecture.new_retrieval_model(arch, processor)
        self.model.vision_model.load_state_dict(vision_state)
        architecture.trainable(self.model.vision_model, False)
        self.model.query_tokens.data.normal_(0.0, 0.02)
        self.log_temperature = nn.Parameter(torch.tensor(0.07).log())
        self.tokenizer, self.train_data, self.val_data, self.seed = processor.tokenizer, train, val, seed
        self.train_features = vision_features(self.model.vision_model, train.pixels, workers=feature_workers)
        self.val_features = vision_features(self.model.vision_model, val.pixels, workers=feature_workers)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _tokens(self, texts: list[str]):
        return self.tokenizer(texts, padding=True, truncation=True, max_length=35, return_tensors="pt")

    def image_embeds(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.vision_projection(query_outputs(self.model, features)), dim=-1)

    def text_embeds(self, tokens) -> torch.Tensor:
        model = self.model
        embeds = model.embeddings(input_ids=tokens.input_ids)
        out = model.qformer(query_embeds=embeds, query_length=0, attention_mask=tokens.attention_mask)
        return F.normalize(model.text_projection(out.last_hidden_state[:, 0]), dim=-1)

    def itm_logits(self, features: torch.Tensor, tokens) -> torch.Tensor:
        model = self.model
        query = model.query_tokens.expand(len(features), -1, -1)
        embeds = model.embeddings(input_ids=tokens.input_ids, query_embeds=query)
        mask = torch.cat([torch.ones(query.shape[:-1], dtype=torch.long), tokens.attention_mask], dim=1)
        out = model.qformer(
            query_embeds=embeds,
            query_length=query.shape[1],
            attention_mask=mask,
            encoder_hidden_states=features,
            encoder_attention_mask=torch.ones(features.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        return model.itm_head(out[:, : query.shape[1]]).mean(dim=1)

    def step(self, step: int, batch_size: int) -> StepResult:
        return self.parts(step, batch_size, 1)[0]()

    # Long because ITC, the hard negatives it picks and the ITM pairs are one recipe, read in order.
    def parts(self, step: int, batch_size: int, count: int) -> list[Part]:
        """The first part: ITC over the whole batch (its in-batch negatives need all of it) and ITM
        on the hard negatives it picks; the other parts share the ITM pairs known beforehand.
        Each part builds its whole graph itself: autograd orders a backward pass by when its nodes
        were made, counted per thread, so a graph begun on another thread sums in another order."""
        rng = batch_rng(self.seed, self.INDEX, step)
        data = self.train_data
        idx = rng.choice(len(data), batch_size, replace=False)
        scenes = [data.scenes[int(i)] for i in idx]
        positives = [s.caption for s in scenes]
        negatives = [perturb(s, rng) for s in scenes]
        # A phrase about one object and its false twin for a quarter of the images (ITM only).
        shared = batch_size // self.phrase_share if self.phrase_share else 0
        phrases = [phrase_pair(s, rng) for s in scenes[:shared]]
        features = self.train_features[torch.from_numpy(idx)]
        tokens = self._tokens(positives + negatives + [p for p, _ in phrases] + [n for _, n in phrases])
        hard_seed = int(rng.integers(2**31))
        attributes = None
        if self.attribute_weight:  # tokenized here, as the captions are: parts may run on other threads
            texts, truth = attribute_queries(scenes, rng)
            attributes = (self._tokens(texts), truth)
        # ITM pairs (image row, text row, label): the positives, the perturbed texts, then the
        # object phrases and their false twins; the hard wrong text per image and wrong image per
        # text follow in the first part. Their loss is the mean over all of them.
        rows, few = torch.arange(batch_size), torch.arange(len(phrases))
        known = (
            torch.cat([rows, rows, few, few]),
            torch.cat([rows, rows + batch_size, few + 2 * batch_size, few + 2 * batch_size + len(few)]),
            torch.cat(
                [torch.ones(batch_size), torch.zeros(batch_size), torch.ones(len(few)), torch.zeros(len(few))]
            ).long(),
        )
        pairs = len(known[0]) + 2 * batch_size

        def itm(images: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            pair_tokens = type(tokens)({k: tokens[k][texts] for k in ("input_ids", "attention_mask")})
            logits = self.itm_logits(features[images], pair_tokens)
            return F.cross_entropy(logits, labels, reduction="sum") / pairs

        def contrastive(known_rows: slice) -> StepResult:
            image = self.image_embeds(features)  # (B, Q, D)
            text = self.text_embeds(
                type(tokens)({k: tokens[k][: 2 * batch_size] for k in ("input_ids", "attention_mask")})
            )  # (2B, D)
            temperature = self.log_temperature.exp().clamp(0.001, 0.5)
            sim = torch.einsum("bqd,td->bqt", image, text).amax(dim=1) / temperature  # (B, 2B)
            target = torch.arange(batch_size)
            itc = (F.cross_entropy(sim, target) + F.cross_entropy(sim[:, :batch_size].t(), target)) / 2
            with torch.no_grad():
                weights = sim[:, :batch_size].float().softmax(dim=1) + 1e-6
                weights.fill_diagonal_(0)
                generator = torch.Generator().manual_seed(hard_seed)
                hard_text = torch.multinomial(weights, 1, generator=generator).squeeze(1)
                hard_image = torch.multinomial(weights.t().contiguous(), 1, generator=generator).squeeze(1)
            # Identical captions are not negatives (two images of one description).
            same = [positives[int(j)] == positives[i] for i, j in enumerate(hard_text)]
            same_img = [positives[int(j)] == positives[i] for i, j in enumerate(hard_image)]
            loss = itm(
                torch.cat([rows, hard_image, known[0][known_rows]]),
                torch.cat([hard_text, rows, known[1][known_rows]]),
                torch.cat([torch.tensor(same + same_img, dtype=torch.long), known[2][known_rows]]),
            )
            logs = {"itc": itc.item(), "itm": loss.item()}
            if attributes is not None:
                attribute = self._attribute_loss(image, temperature, *attributes)
                logs["attr"] = attribute.item()
                loss = loss + self.attribute_weight * attribute
            return StepResult(itc + loss, logs)

        def matching(known_rows: slice) -> StepResult:
            loss = itm(*(column[known_rows] for column in known))
            return StepResult(loss, {"itm": loss.item()})

        if count == 1:
            return [functools.partial(contrastive, slice(None))]
        parts: list[Part] = [functools.partial(contrastive, slice(0, 0))]
        return parts + [functools.partial(matching, rows) for rows in split_rows(len(known[0]), count - 1)]

    def _attribute_loss(
        self, image: torch.Tensor, temperature: torch.Tensor, tokens, truth: torch.Tensor
    ) -> torch.Tensor:
        """Each colour and each shape named alone (`shapes_data.attribute_queries`) against the batch:
        an image ranks the colours it shows above those it does not (and the shapes), as the Explain
        tab's zero-shot labels ask; a text ranks every image it is true of above the others, as a
        search's negative text ("a red shape") needs. A caption names every object, so ITC alone
        never asks for either."""
        sim = torch.einsum("bqd,td->bqt", image, self.text_embeds(tokens)).amax(dim=1) / temperature
        n = len(COLOURS)
        colours = supervised_contrast(sim[:, :n], truth[:, :n])
        shapes = supervised_contrast(sim[:, n:], truth[:, n:])
        return ((colours + shapes) / 2 + supervised_contrast(sim.t(), truth.t())) / 2

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        data = self.val_data
        image = self.image_embeds(self.val_features)
        text = self.text_embeds(self._tokens([s.caption for s in data.scenes]))
        sim = torch.einsum("bqd,td->bqt", image, text).amax(dim=1)  # (images, texts)
        truth = torch.arange(len(data))
        return {
            "t2i_r1": (sim.argmax(dim=0) == truth).float().mean().item(),
            "i2t_r1": (sim.argmax(dim=1) == truth).float().mean().item(),
        }


class GenerativePretraining(nn.Module):
    """Stage 2: query outputs -> language_projection -> soft prompt of the frozen OPT, laid out
    exactly as the engine lays them out (num_query_tokens `<image>` tokens, then the prompt)."""

    INDEX = 3

    def __init__(
        self,
        arch,
        train: ShapesData,
        val: ShapesData,
        processor,
        qformer_tokenizer,
        vision_state: dict,
        qformer_state: dict,
        query_tokens: torch.Tensor,
        lm_state: dict,
        seed: int,
        caption_fraction: float,
        lm_prefix: str = "caption",
        code_loss_weight: float = 0.0,
        text_embeddings_state: dict | None = None,
        chat_fraction: float = 0.0,
        prompt_variety: float = 0.0,
        feature_workers: int = 1,  # threads computing the frozen encoder's features (`vision_features`)
    ):
        super().__init__()
        self.model = architecture.new_captioning_model(arch, processor, qformer_tokenizer)
        self.model.vision_model.load_state_dict(vision_state)
        self.question_aware = arch.question_aware
        if self.question_aware:
            # InstructBLIP starts from the stage-1 Q-Former whole, text embeddings and text layers
            # included (it reads the prompt); its embedding module holds the query LayerNorm.
            state = {
                ("embeddings." + k if k.startswith("layernorm.") else k): v for k, v in qformer_state.items()
            }
            state.update({f"embeddings.{k}": v for k, v in (text_embeddings_state or {}).items()})
            self.model.qformer.load_state_dict(state)
        else:
            # The stage-2 Q-Former has no text feed-forward layers: those stage-1 weights stay behind.
            missing, unexpected = self.model.qformer.load_state_dict(qformer_state, strict=False)
            if missing or any(".intermediate." not in k and ".output." not in k for k in unexpected):
                raise RuntimeError(
                    f"Stage-1 Q-Former does not fit: missing {missing}, unexpected {unexpected}"
                )
        self.model.query_tokens.data.copy_(query_tokens)
        self.model.language_model.load_state_dict(lm_state)
        architecture.trainable(self.model.vision_model, False)
        architecture.trainable(self.model.language_model, False)
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.ids = TokenIds(processor.tokenizer)
        self.image_token = self.tokenizer.convert_tokens_to_ids(processor.image_token.content)
        self.num_query = arch.num_query_tokens
        self.train_data, self.val_data = train, val
        self.seed, self.caption_fraction, self.chat_fraction = seed, caption_fraction, chat_fraction
        self.prompt_variety = prompt_variety
        # The scene code the frozen LM learnt to read: with code_loss_weight, each query output
        # is also pulled towards the LM's embedding of its position of the code (MSE, relative to
        # the code's mean square), a dense signal beside the LM loss on one or two answer tokens.
        self.code = SceneCode(
            self.tokenizer, lm_prefix, arch.num_query_tokens, answer_slot=arch.question_aware
        )
        self.code_loss_weight = code_loss_weight
        if code_loss_weight and lm_prefix == "caption":
            raise ValueError("code_loss_weight needs a fixed-length scene code (lm_prefix scene or slots).")
        self.train_features = vision_features(self.model.vision_model, train.pixels, workers=feature_workers)
        self.val_features = vision_features(self.model.vision_model, val.pixels, workers=feature_workers)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _batch(self, data: ShapesData, rng: np.random.Generator, batch_size: int, caption_fraction: float):
        """(scene indices, ids, labels, prompts, answers): answers[i] is None under a caption."""
        tok = self.tokenizer
        variety = batch_variety(rng, self.prompt_variety)
        ids, labels, idx = [], [], rng.choice(len(data), batch_size, replace=False)
        prompts, answers = [], []
        for i in idx:
            prompt, answer = sample_prompt(
                data.scenes[int(i)], rng, caption_fraction, self.chat_fraction, variety, data.scenes
            )
            head = [self.image_token] * self.num_query + self.ids(prompt)
            target = [*self.ids(answer, special=False), tok.eos_token_id]
            ids.append(head + target)
            labels.append([IGNORE] * (len(head) - 1) + target + [IGNORE])
            prompts.append(prompt)
            answers.append(answer if prompt else None)
        return torch.from_numpy(idx), _pad(ids, tok.pad_token_id), _pad(labels, IGNORE), prompts, answers

    def _qformer_text(self, prompts: list[str]):
        """The prompts as the engine feeds InstructBLIP's Q-Former: through its own tokenizer."""
        if not self.question_aware:
            return None
        return self.processor.qformer_tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")

    def _soft_prompt(self, features: torch.Tensor, text) -> torch.Tensor:
        if text is None:
            return self.model.language_projection(query_outputs(self.model, features))
        return self.model.language_projection(
            query_outputs(self.model, features, text.input_ids, text.attention_mask)
        )

    def _lm_inputs(self, ids: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen LM's input embeddings, the soft prompt `image` in place of the image tokens
        (they come first), and its attention mask."""
        embeds = self.model.get_input_embeddings()(ids)
        embeds = torch.cat([image, embeds[:, self.num_query :]], dim=1)
        return embeds, (ids != self.tokenizer.pad_token_id).long()

    def _logits(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The frozen LM's logits at every position."""
        embeds, mask = self._lm_inputs(ids, image)
        return self.model.language_model(inputs_embeds=embeds, attention_mask=mask).logits

    @torch.no_grad()
    def code_targets(self, scenes, answers=None) -> torch.Tensor:
        """(scenes, num_query, lm_hidden): the frozen LM's embedding of each scene's code (with an
        answer slot, holding `answers[i]`)."""
        codes = [
            self.code(scene, answer)
            for scene, answer in zip(scenes, answers or [None] * len(scenes), strict=True)
        ]
        ids = torch.tensor([c[0] for c in codes])
        extra = self.code.extra_tensor([c[1] for c in codes], ids.shape[1])
        embedding = self.model.get_input_embeddings()
        assert isinstance(embedding, nn.Embedding)  # OPT's token table
        return code_embeddings(embedding, ids, extra)

    def _code_loss(
        self, image: torch.Tensor, idx: torch.Tensor, data: ShapesData, answers=None
    ) -> torch.Tensor:
        target = self.code_targets([data.scenes[int(i)] for i in idx], answers)
        return F.mse_loss(image, target) / target.pow(2).mean()

    def step(self, step: int, batch_size: int) -> StepResult:
        return self.parts(step, batch_size, 1)[0]()

    def parts(self, step: int, batch_size: int, count: int) -> list[Part]:
        rng = batch_rng(self.seed, self.INDEX, step)
        idx, ids, labels, prompts, answers = self._batch(
            self.train_data, rng, batch_size, self.caption_fraction
        )
        supervised = int((labels != IGNORE).sum())  # the LM loss is their mean over the whole batch
        parts: list[Part] = []
        for rows, width in length_groups(ids, self.tokenizer.pad_token_id, count):
            picked = rows.tolist()
            text = self._qformer_text([prompts[i] for i in picked])  # here: parts may run on other threads
            parts.append(
                functools.partial(
                    self._part,
                    idx[rows],
                    ids[rows, :width],
                    labels[rows, :width],
                    text,
                    [answers[i] for i in picked],
                    supervised,
                    len(picked) / batch_size,
                )
            )
        return parts

    def _part(self, idx, ids, labels, text, answers, supervised: int, share: float) -> StepResult:
        image = self._soft_prompt(self.train_features[idx], text)
        logits, targets = supervised_logits(self.model.language_model, *self._lm_inputs(ids, image), labels)
        loss = F.cross_entropy(logits, targets, reduction="sum") / supervised
        if not self.code_loss_weight:
            return StepResult(loss, {})
        code = self._code_loss(image, idx, self.train_data, answers) * share
        return StepResult(loss + self.code_loss_weight * code, {"lm": loss.item(), "code": code.item()})

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Teacher-forced exact match of whole answers (VQA) and captions on the validation split,
        and the code loss over both."""
        result, codes = {}, []
        for name, fraction in (("vqa_exact", 0.0), ("caption_exact", 1.0)):
            rng = np.random.default_rng(self.seed)
            idx, ids, labels, prompts, answers = self._batch(
                self.val_data, rng, min(256, len(self.val_data)), fraction
            )
            image = self._soft_prompt(self.val_features[idx], self._qformer_text(prompts))
            predicted = self._logits(ids, image).argmax(-1)
            wrong = ((predicted != labels) & (labels != IGNORE)).any(dim=1)
            result[name] = 1.0 - wrong.float().mean().item()
            if self.code.mode != "caption":
                codes.append(self._code_loss(image, idx, self.val_data, answers).item())
        if codes:
            result["code_relative_mse"] = float(np.mean(codes))
        return result
