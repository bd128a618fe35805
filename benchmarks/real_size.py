"""Speed and memory on the REAL blip2-opt-2.7b architecture, with random weights.

No hub is reachable here, so the published architecture (ViT-g 1408 x 39 layers, Q-Former 768 x 12,
OPT-2.7B 2560 x 32, 32 query tokens) and the blip2-itm-vit-g retrieval model (same ViT-g weights)
are built from their configs with the models' own initialisation (LayerNorm 1, bias 0), saved as
fp32 safetensors like the hub checkpoints (15.5 GB + 4.7 GB, built once into --workdir), and then
loaded by each configuration in its own process, so memory peaks (load included) are separate.
Output lengths are forced (min_new_tokens = max_new_tokens) so random weights cannot change the
work done. Every configuration is measured in ONE run, side by side, and compared with the naive
baseline a user copies from the model card (fp32 transformers, no feature cache).

    python benchmarks/real_size.py                       # everything, ~30 min on 2 cores
    python benchmarks/real_size.py --configs dynamic-int8 --repeats 1
    python benchmarks/real_size.py --device cuda --configs fp16,int8,nf4 --batch 8   # see gpu.sh
    python benchmarks/real_size.py --serving    # start-up, CLI, 8 concurrent captions, chat turns
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAPTION_TOKENS = 20
CHAT_TOKENS = 10
INDEX_IMAGES = 16
CPU_CONFIGS = ("naive-fp32", "bf16", "int8", "nf4", "dynamic-int8")
RETRIEVAL_CONFIGS = ("naive-fp32", "dynamic-int8")
LOW_MEMORY = "+low-memory"  # a config such as "dynamic-int8+low-memory": the app's --low-memory


def precision_of(config: str) -> str:
    return config.removesuffix(LOW_MEMORY)


# ----------------------------------------------------------------------------- memory
class MemorySampler:
    """Peak RSS and peak RssAnon of this process (anonymous memory is what gets a process killed;
    the checkpoint's memory-mapped file pages count in RSS but can be dropped by the kernel)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_rss = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        status = Path("/proc/self/status").read_text()
        return {
            k: int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) * 1024
            for k in ("VmRSS", "RssAnon", "VmHWM")
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.read()
            self.peak_rss = max(self.peak_rss, now["VmRSS"], now["VmHWM"])
            self.peak_anon = max(self.peak_anon, now["RssAnon"])
            time.sleep(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        now = self.read()
        self.peak_rss = max(self.peak_rss, now["VmHWM"])
        self.peak_anon = max(self.peak_anon, now["RssAnon"])


def read_bandwidth_gbs(device: str = "cpu") -> float:
    """Memory read bandwidth of the device the model runs on: summing a 2 GB buffer (far larger
    than the caches), best of 4 (the first call may set up kernels)."""
    import torch

    buffer = torch.ones(512 * 1024 * 1024, dtype=torch.float32, device=device)
    best = 0.0
    for _ in range(4):
        started = time.perf_counter()
        buffer.sum()
        _sync()
        best = max(best, buffer.numel() * 4 / (time.perf_counter() - started) / 1e9)
    return best


def _sync() -> None:
    """Waits for queued GPU work, so that a timing covers it (CUDA calls return before it ends)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- checkpoints
def architecture(layers_divisor: int = 1):
    from transformers import Blip2Config

    vision = {
        "hidden_size": 1408,
        "intermediate_size": 6144,
        "num_hidden_layers": 39 // layers_divisor,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "qkv_bias": True,
    }
    qformer = {
        "hidden_size": 768,
        "num_hidden_layers": 12 // layers_divisor,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "cross_attention_frequency": 2,
        "encoder_hidden_size": 1408,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
    }
    opt = {
        "model_type": "opt",
        "hidden_size": 2560,
        "ffn_dim": 10240,
        "num_hidden_layers": 32 // layers_divisor,
        "num_attention_heads": 32,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 2560,
        "do_layer_norm_before": True,
        "bos_token_id": 2,
        "eos_token_id": 50118,
        "pad_token_id": 1,
    }
    return Blip2Config, vision, qformer, opt


def build_checkpoints(workdir: Path, layers_divisor: int, device: str = "cpu") -> tuple[Path, Path]:
    """blip2-opt-2.7b and blip2-itm-vit-g architectures, random weights, fp32 safetensors (once),
    initialised on `device` (a GPU draws 3.9 B random numbers in a second, a CPU in a minute)."""
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor

    from blip2_app import testing

    captioner_dir, itm_dir = workdir / "blip2-opt-2.7b-random", workdir / "blip2-itm-vit-g-random"
    if (captioner_dir / "config.json").exists() and (itm_dir / "config.json").exists():
        return captioner_dir, itm_dir
    workdir.mkdir(parents=True, exist_ok=True)
    config_class, vision, qformer, opt = architecture(layers_divisor)
    # The tiny tokenizers stand in for OPT's and BERT's (their ids are valid in the real vocabularies).
    tokenizer, bert = testing.opt_tokenizer(), testing.bert_tokenizer()
    image_processor = testing.BlipImageProcessorPil(
        size={"height": 224, "width": 224},
        image_mean=testing.OPENAI_CLIP_MEAN,
        image_std=testing.OPENAI_CLIP_STD,
    )
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=32)
    config = config_class(
        vision_config=vision,
        qformer_config=qformer,
        text_config=opt,
        num_query_tokens=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config)  # post_init: the model's own initialisation
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)  # zeros by default: all 32 queries would be identical
    query_tokens = model.query_tokens.detach().clone()
    print(
        f"built captioner ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params) "
        f"in {time.perf_counter() - started:.0f}s",
        flush=True,
    )
    model.save_pretrained(captioner_dir)
    processor.save_pretrained(captioner_dir)
    vision_state = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    del model
    gc.collect()
    itm_processor = Blip2Processor(image_processor, bert, num_query_tokens=32)  # adds <image> to bert
    itm_config = config_class(
        vision_config=vision,
        qformer_config={**qformer, "use_qformer_text_input": True},
        num_query_tokens=32,
        image_text_hidden_size=256,
        image_token_index=bert.convert_tokens_to_ids("<image>"),
    )
    with torch.device(device):
        itm = Blip2ForImageTextRetrieval(itm_config)
    itm.vision_model.load_state_dict(vision_state)  # BLIP-2 keeps the ViT-g frozen: same weights
    with torch.no_grad():
        itm.query_tokens.copy_(query_tokens)
    del vision_state
    itm.save_pretrained(itm_dir)
    itm_processor.save_pretrained(itm_dir)
    del itm
    gc.collect()
    return captioner_dir, itm_dir


# ----------------------------------------------------------------------------- measuring
def timed(fn, repeats: int, warmup: int = 0) -> tuple[float, object]:
    """Median seconds of `repeats` calls, after `warmup` untimed ones (on a GPU the first call of
    each new shape picks and loads kernels: a tenth of a second, more than the call itself)."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        _sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def test_images(count: int):
    import numpy as np
    from PIL import Image

    photos = sorted((ROOT / "assets" / "examples").glob("*"))
    images = [Image.open(p).convert("RGB") for p in photos]
    rng = np.random.RandomState(0)
    while len(images) < count:
        images.append(Image.fromarray((rng.rand(256, 256, 3) * 255).astype("uint8")))
    return images[:count]


def worker(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    config, device, repeats = args.worker, args.device, args.repeats
    # Other processes on a shared machine slow a run down: the load average is recorded with it.
    results: dict = {
        "config": config,
        "device": device,
        "threads": torch.get_num_threads(),
        "load_avg_at_start": round(os.getloadavg()[0], 2),
    }
    images = test_images(max(INDEX_IMAGES, args.batch))
    with MemorySampler() as memory:
        started = time.perf_counter()
        if args.retrieval:
            results.update(measure_retrieval(args, images, repeats))
        else:
            results.update(measure_captioning(args, images, repeats))
        results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["load_avg_at_end"] = round(os.getloadavg()[0], 2)
    results["peak_rss_gib"] = round(memory.peak_rss / 2**30, 2)
    results["peak_rss_anon_gib"] = round(memory.peak_anon / 2**30, 2)
    results["peak_rss_anon_gb"] = round(memory.peak_anon / 1e9, 2)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        results["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return results


def _forced(generation_tokens: int, **kw):
    from blip2_app.generation import GenerationSettings

    return GenerationSettings(
        max_new_tokens=generation_tokens, min_new_tokens=generation_tokens, no_repeat_ngram_size=0, **kw
    )


def measure_captioning(args, images, repeats) -> dict:
    import numpy as np
    import torch

    out: dict = {}
    started = time.perf_counter()
    naive = args.worker.startswith("naive")
    if naive:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        processor = Blip2Processor.from_pretrained(args.checkpoint)
        model = Blip2ForConditionalGeneration.from_pretrained(args.checkpoint)  # the model card's code, fp32
        model.to(args.device).eval()
        dtype = torch.float32
    else:
        from blip2_app.config import Settings
        from blip2_app.startup import load_engine

        engine = load_engine(
            Settings(
                model=str(args.checkpoint),
                retrieval_model="none",
                precision=precision_of(args.worker),
                low_memory=args.worker.endswith(LOW_MEMORY),
                device=args.device,
                packing="startup",  # steady-state timings and the load as one figure
            )
        )
        loaded = engine.text.loaded
        model, processor = loaded.model, loaded.processor
        dtype = loaded.component_dtype("vision")
        out["report"] = loaded.report()
    out["load_seconds"] = round(time.perf_counter() - started, 1)
    device = model.device if naive else engine.text.loaded.device
    # CPU kernels need no warm-up and CPU calls take seconds; CUDA sets up kernels on first call.
    warm = 1 if torch.device(device).type == "cuda" else 0
    image = images[0]
    prompt = "Question: what is in the image? Answer:"

    # Vision encoder alone, one image and a batch.
    with torch.inference_mode():
        pixels = processor.image_processor([image], return_tensors="pt").pixel_values.to(device, dtype)
        model.vision_model(pixel_values=pixels)  # warm-up: the first call sets up kernels
        out["vision_s_per_image"] = round(
            timed(lambda: model.vision_model(pixel_values=pixels), repeats)[0], 3
        )
        batch = processor.image_processor(images[: args.batch], return_tensors="pt").pixel_values.to(
            device, dtype
        )
        t, _ = timed(lambda: model.vision_model(pixel_values=batch), max(1, repeats - 1), warm)
        out[f"vision_s_per_image_batch{args.batch}"] = round(t / args.batch, 3)

    if naive:
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(args.device)

        def generate(tokens: int, **kw):
            generation = _forced(tokens, **kw)
            with torch.inference_mode():
                return model.generate(**inputs, **generation.generate_kwargs())

        with torch.inference_mode():
            lm_inputs = None
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            features = model.get_image_features(inputs["pixel_values"]).pooler_output
            mask = (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1)
            lm_inputs = {
                "inputs_embeds": embeds.masked_scatter(mask, features),
                "attention_mask": inputs["attention_mask"],
            }
        caption_fn = lambda: generate(CAPTION_TOKENS, decoding="greedy")
        beam_fn = lambda: generate(CAPTION_TOKENS, decoding="beam", num_beams=5)
        chat_fn = lambda: generate(CHAT_TOKENS, decoding="greedy")
        turn2_fn = chat_fn  # no feature cache: the second turn redoes the image
        clear = lambda: None
        decode_fn = generate
        logits_fn = lambda: model.language_model(**lm_inputs).logits[0, -1].float()
    else:
        from blip2_app.prompts import ChatTurn

        lm_inputs = engine.text.generate_inputs(engine.prepare([image]), [prompt])
        lm_inputs = {k: v for k, v in lm_inputs.items() if k != "input_ids"} | (
            {"input_ids": lm_inputs["input_ids"]} if "input_ids" in lm_inputs else {}
        )

        def decode_fn(tokens: int, **kw):
            return engine.generate_ids([image], [prompt], _forced(tokens, **kw))

        def caption_fn():
            return engine.caption(
                [image], prompt=prompt, style="custom", generation=_forced(CAPTION_TOKENS, decoding="greedy")
            )

        def beam_fn():
            return engine.caption(
                [image],
                prompt=prompt,
                style="custom",
                generation=_forced(CAPTION_TOKENS, decoding="beam", num_beams=5),
            )

        def chat_fn():
            return engine.chat(
                image, "what is in the image?", generation=_forced(CHAT_TOKENS, decoding="greedy")
            )

        def turn2_fn():
            return engine.chat(
                image,
                "what colour is it?",
                history=[ChatTurn("what is in the image?", "a cat")],
                generation=_forced(CHAT_TOKENS, decoding="greedy"),
            )

        clear = engine.cache.clear

        def logits_fn():
            call = {k: v for k, v in lm_inputs.items() if k != "input_ids"}
            return model.language_model(**call).logits[0, -1].float()

    with torch.inference_mode():
        prefill_kwargs = {k: v for k, v in lm_inputs.items() if k != "input_ids"}
        out["prompt_tokens"] = int(prefill_kwargs["attention_mask"].shape[1])
        out["prefill_s"] = round(timed(lambda: model.language_model(**prefill_kwargs), repeats, warm)[0], 3)
        logits = logits_fn().cpu()
        out["logits_finite"] = bool(torch.isfinite(logits).all())
        out["llm_bytes_per_token"] = bytes_read_per_token(model.language_model)
    # Decode speed: the difference between 1 and 21 forced tokens, features cached (engine).
    decode_fn(1, decoding="greedy")
    one, _ = timed(lambda: decode_fn(1, decoding="greedy"), repeats, warm)
    many, _ = timed(lambda: decode_fn(CAPTION_TOKENS + 1, decoding="greedy"), repeats, warm)
    out["decode_s_per_token"] = round((many - one) / CAPTION_TOKENS, 4)

    def cold(fn):
        def run():
            clear()
            return fn()

        return run

    out["caption_greedy_20_s"] = round(timed(cold(caption_fn), repeats, warm)[0], 2)
    if not naive and args.batch > 1:
        batch_fn = lambda: engine.caption(
            images[: args.batch], generation=_forced(CAPTION_TOKENS, decoding="greedy")
        )
        out[f"caption_greedy_20_batch{args.batch}_s_per_image"] = round(
            timed(cold(batch_fn), max(1, repeats - 1), warm)[0] / args.batch, 2
        )
    out["caption_beam5_20_s"] = round(timed(cold(beam_fn), max(1, repeats - 1), warm)[0], 2)
    firsts, seconds = [], []
    for _ in range(warm):
        clear()
        chat_fn(), turn2_fn()
    for _ in range(repeats):
        clear()
        firsts.append(timed(chat_fn, 1)[0])
        seconds.append(timed(turn2_fn, 1)[0])
    out["chat_turn1_s"] = round(statistics.median(firsts), 2)
    out["chat_turn2_s"] = round(statistics.median(seconds), 2)

    # Quality against the fp32 reference logits of the same input (written by the naive run).
    reference = Path(args.workdir) / "reference_logits.npy"
    if naive:
        np.save(reference, logits.numpy())
    elif reference.exists():
        ref = torch.from_numpy(np.load(reference))
        out["logits_cosine_vs_fp32"] = round(
            float(torch.nn.functional.cosine_similarity(ref, logits, dim=0)), 5
        )
        out["top1_matches_fp32"] = bool(ref.argmax() == logits.argmax())
        top = ref.topk(10).indices
        out["top10_overlap_vs_fp32"] = len(set(top.tolist()) & set(logits.topk(10).indices.tolist())) / 10
    return out


def measure_retrieval(args, images, repeats) -> dict:
    import torch

    out: dict = {}
    started = time.perf_counter()
    if args.worker.startswith("naive"):
        from transformers import Blip2ForImageTextRetrieval, Blip2Processor

        processor = Blip2Processor.from_pretrained(args.itm)
        model = Blip2ForImageTextRetrieval.from_pretrained(args.itm)
        model.eval()
        out["load_seconds"] = round(time.perf_counter() - started, 1)

        def index():
            with torch.inference_mode():
                for i in range(0, INDEX_IMAGES, 8):
                    px = processor.image_processor(images[i : i + 8], return_tensors="pt").pixel_values
                    embeds = model.vision_model(pixel_values=px).last_hidden_state
                    query = model.query_tokens.expand(px.shape[0], -1, -1)
                    q = model.qformer(query_embeds=query, encoder_hidden_states=embeds).last_hidden_state
                    torch.nn.functional.normalize(model.vision_projection(q), dim=-1)
    else:
        from blip2_app.config import Settings
        from blip2_app.startup import load_engine

        engine = load_engine(
            Settings(
                model=str(args.checkpoint),
                retrieval_model=str(args.itm),
                precision=precision_of(args.worker),
                low_memory=args.worker.endswith(LOW_MEMORY),
                device=args.device,
                packing="startup",  # steady-state timings and the load as one figure
            )
        )
        out["load_seconds"] = round(time.perf_counter() - started, 1)
        out["vision_shared"] = engine.matcher.model.vision_model is engine.text.loaded.model.vision_model
        out["report_matcher"] = engine.matcher.report()

        def index():
            engine.cache.clear()
            engine.image_features(images[:INDEX_IMAGES])

    seconds, _ = timed(index, max(1, repeats - 1), 1 if args.device.startswith("cuda") else 0)
    out["index_images_per_s"] = round(INDEX_IMAGES / seconds, 2)
    return out


# ----------------------------------------------------------------------------- driver
def run_all(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir).expanduser()
    if args.layers_divisor > 1:
        workdir = workdir.with_name(f"{workdir.name}-div{args.layers_divisor}")
    captioner_dir, itm_dir = build_checkpoints(workdir, args.layers_divisor, args.device)
    configs = args.configs.split(",")
    bandwidth_before = read_bandwidth_gbs(args.device)
    rows = []
    for config in configs:
        jobs = [(config, False)] + ([(config, True)] if config in args.retrieval_configs.split(",") else [])
        for name, retrieval in jobs:
            label = name + (" +retrieval" if retrieval else "")
            print(f"== {label}", flush=True)
            command = [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--checkpoint",
                str(captioner_dir),
                "--itm",
                str(itm_dir),
                "--workdir",
                str(workdir),
                "--device",
                args.device,
                "--repeats",
                str(args.repeats),
                "--batch",
                str(args.batch),
            ]
            if retrieval:
                command.append("--retrieval")
            if args.threads:
                command += ["--threads", str(args.threads)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(result.stderr[-3000:], flush=True)
                rows.append({"config": label, "error": result.stderr.strip().splitlines()[-1:]})
                continue
            row = json.loads(result.stdout.strip().splitlines()[-1])
            row["config"] = label
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("report")}), flush=True)
            rows.append(row)
            write_results(args, rows, bandwidth_before)  # so that a run cut short keeps its rows
    # The higher of two readings: a lower bandwidth would flatter every "x floor" figure.
    bandwidth = max(bandwidth_before, read_bandwidth_gbs(args.device))
    print(write_results(args, rows, bandwidth))


# The serving columns (issue 20): each comes from its own script, run here on the same checkpoint
# one after another, its own files written next to this table's.
SERVING_SCRIPTS = ("cold_start.py", "chat_turns.py", "concurrent_captions.py", "caption_profile.py")


def run_serving(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir).expanduser()
    captioner_dir, _ = build_checkpoints(workdir, args.layers_divisor, args.device)
    out = Path(args.out)
    for script in args.serving_scripts.split(","):
        if script not in SERVING_SCRIPTS:
            raise SystemExit(f"--serving-scripts: {script!r} is not one of {', '.join(SERVING_SCRIPTS)}")
        print(f"== {script}", flush=True)
        # The app's CPU default: dynamic-int8, the vision encoder in bf16 on a CPU with AMX (0012).
        extra = ["--precision", "auto"] if script != "cold_start.py" else []
        command = [sys.executable, str(ROOT / "benchmarks" / script), "--model", str(captioner_dir), *extra]
        result = subprocess.run([*command, "--out", str(out)], check=False)
        if result.returncode != 0:
            print(f"{script} failed (status {result.returncode}); its columns stay empty", flush=True)
    print(write_serving(out))


def write_serving(out: Path) -> str:
    """One table from the serving scripts' JSON files: the app against the naive baseline."""

    def read(name: str) -> dict:
        path = out / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    cold, chat, concurrent = read("cold_start"), read("chat_turns"), read("concurrent_captions")
    starts = cold.get("rows", {})
    turns = chat.get("results", {})
    modes = concurrent.get("modes", {})

    def cell(value, unit: str = "") -> str:
        return "" if value is None else f"{value}{unit}"

    def eight(mode: str) -> str:
        row = modes.get(mode, {})
        if not row:
            return ""
        return f"{row.get('concurrent_total_s')} s ({row.get('ratio')}x one alone, {row.get('identical')} identical)"

    app = [
        "app, CPU default (auto)",
        cell(starts.get("app-first", {}).get("seconds")),
        cell(starts.get("app-second", {}).get("seconds")),
        cell(starts.get("cli-second", {}).get("seconds")),
        cell(starts.get("cli-second", {}).get("peak_anon_gb")),
        eight("batched"),
        cell(turns.get("reuse", {}).get("turn1_s")),
        cell(turns.get("reuse", {}).get("turn2_s")),
    ]
    before = [
        "app, CPU default, no cache / batching / reuse",
        "",
        cell(starts.get("app-first", {}).get("seconds")),
        cell(starts.get("cli-first", {}).get("seconds")),
        cell(starts.get("cli-first", {}).get("peak_anon_gb")),
        eight("one-at-a-time"),
        cell(turns.get("no_reuse", {}).get("turn1_s")),
        cell(turns.get("no_reuse", {}).get("turn2_s")),
    ]
    naive = [
        "naive (model card script, fp32)",
        "",
        "",
        cell(starts.get("model-card", {}).get("seconds")),
        cell(starts.get("model-card", {}).get("peak_anon_gb")),
        "",
        "",
        "",
    ]
    lines = [
        "# Real size: start-up and serving (blip2-opt-2.7b architecture, random weights)",
        "",
        "Columns from `python benchmarks/real_size.py --serving` (one run, one checkpoint, one after "
        "another): starts and the CLI from cold_start.md, 8 concurrent captions from "
        "concurrent_captions.md, chat turns from chat_turns.md, profile in caption_profile.md. "
        "'no cache / batching / reuse' is the app as before issue 20 where the same run can show it: "
        "its start without the weight cache is the first start (which writes the cache), its CLI "
        "run the first one, 8 captions one at a time, chat turns without prefix reuse.",
        "",
        "| | first start s | second start s | CLI one photo s (end to end, precision auto) | CLI peak RssAnon GB "
        "| 8 concurrent 20-token captions | chat turn 1 s | chat turn 2 s |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
        *["| " + " | ".join(row) + " |" for row in (app, before, naive)],
    ]
    when = {"cold_start": cold.get("when"), "chat_turns": chat.get("measured_at")}
    lines += [
        "",
        "When each script last ran (a script can be rerun alone; its columns then come from a later "
        "run than the others'): "
        + ", ".join(f"{name}.md {stamp}" for name, stamp in when.items() if stamp)
        + "; concurrent_captions.md and caption_profile.md give theirs in their own text.",
    ]
    background, startup = starts.get("app-second", {}), starts.get("app-second-startup", {})
    if background.get("packed_s") and startup:
        lines += [
            "",
            "Second start with `--packing background` (the default: serves while the int8 layers are "
            f"packed, decision 0011): `/healthz` 200 at {background.get('seconds')} s, a first caption "
            f"sent then done at {background.get('first_caption_s')} s, every layer packed at "
            f"{background.get('packed_s')} s; with `--packing startup` (packed before serving): "
            f"`/healthz` 200 at {startup.get('seconds')} s, first caption done at "
            f"{startup.get('first_caption_s')} s.",
        ]
    packed = starts.get("cli-dynamic-int8", {})
    if packed:
        lines += [
            "",
            "The CLI at `--precision auto` runs one photo at int8-weight-only (decision 0009); the same "
            f"command at `--precision dynamic-int8` (cache read and packed) took {packed.get('seconds')} s, "
            f"peak RssAnon {packed.get('peak_anon_gb')} GB, in the same run.",
        ]
    text = "\n".join(lines) + "\n"
    (out / "real_size_serving.md").write_text(text)
    return text


def bytes_read_per_token(language_model) -> int:
    """Weight bytes one decoding step must read: every Linear layer of the language model, the LM
    head included (an embedding table is only looked up, one row per token, unless it is tied to
    the head, in which case it is counted as the head)."""
    import torch

    total = 0
    for module in language_model.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            # int8: one byte per weight (from the shape: unpacking .weight() would copy it)
            total += module.in_features * module.out_features
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def write_results(args, rows: list[dict], bandwidth: float) -> str:
    """Writes the JSON and markdown results; returns the markdown."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    for row in rows:
        weights = row.get("llm_bytes_per_token")
        if weights and "decode_s_per_token" in row:
            floor = weights / (bandwidth * 1e9)
            row["llm_weight_gb"] = round(weights / 1e9, 2)
            row["decode_floor_s"] = round(floor, 4)
            row["decode_vs_floor"] = round(row["decode_s_per_token"] / floor, 2)
    naive = next((r for r in rows if r["config"] == "naive-fp32"), None)
    if naive and "caption_greedy_20_s" in naive:
        for row in rows:
            if "caption_greedy_20_s" in row:
                row["caption_speedup_vs_naive"] = round(
                    naive["caption_greedy_20_s"] / row["caption_greedy_20_s"], 2
                )
    machine = {
        "processor": platform.processor() or platform.machine(),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        ),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "read_bandwidth_gbs": round(bandwidth, 1),
        "layers_divisor": args.layers_divisor,
        "device": args.device,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    (out_dir / f"real_size{suffix}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    columns = [
        ("config", "configuration"),
        ("load_seconds", "load s"),
        ("vision_s_per_image", "vision s/img"),
        (f"vision_s_per_image_batch{args.batch}", f"vision s/img (batch {args.batch})"),
        ("prefill_s", "prefill s"),
        ("decode_s_per_token", "decode s/token"),
        ("decode_floor_s", "floor s/token"),
        ("decode_vs_floor", "x floor"),
        ("caption_greedy_20_s", "20-token caption s"),
        ("caption_speedup_vs_naive", "speed-up"),
        ("caption_beam5_20_s", "5-beam caption s"),
        ("chat_turn1_s", "chat turn 1 s"),
        ("chat_turn2_s", "chat turn 2 s"),
        ("index_images_per_s", "index img/s"),
        ("peak_rss_anon_gib", "peak RssAnon GiB"),
        ("peak_rss_anon_gb", "peak RssAnon GB"),
        ("peak_rss_gib", "peak RSS GiB"),
        *([("peak_cuda_gib", "peak CUDA GiB")] if any("peak_cuda_gib" in row for row in rows) else []),
        ("logits_cosine_vs_fp32", "logits cos vs fp32"),
        ("top10_overlap_vs_fp32", "top-10 overlap"),
    ]
    lines = [
        f"# Real-size benchmark: blip2-opt-2.7b architecture, random weights ({machine['date']})",
        "",
        f"Machine: {', '.join(filter(None, [machine.get('gpu'), machine['cpu_model']]))}, {machine['cores']} cores, torch {machine['torch']}, device {args.device}; "
        f"measured read bandwidth {machine['read_bandwidth_gbs']} GB/s. Medians of {args.repeats} runs. "
        f"Caption and chat lengths forced ({CAPTION_TOKENS} and {CHAT_TOKENS} new tokens). Each row is its own "
        "process; memory peaks include loading, in GiB (2^30 bytes: the unit of the model card's 14.4 GB for fp32, "
        "3.87 B parameters x 4 bytes) and, for RssAnon, also in GB (10^9 bytes). The app's +retrieval row loads "
        "the captioning AND the retrieval model (blip2-itm-vit-g architecture); the naive +retrieval row loads "
        f"the retrieval model alone with plain transformers. Both index {INDEX_IMAGES} images. The floor is the language model's weight bytes read per token (every Linear layer, the LM head included) / read bandwidth.",
        "",
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "")) for key, _ in columns) + " |")
    (out_dir / f"real_size{suffix}.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default=",".join(CPU_CONFIGS))
    parser.add_argument("--retrieval-configs", default=",".join(RETRIEVAL_CONFIGS))
    parser.add_argument(
        "--workdir", default=os.environ.get("BLIP2_BENCH_DIR", "~/.cache/blip2-studio/real-size")
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--layers-divisor", type=int, default=1, help="shrink layer counts (smoke tests only)"
    )
    parser.add_argument(
        "--serving",
        action="store_true",
        help="start-up and serving columns instead (cold_start, chat_turns, concurrent_captions, caption_profile)",
    )
    parser.add_argument(
        "--serving-scripts",
        default=",".join(SERVING_SCRIPTS),
        help="with --serving: the scripts to run again (the table reads the others' last files)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--itm", help=argparse.SUPPRESS)
    parser.add_argument("--retrieval", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        print(json.dumps(worker(args)))
    elif args.serving:
        run_serving(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
