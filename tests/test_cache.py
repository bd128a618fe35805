"""The vision-feature cache: chat turns reuse the image work; the LRU stays within its bounds."""

import pytest
import torch

from blip2_app.cache import FeatureCache
from blip2_app.config import Settings
from blip2_app.generation import GenerationSettings
from blip2_app.prompts import ChatTurn
from blip2_app.startup import load_engine


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", ["tiny-random", "tiny-random-instructblip"])
def test_second_chat_turn_does_not_run_the_vision_encoder(images, name):
    engine = load_engine(Settings(model=name, retrieval_model="none"))
    vision = count_calls(engine.text.loaded.model.vision_model)
    qformer = count_calls(engine.text.loaded.model.qformer)
    greedy = GenerationSettings(decoding="greedy", max_new_tokens=4)
    first = engine.chat(images[0], "what is this?", generation=greedy)
    assert vision[0] == 1
    engine.chat(
        images[0].copy(), "and then?", history=[ChatTurn("what is this?", first.text)], generation=greedy
    )
    list(engine.chat_stream(images[0], "why?", generation=greedy))
    assert vision[0] == 1
    if not engine.text.entry.family.instruction_aware:
        assert qformer[0] == 1  # BLIP-2: the Q-Former output is cached too
    engine.chat(images[1], "what is this?", generation=greedy)
    assert vision[0] == 2


def test_cache_hit_gives_identical_output(load_tiny, images):
    engine = load_tiny("tiny-random", retrieval_model="none")
    greedy = GenerationSettings(decoding="greedy", max_new_tokens=8)
    engine.cache.clear()
    cold = engine.caption([images[2]], generation=greedy)
    warm = engine.caption([images[2]], generation=greedy)
    assert cold[0][0].token_ids == warm[0][0].token_ids


def test_lru_bounds_entries_and_bytes():
    cache = FeatureCache(max_entries=3, max_bytes=1000)
    for i in range(5):
        cache.put(i, torch.zeros(10))  # 40 bytes each
    stats = cache.stats()
    assert stats.entries == 3 and stats.evictions == 2
    assert cache.get(0) is None and cache.get(4) is not None
    cache.get(2)  # now most recently used
    cache.put(5, torch.zeros(10))
    assert cache.get(2) is not None and cache.get(3) is None
    cache.put("big", torch.zeros(200))  # 800 bytes: evicts until the total fits 1000
    assert cache.stats().bytes <= 1000
    cache.put("huge", torch.zeros(1000))  # larger than the whole cache: not stored
    assert cache.get("huge") is None


def test_disabled_cache_stores_nothing(images):
    engine = load_engine(Settings(model="tiny-random", retrieval_model="none", cache_entries=0))
    vision = count_calls(engine.text.loaded.model.vision_model)
    greedy = GenerationSettings(decoding="greedy", max_new_tokens=2)
    engine.answer(images[0], "what?", generation=greedy)
    engine.answer(images[0], "what?", generation=greedy)
    assert vision[0] == 2 and engine.cache.stats().entries == 0
