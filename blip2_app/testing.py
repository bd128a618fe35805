"""Tiny, seeded, random BLIP-2 checkpoints of every family, built on the fly.

No model hub is reachable on build machines and no package ships BLIP-2 weights, so tests and
offline runs use checkpoints made here: real transformers classes and processors, tokenizers
trained in a second on a small corpus, saved with `save_pretrained` and loaded back through the
app's normal loader. The registry names them `tiny-random*` with checkpoint `tiny:<family>`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    GPT2Tokenizer,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
    T5Tokenizer,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

# Bump when the recipe changes so cached folders built by an older recipe are not reused.
TINY_VERSION = 6
TINY_FAMILIES = ("blip2-opt", "blip2-t5", "instructblip-vicuna", "instructblip-t5", "blip2-itm")
IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 8
# Every family gets the same vision weights (as the real checkpoints share the frozen ViT-g),
# so sharing one vision encoder between captioning and retrieval can be tested.
VISION_SEED = 1234

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": 8,
}
QFORMER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "encoder_hidden_size": 32,
    "cross_attention_frequency": 1,
    "max_position_embeddings": 128,
}
# 128 wide with 2 heads = 64 per head: a head size vLLM's CPU attention supports.
OPT = {
    "hidden_size": 128,
    "ffn_dim": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 512,
    "word_embed_proj_dim": 128,
}
T5 = {"d_model": 64, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2, "d_ff": 128}
LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "brown"]
THINGS = ["circle", "square", "triangle", "cat", "dog", "car", "teapot", "rocket", "cup", "bowl", "astronaut"]
PLACES = ["on a table", "in the sky", "on a couch", "on the grass", "in a room", "on a blue background"]


def _corpus() -> list[str]:
    lines = []
    for colour in COLOURS:
        for thing in THINGS:
            for place in PLACES:
                lines.append(f"a photo of a {colour} {thing} {place}")
            lines.append(f"Question: what colour is the {thing}? Answer: {colour}.")
            lines.append(f"Question: what is {place}? Short answer: a {thing}")
    lines += ["A short image caption:", "Write a detailed description of the image.", "Describe this image."]
    return lines


def _train(model, pre_tokenizer, decoder, trainer, normalizer=None) -> dict:
    tokenizer = Tokenizer(model)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        tokenizer.decoder = decoder
    tokenizer.train_from_iterator(_corpus(), trainer)
    return json.loads(tokenizer.to_str())["model"]


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def opt_tokenizer() -> GPT2Tokenizer:
    """Byte-level BPE like OPT's: </s> is BOS and EOS, <pad> pads, BOS is prepended."""
    trained = _train(
        models.BPE(),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return GPT2Tokenizer(
        vocab=trained["vocab"],
        # GPT2Tokenizer annotates merges as list[str] but hands them unchanged to
        # tokenizers.models.BPE, whose merges are (left, right) pairs (LlamaTokenizer says `list`).
        merges=_merges(trained),  # type: ignore[arg-type]
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
    )


def t5_tokenizer() -> T5Tokenizer:
    """Unigram like T5's: no BOS, </s> appended, <pad> is also the decoder start."""
    trained = _train(
        models.Unigram(),
        pre_tokenizers.Metaspace(),
        decoders.Metaspace(),
        trainers.UnigramTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"),
        normalizer=normalizers.NFKC(),
    )
    return T5Tokenizer(vocab=[tuple(v) for v in trained["vocab"]], extra_ids=0)


def llama_tokenizer() -> LlamaTokenizer:
    """BPE over Metaspace pieces like Vicuna's: <s> prepended, </s> ends, <unk> pads."""
    trained = _train(
        models.BPE(unk_token="<unk>"),
        pre_tokenizers.Metaspace(),
        decoders.Metaspace(),
        trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]),
    )
    return LlamaTokenizer(vocab=trained["vocab"], merges=_merges(trained), pad_token="<unk>")


def bert_tokenizer() -> BertTokenizer:
    """WordPiece like the Q-Former's BERT tokenizer."""
    trained = _train(
        models.WordPiece(unk_token="[UNK]"),
        pre_tokenizers.BertPreTokenizer(),
        None,
        trainers.WordPieceTrainer(
            vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        ),
        normalizer=normalizers.BertNormalizer(lowercase=True),
    )
    return BertTokenizer(vocab=trained["vocab"])


def _image_processor() -> BlipImageProcessorPil:
    return BlipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


TinyCaptioner = Blip2ForConditionalGeneration | InstructBlipForConditionalGeneration
TinyModel = TinyCaptioner | Blip2ForImageTextRetrieval


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(found, int)  # one token in, one id out (a list comes only for a list)
    return found


def _shared_vision_state(model: TinyModel) -> None:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(VISION_SEED)
    for _, tensor in sorted(model.vision_model.state_dict().items()):
        if tensor.dtype.is_floating_point and tensor.dim() > 1:
            tensor.copy_(torch.randn(tensor.shape) * 0.2)
    torch.random.set_rng_state(generator_state)


def _retrieval_model(
    qformer: dict[str, Any], tokenizer: BertTokenizer
) -> tuple[Blip2Processor, Blip2ForImageTextRetrieval]:
    processor = Blip2Processor(_image_processor(), tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    config = Blip2Config(
        vision_config=VISION,
        qformer_config={**qformer, "use_qformer_text_input": True},
        num_query_tokens=NUM_QUERY_TOKENS,
        image_text_hidden_size=16,
        image_token_index=_token_id(tokenizer, "<image>"),
    )
    return processor, Blip2ForImageTextRetrieval(config)


def _captioning_model(
    family: str, qformer: dict[str, Any], qformer_tokenizer: BertTokenizer
) -> tuple[Blip2Processor | InstructBlipProcessor, TinyCaptioner]:
    make_tokenizer = {"blip2-opt": opt_tokenizer, "instructblip-vicuna": llama_tokenizer}.get(
        family, t5_tokenizer
    )
    tokenizer = make_tokenizer()
    instruct = family.startswith("instructblip")
    # The processor adds the <image> token to the tokenizer: the ids below come after it.
    processor = (
        InstructBlipProcessor(
            _image_processor(), tokenizer, qformer_tokenizer, num_query_tokens=NUM_QUERY_TOKENS
        )
        if instruct
        else Blip2Processor(_image_processor(), tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    )
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if family == "blip2-opt":
        text = {"model_type": "opt", **OPT, **ids, "bos_token_id": tokenizer.bos_token_id}
    elif family == "instructblip-vicuna":
        text = {"model_type": "llama", **LLAMA, **ids, "bos_token_id": tokenizer.bos_token_id}
    else:
        text = {"model_type": "t5", **T5, **ids, "decoder_start_token_id": tokenizer.pad_token_id}
    parts: dict[str, Any] = {
        "vision_config": VISION,
        "qformer_config": qformer,
        "text_config": text,
        "num_query_tokens": NUM_QUERY_TOKENS,
        "image_token_index": _token_id(tokenizer, "<image>"),
    }
    model = (
        InstructBlipForConditionalGeneration(InstructBlipConfig(**parts))
        if instruct
        else Blip2ForConditionalGeneration(Blip2Config(**parts))
    )
    # Random weights at std 0.02 give near-uniform logits; a larger LM head spreads them so
    # greedy, beam and sampled outputs differ and parity tests can tell them apart.
    with torch.no_grad():
        for module in model.language_model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.15)
        model.language_model.get_input_embeddings().weight.normal_(0.0, 0.5)
        model.language_model.get_output_embeddings().weight.normal_(0.0, 1.0)
    return processor, model


def build_tiny_checkpoint(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random checkpoint of `family` into `folder` (model + processor files)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}.")
    folder = Path(folder)
    torch.manual_seed(seed)
    qformer_tokenizer = bert_tokenizer()
    qformer = {
        **QFORMER,
        "vocab_size": len(qformer_tokenizer),
        "pad_token_id": qformer_tokenizer.pad_token_id,
    }
    processor: Blip2Processor | InstructBlipProcessor
    model: TinyModel
    if family == "blip2-itm":
        processor, model = _retrieval_model(qformer, qformer_tokenizer)
    else:
        processor, model = _captioning_model(family, qformer, qformer_tokenizer)
    with torch.no_grad():
        _shared_vision_state(model)
        model.query_tokens.normal_(0.0, 0.5)
        # Likewise a wider bridge, so different images give different captions.
        for module in model.qformer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.3)
        for name in ("language_projection", "vision_projection"):
            if hasattr(model, name):
                getattr(model, name).weight.normal_(0.0, 0.5)
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_cache_dir() -> Path:
    return Path(os.environ.get("BLIP2_TINY_CACHE", Path.home() / ".cache" / "blip2-studio" / "tiny"))


def ensure_tiny_checkpoint(family: str, seed: int = 0) -> Path:
    """The cached folder for `family`, built on first use (atomically: concurrent builders are safe)."""
    target = tiny_cache_dir() / f"{family}-v{TINY_VERSION}-seed{seed}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
    try:
        build_tiny_checkpoint(family, scratch, seed=seed)
        try:
            os.replace(scratch, target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
