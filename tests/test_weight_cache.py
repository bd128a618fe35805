"""The weight cache (blip2_app/weight_cache.py): a second load reads the quantized model from disk
and gets the same model; changed, damaged or unwritable caches never give a wrong one."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from blip2_app import loading, quantization, weight_cache
from blip2_app.config import Settings
from blip2_app.generation import GenerationSettings
from blip2_app.startup import load_engine
from tests.conftest import GENERATING_MODELS

GREEDY = GenerationSettings(decoding="greedy", max_new_tokens=8)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A cache folder of its own; tiny checkpoints count as large enough to be cached."""
    monkeypatch.setattr(weight_cache, "MIN_CHECKPOINT_BYTES", 0)
    return tmp_path / "weights"


def load(cache_dir, model="tiny-random", **changes):
    changes.setdefault("retrieval_model", "none")
    changes.setdefault("precision", "dynamic-int8")
    return load_engine(Settings(model=model, weight_cache=str(cache_dir), **changes))


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if (p / weight_cache.MANIFEST).is_file())


def assert_same_model(first: torch.nn.Module, second: torch.nn.Module) -> None:
    """Module by module: the same classes, int8 layers with equal rows and scales, equal tensors."""
    modules = dict(second.named_modules(remove_duplicate=False))
    for name, module in first.named_modules(remove_duplicate=False):
        other = modules[name]
        assert type(other) is type(module), name
        if quantization.is_dynamic_int8(module):
            for part, tensor in quantization.int8_parts(module).items():
                assert torch.equal(tensor, quantization.int8_parts(other)[part]), (name, part)
            continue
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            assert torch.equal(tensor, getattr(other, attr)), f"{name}.{attr}"
            assert tensor.dtype == getattr(other, attr).dtype, f"{name}.{attr}"


@pytest.mark.parametrize("name", GENERATING_MODELS)
def test_the_second_load_reads_the_same_model_from_the_cache(cache_dir, images, name):
    first = load(cache_dir, name)
    assert any("written to the weight cache" in n for n in first.text.loaded.notes)
    second = load(cache_dir, name)
    assert any("Read from the weight cache" in n for n in second.text.loaded.notes)
    assert len(entries(cache_dir)) == 1
    assert_same_model(first.text.loaded.model, second.text.loaded.model)
    assert second.caption(images[:2], generation=GREEDY) == first.caption(images[:2], generation=GREEDY)


def test_the_tied_int8_table_and_head_come_back_tied_in_values(cache_dir):
    model = load(cache_dir).text.loaded.model.language_model
    cached = load(cache_dir).text.loaded.model.language_model
    table, head = cached.get_input_embeddings(), cached.get_output_embeddings()
    assert isinstance(table, quantization.Int8Embedding) and quantization.is_dynamic_int8(head)
    assert torch.equal(table.rows, head.weight().int_repr())
    assert torch.equal(table.rows, model.get_input_embeddings().rows)


def test_a_shared_vision_encoder_stays_shared_and_its_fingerprint_is_remembered(
    cache_dir, images, monkeypatch
):
    first = load(cache_dir, retrieval_model="auto")
    hashed = []
    real = loading.vision_fingerprint
    monkeypatch.setattr(loading, "vision_fingerprint", lambda files: hashed.append(files) or real(files))
    second = load(cache_dir, retrieval_model="auto")
    assert hashed == []  # both fingerprints came from the cache
    assert second.matcher.model.vision_model is second.text.loaded.model.vision_model
    assert any("shared with" in note for note in second.matcher.notes)
    assert any("Read from the weight cache" in note for note in second.matcher.notes)
    torch.testing.assert_close(second.itc(images, ["a cat", "a dog"]), first.itc(images, ["a cat", "a dog"]))


def test_a_changed_checkpoint_misses_and_replaces_its_old_entry(cache_dir, tmp_path, images):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(load(cache_dir).text.loaded.checkpoint_path, checkpoint)
    before = load(cache_dir, str(checkpoint))
    old = [
        p
        for p in entries(cache_dir)
        if json.loads((p / "manifest.json").read_text())["checkpoint"] == str(checkpoint)
    ]
    assert len(old) == 1
    weights = checkpoint / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    after = load(cache_dir, str(checkpoint))
    assert any("written to the weight cache" in n for n in after.text.loaded.notes)
    assert not old[0].exists()
    assert after.caption(images[:1], generation=GREEDY) == before.caption(images[:1], generation=GREEDY)


def test_a_damaged_entry_is_removed_and_the_checkpoint_loaded(cache_dir, images, caplog):
    # Captioned before the damage: the first engine serves from the entry's mapped pages, which
    # truncating the file in place takes away (as it would from any process mapping it).
    expected = load(cache_dir).caption(images[:1], generation=GREEDY)
    [entry] = entries(cache_dir)
    shards = json.loads((entry / weight_cache.MANIFEST).read_text())["shards"]
    (entry / shards[-1]).write_bytes(b"not safetensors")
    second = load(cache_dir)
    assert "unreadable" in caplog.text
    assert any("written to the weight cache" in n for n in second.text.loaded.notes)
    assert second.caption(images[:1], generation=GREEDY) == expected


def test_an_entry_missing_tensors_is_not_used(cache_dir, caplog):
    load(cache_dir)
    [entry] = entries(cache_dir)
    from safetensors.torch import load_file, save_file

    shards = json.loads((entry / weight_cache.MANIFEST).read_text())["shards"]
    for shard in shards:
        tensors = load_file(entry / shard)
        dropped = [k for k in tensors if k.endswith(("layernorm.weight", "layer_norm.weight"))]
        if dropped:
            del tensors[dropped[0]]
            save_file(tensors, entry / shard)
            break
    else:
        pytest.fail("no layer norm weight in the cache")
    second = load(cache_dir)
    assert "lacks" in caplog.text
    assert any("written to the weight cache" in n for n in second.text.loaded.notes)


def test_a_cache_that_cannot_be_written_leaves_nothing_behind(cache_dir, monkeypatch, images):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weight_cache, "save_aligned", disk_full)
    engine = load(cache_dir)
    assert any("could not be written" in n for n in engine.text.loaded.notes)
    assert [
        p.name for p in cache_dir.iterdir() if p.name != "fingerprints.json"
    ] == []  # no entry, no staging
    assert len(engine.caption(images[:1], generation=GREEDY)[0][0].token_ids) > 0


def test_off_writes_nothing_and_small_checkpoints_are_not_cached(tmp_path, monkeypatch):
    engine = load("off")
    assert not any("weight cache" in n for n in engine.text.loaded.notes)
    monkeypatch.setenv("BLIP2_WEIGHT_CACHE", str(tmp_path / "auto"))
    assert weight_cache.WeightCache.from_setting("auto").root == tmp_path / "auto"
    load("auto")  # the tiny checkpoint is far under MIN_CHECKPOINT_BYTES
    assert not (tmp_path / "auto").exists() or entries(tmp_path / "auto") == []


def test_only_dynamic_int8_on_cpu_is_cached(cache_dir):
    engine = load_engine(
        Settings(model="tiny-random", precision="bf16", weight_cache=str(cache_dir), retrieval_model="none")
    )
    assert not any("weight cache" in n for n in engine.text.loaded.notes)
    assert not cache_dir.exists() or entries(cache_dir) == []


def test_the_model_tab_says_where_the_cache_is_and_what_this_start_did(cache_dir):
    from blip2_app.ui.report import model_report_markdown

    settings = Settings(
        model="tiny-random", precision="dynamic-int8", weight_cache=str(cache_dir), retrieval_model="none"
    )
    engine = load_engine(settings)
    report = model_report_markdown(engine.info(), engine, settings)
    assert f"`{cache_dir}`" in report and "written to the weight cache" in report
    off = model_report_markdown(engine.info(), engine, settings.replace(weight_cache="off"))
    assert "Off (`--weight-cache off`)" in off


def test_a_load_that_fails_midway_leaves_no_staging_folder(cache_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a layer could not be quantized")

    monkeypatch.setattr(quantization, "weight_only_with_parts", broken)
    with pytest.raises(RuntimeError, match="could not be quantized"):
        load(cache_dir)
    assert [p.name for p in cache_dir.iterdir() if p.name != "fingerprints.json"] == []


# --------------------------------------------------------------------------- int8-weight-only
def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds `tensor`'s data (from /proc/self/maps), or None when it
    lies in anonymous memory (a copy)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


@pytest.mark.parametrize("name", GENERATING_MODELS)
def test_int8_weight_only_maps_the_dynamic_int8_entry_and_captions_as_without_the_cache(
    cache_dir, images, name
):
    packed = load(cache_dir, name)  # writes the entry
    weight_only = load(cache_dir, name, precision="int8-weight-only")
    assert any("Read from the weight cache" in n for n in weight_only.text.loaded.notes)
    assert len(entries(cache_dir)) == 1  # one entry serves both precisions
    entry = entries(cache_dir)[0]
    packed_layers = dict(packed.text.loaded.model.named_modules())
    layers = [
        (n, m)
        for n, m in weight_only.text.loaded.model.named_modules()
        if isinstance(m, quantization.WeightOnlyInt8Linear)
    ]
    assert layers and not any(
        quantization.is_dynamic_int8(m) for m in weight_only.text.loaded.model.modules()
    )
    for layer_name, layer in layers:
        assert torch.equal(layer.rows, quantization.int8_parts(packed_layers[layer_name])["rows"]), layer_name
        # Not copied: the rows are the cache file's pages (anonymous memory does not grow by them).
        assert str(entry) in (mapped_file(layer.rows) or ""), layer_name
        assert layer.uses_kernel == (layer.in_features % 16 == 0), layer_name
    uncached = load("off", name, precision="int8-weight-only")
    assert weight_only.caption(images, generation=GREEDY) == uncached.caption(images, generation=GREEDY)


def test_the_start_that_writes_the_entry_then_serves_from_it(cache_dir, images):
    """The first start maps what it wrote (a bf16 vision encoder included, as on a CPU with AMX),
    so its weights leave anonymous memory as a second start's do, and it captions as before."""
    first = load(cache_dir, vision_precision="bf16")
    assert any("written to the weight cache" in n for n in first.text.loaded.notes)
    entry = entries(cache_dir)[0]
    vision = dict(first.text.loaded.model.vision_model.named_parameters())
    assert {p.dtype for p in vision.values()} == {torch.bfloat16}
    assert all(str(entry) in (mapped_file(p) or "") for p in vision.values())
    uncached = load("off", vision_precision="bf16")
    assert first.caption(images[:2], generation=GREEDY) == uncached.caption(images[:2], generation=GREEDY)


def test_an_entry_written_at_int8_weight_only_loads_at_dynamic_int8_as_quantizing_does(cache_dir, images):
    written = load(cache_dir, precision="int8-weight-only")
    assert any("written to the weight cache" in n for n in written.text.loaded.notes)
    read = load(cache_dir)
    assert any("Read from the weight cache" in n for n in read.text.loaded.notes)
    fresh = load("off")
    assert_same_model(fresh.text.loaded.model, read.text.loaded.model)
    assert read.caption(images[:2], generation=GREEDY) == fresh.caption(images[:2], generation=GREEDY)


def test_every_stored_tensor_starts_aligned(cache_dir):
    """Mapped rows start where they lie in the file, and torch's weight-only kernel crashes on rows
    that are not 16-byte aligned: the cache aligns every tensor to weight_cache.ALIGNMENT."""
    load(cache_dir)
    shards = sorted(entries(cache_dir)[0].glob("*.safetensors"))
    assert shards
    for shard in shards:
        data = shard.read_bytes()
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_size])
        assert (8 + header_size) % weight_cache.ALIGNMENT == 0
        for key, info in header.items():
            if key != "__metadata__" and not key.startswith(weight_cache.PADDING):
                assert info["data_offsets"][0] % weight_cache.ALIGNMENT == 0, (shard.name, key)
