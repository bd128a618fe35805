"""Chat prefix reuse (issue 20, point 3): turn N+1 prefills only what turn N did not read or write.

The language model's forward passes are watched with a hook: the first pass of a turn is its
prefill, and its length is the number of positions computed afresh. Parity is token for token
against the same prompt without reuse (fp32, the tiny model's precision: every position is then
computed by the same per-token arithmetic; see docs/performance.md for dynamic-int8).
"""

from __future__ import annotations

import gc

import pytest
import torch

from blip2_app.chat_prefix import CachedPrefix, PrefixBudget, common_prefix_length
from blip2_app.config import Settings
from blip2_app.engine import Engine
from blip2_app.prompts import ChatTurn, clean_answer
from blip2_app.ui.sessions import ChatSession
from blip2_app.ui.tabs.chat import ChatHandlers

QUESTIONS = ("what is in the picture?", "what colour is it?", "where is it?", "why is it there?")
BIG = 2**30  # a budget nothing here comes near


@pytest.fixture(scope="module")
def engine(load_tiny) -> Engine:
    engine = load_tiny("tiny-random")
    assert engine.text.loaded.model.language_model.dtype == torch.float32
    return engine


@pytest.fixture(scope="module")
def greedy(engine):
    return engine.default_generation().replace(decoding="greedy", max_new_tokens=12, num_captions=1)


@pytest.fixture(scope="module")
def photo(engine, images):
    return engine.prepare(images[0])[0]


@pytest.fixture
def passes(engine):
    """The sequence length of every forward pass of the language model, in order."""
    lengths: list[int] = []

    def hook(module, args, kwargs):
        tensor = kwargs.get("inputs_embeds")
        tensor = tensor if tensor is not None else kwargs["input_ids"]
        lengths.append(tensor.shape[1])

    handle = engine.text.loaded.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    yield lengths
    handle.remove()


def prompt_of(engine, question, history, generation) -> str:
    return engine.build_chat_prompt(question, history, generation=generation).text


def prompt_ids(engine, image, prompt) -> list[int]:
    """The language model's input ids (image tokens first), as the backend builds them."""
    return engine.text.generate_inputs([image], [prompt])["input_ids"][0].tolist()


def generated(stream) -> list[int]:
    return [token for chunk in stream for token in chunk]


def turn(engine, image, prompt, generation, slot=None) -> list[int]:
    """New token ids for `prompt`: with `slot`, through the reuse path; without, the plain one."""
    backend = engine.text
    if slot is None:
        return generated(backend.stream_ids(image, prompt, generation))
    return generated(backend.stream_chat_ids(image, prompt, generation, slot))


def answer_text(engine, ids) -> str:
    return clean_answer(engine.text.decode(ids), engine.text.entry.templates)


def chat_for_turns(engine, image, generation, slot, questions=QUESTIONS) -> list[ChatTurn]:
    history: list[ChatTurn] = []
    for question in questions:
        ids = turn(engine, image, prompt_of(engine, question, history, generation), generation, slot)
        history.append(ChatTurn(question, answer_text(engine, ids)))
    return history


# --------------------------------------------------------------------------- parity
def test_greedy_tokens_are_the_same_with_and_without_reuse(engine, greedy, photo):
    slot = PrefixBudget(BIG).slot()
    history: list[ChatTurn] = []
    for question in QUESTIONS:
        prompt = prompt_of(engine, question, history, greedy)
        reused = turn(engine, photo, prompt, greedy, slot)
        assert reused == turn(engine, photo, prompt, greedy), f"turn {len(history) + 1} differs"
        assert reused, "the model wrote something (the comparison would mean nothing otherwise)"
        # The model's own answer is history for the next turn, as in the app.
        history.append(ChatTurn(question, answer_text(engine, reused)))
    held = slot.held
    assert held is not None and held.cache.get_seq_length() == len(held.token_ids)


def test_seeded_sampling_is_the_same_with_and_without_reuse(engine, photo):
    """The chat's default decoding samples: with a seed the same tokens come out either way."""
    sampling = engine.default_generation().replace(decoding="nucleus", max_new_tokens=12, seed=7)
    slot = PrefixBudget(BIG).slot()
    history = chat_for_turns(engine, photo, sampling, slot, QUESTIONS[:2])
    prompt = prompt_of(engine, QUESTIONS[2], history, sampling)
    assert slot.held is not None
    assert turn(engine, photo, prompt, sampling, slot) == turn(engine, photo, prompt, sampling)


def test_the_chat_tab_answers_the_same_with_and_without_reuse(engine, photo):
    def conversation(handlers: ChatHandlers) -> tuple[list, ChatSession]:
        session = None
        knobs = {"decoding": "greedy", "max_new_tokens": 12}
        for question in QUESTIONS[:3]:
            messages, session = list(handlers.chat(photo, question, None, "", **knobs, session=session))[-1]
        # Edit the last question, then regenerate: both change the history under the cache.
        messages, session = list(
            handlers.edit_last(photo, "and the shape?", None, "", **knobs, session=session)
        )[-1]
        messages, session = list(handlers.regenerate(photo, None, "", **knobs, session=session))[-1]
        return messages, session

    reusing = ChatHandlers(engine, Settings(model="tiny-random"))
    plain = ChatHandlers(engine, Settings(model="tiny-random", chat_prefix_mb=0))
    messages, session = conversation(reusing)
    assert messages == conversation(plain)[0]
    assert session.prefix is not None and session.prefix.held is not None
    assert len(reusing.prefixes) == 1, "one session, one cached prefix"
    assert plain.prefixes is None


# --------------------------------------------------------------------------- what is prefilled
def test_turn_two_prefills_only_what_turn_one_did_not_see(engine, greedy, photo, passes):
    slot = PrefixBudget(BIG).slot()
    first_prompt = prompt_of(engine, QUESTIONS[0], [], greedy)
    first_ids = prompt_ids(engine, photo, first_prompt)
    answer = turn(engine, photo, first_prompt, greedy, slot)
    assert passes[0] == len(first_ids), "turn 1 prefills the image tokens and the whole prompt"
    cached = slot.held.token_ids
    assert list(cached) == (first_ids + answer)[: len(cached)]

    history = [ChatTurn(QUESTIONS[0], answer_text(engine, answer))]
    second_prompt = prompt_of(engine, QUESTIONS[1], history, greedy)
    second_ids = prompt_ids(engine, photo, second_prompt)
    passes.clear()
    reused = turn(engine, photo, second_prompt, greedy, slot)
    shared = common_prefix_length(cached, second_ids)
    assert shared >= len(first_ids), "the image tokens and the first question are reused"
    assert passes[0] == len(second_ids) - shared
    assert passes[1:] == [1] * (len(passes) - 1), "then one token a step, as always"

    passes.clear()
    assert turn(engine, photo, second_prompt, greedy) == reused
    assert passes[0] == len(second_ids), "without reuse everything is prefilled again"


# --------------------------------------------------------------------------- invalidation
def test_undo_cuts_the_cache_back_to_what_still_matches(engine, greedy, photo, passes):
    slot = PrefixBudget(BIG).slot()
    history = chat_for_turns(engine, photo, greedy, slot, QUESTIONS[:3])
    stale = slot.held.token_ids
    undone = history[:-1]  # the last question and answer are gone
    prompt = prompt_of(engine, "is it big?", undone, greedy)
    ids = prompt_ids(engine, photo, prompt)
    shared = common_prefix_length(stale, ids)
    assert shared < len(stale), "the cache holds the removed turn, which must not be reused"
    passes.clear()
    assert turn(engine, photo, prompt, greedy, slot) == turn(engine, photo, prompt, greedy)
    assert passes[0] == len(ids) - shared


def test_an_edited_question_reuses_only_the_turns_before_it(engine, greedy, photo, passes):
    slot = PrefixBudget(BIG).slot()
    history = chat_for_turns(engine, photo, greedy, slot, QUESTIONS[:2])
    # Edit: the last turn's question is replaced, its answer written again.
    edited = prompt_of(engine, "what shape is it?", history[:-1], greedy)
    ids = prompt_ids(engine, photo, edited)
    shared = common_prefix_length(slot.held.token_ids, ids)
    passes.clear()
    assert turn(engine, photo, edited, greedy, slot) == turn(engine, photo, edited, greedy)
    assert passes[0] == len(ids) - shared


def test_another_image_is_prefilled_in_full(engine, greedy, images, passes):
    first, second = engine.prepare(images[:2])
    slot = PrefixBudget(BIG).slot()
    prompt = prompt_of(engine, QUESTIONS[0], [], greedy)
    turn(engine, first, prompt, greedy, slot)
    # The same question about another image has the same token ids (every image token has one
    # id), so only the image tells the cached prefix is not this prompt's.
    ids = prompt_ids(engine, second, prompt)
    assert common_prefix_length(slot.held.token_ids, ids) == len(ids)
    passes.clear()
    assert turn(engine, second, prompt, greedy, slot) == turn(engine, second, prompt, greedy)
    assert passes[0] == len(ids)


def test_the_same_prompt_again_prefills_one_token(engine, greedy, photo, passes):
    """A prompt the cache holds whole (regenerate after an empty answer) still needs the logits
    of its last position: that one is computed again, nothing else."""
    slot = PrefixBudget(BIG).slot()
    prompt = prompt_of(engine, QUESTIONS[0], [], greedy)
    first = turn(engine, photo, prompt, greedy, slot)
    passes.clear()
    assert turn(engine, photo, prompt, greedy, slot) == first
    assert passes[0] == 1


@pytest.mark.parametrize("model", ["tiny-random-t5", "tiny-random-instructblip"])
def test_families_that_reread_the_prompt_do_not_reuse(load_tiny, images, model):
    """T5's encoder reads the whole prompt at once and InstructBLIP's Q-Former reads it too (its
    image tokens change with it): nothing is kept, and the answers are as without reuse."""
    engine = load_tiny(model)
    generation = engine.default_generation().replace(decoding="greedy", max_new_tokens=8)
    image = engine.prepare(images[0])[0]
    slot = PrefixBudget(BIG).slot()
    history = chat_for_turns(engine, image, generation, slot, QUESTIONS[:2])
    prompt = prompt_of(engine, QUESTIONS[2], history, generation)
    assert turn(engine, image, prompt, generation, slot) == turn(engine, image, prompt, generation)
    assert slot.held is None


def test_a_backend_without_reuse_streams_as_before(engine, greedy, photo):
    """vLLM's backend has no `stream_chat_ids` (its server caches prefixes itself): a chat with a
    slot streams through `stream_ids` and the slot stays empty."""

    class WithoutReuse:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name == "stream_chat_ids":
                raise AttributeError(name)
            return getattr(self._inner, name)

    plain = Engine(WithoutReuse(engine.text), cache=engine.cache)
    slot = PrefixBudget(BIG).slot()
    events = list(plain.chat_stream(photo, QUESTIONS[0], generation=greedy, prefix=slot))
    assert events[-1] == list(engine.chat_stream(photo, QUESTIONS[0], generation=greedy))[-1]
    assert slot.held is None


# --------------------------------------------------------------------------- memory bounds
def fake(nbytes: int, tag: int = 0) -> CachedPrefix:
    return CachedPrefix(("model", tag), (1, 2, 3), object(), nbytes)


def test_a_session_holds_one_prefix_and_it_is_the_cache_size(engine, greedy, photo):
    budget = PrefixBudget(BIG)
    slot = budget.slot()
    chat_for_turns(engine, photo, greedy, slot, QUESTIONS[:3])
    held = slot.held
    config = engine.text.config.text_config
    # Keys and values, every layer, fp32: what the cache really holds, and all it holds.
    expected = 2 * config.num_hidden_layers * config.hidden_size * 4 * len(held.token_ids)
    assert held.nbytes == expected
    assert len(budget) == 1 and budget.held_bytes == expected


def test_the_budget_empties_the_least_recently_used_sessions_first():
    budget = PrefixBudget(250)
    first, second, third = (budget.slot() for _ in range(3))
    first.keep(fake(100, 1))
    second.keep(fake(100, 2))
    first.keep(fake(100, 3))  # the first session's next turn: it is now the most recent
    third.keep(fake(100, 4))
    assert second.held is None and budget.evictions == 1
    assert first.held.key == ("model", 3) and third.held.key == ("model", 4)
    assert len(budget) == 2 and budget.held_bytes == 200


def test_a_prefix_larger_than_the_budget_is_not_kept():
    budget = PrefixBudget(250)
    small, large = budget.slot(), budget.slot()
    small.keep(fake(100))
    large.keep(fake(300))
    assert large.held is None and small.held is not None and budget.evictions == 0


def test_a_taken_prefix_is_out_of_the_slot_and_the_budget():
    budget = PrefixBudget(250)
    slot = budget.slot()
    slot.keep(fake(100))
    taken = slot.take()
    assert taken is not None and slot.held is None and slot.take() is None
    assert len(budget) == 0 and budget.held_bytes == 0


def test_an_ended_session_frees_its_prefix():
    budget = PrefixBudget(250)
    session = ChatSession("hash", prefix=budget.slot())
    session.prefix.keep(fake(100))
    assert len(budget) == 1
    del session  # Gradio drops a session's state when it expires or --max-sessions is reached
    gc.collect()
    assert len(budget) == 0 and budget.held_bytes == 0


def test_sessions_share_the_global_budget_in_the_chat_tab(engine, photo):
    """Three visitors, room for two prefixes: the oldest visitor's prefix goes, and their next
    turn (prefilled in full) still answers as without reuse."""
    knobs = {"decoding": "greedy", "max_new_tokens": 12}

    def first_turn(handlers: ChatHandlers) -> ChatSession:
        return list(handlers.chat(photo, "what is it?", None, "", **knobs))[-1][1]

    size = first_turn(ChatHandlers(engine, Settings(model="tiny-random"))).prefix.held.nbytes
    handlers = ChatHandlers(engine, Settings(model="tiny-random"))
    handlers.prefixes = PrefixBudget(size * 5 // 2)  # each session's first turn is the same size
    sessions = [first_turn(handlers) for _ in range(3)]
    assert [s.prefix.held is not None for s in sessions] == [False, True, True]
    assert len(handlers.prefixes) == 2 and handlers.prefixes.held_bytes == 2 * size
    assert len({id(s.prefix) for s in sessions}) == 3, "one slot per session"

    again = list(handlers.chat(photo, "and the colour?", None, "", **knobs, session=sessions[0]))[-1][0]
    plain = ChatHandlers(engine, Settings(model="tiny-random", chat_prefix_mb=0))
    alone = first_turn(plain)
    assert again == list(plain.chat(photo, "and the colour?", None, "", **knobs, session=alone))[-1][0]


# --------------------------------------------------------------------------- the stop signal
def test_closing_a_reusing_stream_stops_the_generation(engine, photo, passes):
    long = engine.default_generation().replace(
        decoding="greedy", max_new_tokens=400, min_new_tokens=400, no_repeat_ngram_size=0
    )
    short = long.replace(max_new_tokens=12, min_new_tokens=1)
    slot = PrefixBudget(BIG).slot()
    history = chat_for_turns(engine, photo, short, slot, QUESTIONS[:1])
    prompt = prompt_of(engine, QUESTIONS[1], history, long)

    passes.clear()
    stream = engine.text.stream_chat_ids(photo, prompt, long, slot)
    for _ in range(3):
        next(stream)
    stream.close()  # what a cancelled request does; returns once the worker has stopped
    stopped = len(passes)
    assert stopped < 200, f"{stopped} forward passes after a close; the answer asked for 400"
    # Kept as far as it went: the prompt and each generated token but the last (one per pass).
    held = slot.held
    ids = prompt_ids(engine, photo, prompt)
    assert held is not None and held.cache.get_seq_length() == len(held.token_ids) == len(ids) + stopped - 1

    # The cancelled answer never became history: the next turn cuts it off and answers as usual.
    prompt = prompt_of(engine, QUESTIONS[2], history, short)
    assert turn(engine, photo, prompt, short, slot) == turn(engine, photo, prompt, short)


# --------------------------------------------------------------------------- the setting
def test_the_budget_is_a_setting_with_a_flag_a_variable_and_docs():
    from pathlib import Path

    from blip2_app.errors import SettingsError

    assert Settings().chat_prefix_mb == 256
    assert Settings.from_sources(["--chat-prefix-mb", "64"], env={}).chat_prefix_mb == 64
    assert Settings.from_sources([], env={"BLIP2_CHAT_PREFIX_MB": "0"}).chat_prefix_mb == 0
    with pytest.raises(SettingsError, match="chat_prefix_mb"):
        Settings(chat_prefix_mb=-1)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert "`--chat-prefix-mb` (`BLIP2_CHAT_PREFIX_MB`)" in docs


def test_the_chat_tab_sizes_its_budget_from_the_setting(engine):
    assert (
        ChatHandlers(engine, Settings(model="tiny-random", chat_prefix_mb=3)).prefixes.max_bytes == 3 * 2**20
    )


# --------------------------------------------------------------------------- the benchmark
@pytest.mark.parametrize("exemplars", [0, 2])
def test_the_chat_turns_benchmark_runs_on_the_tiny_model(tmp_path, exemplars):
    """benchmarks/chat_turns.py's logic (the real-size run is the lead's): turn 2 prefills less
    with reuse, both ways write the same tokens, and the result files are written."""
    import argparse
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "chat_turns.py"
    spec = importlib.util.spec_from_file_location("chat_turns", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(
        model="tiny-random",
        precision="auto",
        repeats=1,
        threads=0,
        answers="natural",
        int8_kernels="fbgemm",
        exemplars=exemplars,
    )
    results = bench.run(args)
    bench.write(results, tmp_path)
    plain, reuse = results["results"]["no_reuse"], results["results"]["reuse"]
    # With natural answers (as a trained model writes) all of turn 1 is reused: its prompt and its
    # answer but the last token, which was never fed; only the new question is prefilled.
    reused = plain["turn1_prefill_positions"] + bench.TOKENS - 1
    assert reuse["turn2_prefill_positions"] == plain["turn2_prefill_positions"] - reused
    assert reuse["turn1_prefill_positions"] == plain["turn1_prefill_positions"]
    assert reuse["kept_prefix_bytes"] > 0 == plain["kept_prefix_bytes"]
    assert results["same_answers"] is True
    name = f"chat_turns_{exemplars}shot" if exemplars else "chat_turns"
    assert json.loads((tmp_path / f"{name}.json").read_text()) == results
    assert "| reuse |" in (tmp_path / f"{name}.md").read_text()
    if exemplars:  # the examples are part of what turn 1 prefills, so of what turn 2 reuses
        without = bench.run(argparse.Namespace(**{**vars(args), "exemplars": 0}))["results"]["no_reuse"]
        assert plain["turn1_prefill_positions"] > without["turn1_prefill_positions"]


def test_the_benchmark_s_natural_answers_are_what_the_chat_writes(engine, photo):
    """The scripted answers reach the chat as the intended sentences (the hook steers greedy)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "chat_turns.py"
    spec = importlib.util.spec_from_file_location("chat_turns", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.one_chat(engine, photo, None, "natural")
    for number, ids in enumerate(bench.natural_ids(engine), start=1):
        assert result[f"turn{number}_answer"] == engine.text.tokenizer.decode(ids).strip()
