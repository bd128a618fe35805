"""The transformers configs and models for the trained BLIP-2: one source of sizes for all phases.

Dropout is off everywhere: the data is synthetic and plentiful, and without random masks a
training run is a pure function of its seed (needed for exact resume and reproducibility).
"""

from __future__ import annotations

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    Blip2VisionModel,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    OPTConfig,
    OPTForCausalLM,
)

from .config import ArchitectureConfig


def vision_config(arch: ArchitectureConfig) -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=arch.vision_hidden,
        intermediate_size=4 * arch.vision_hidden,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        attention_dropout=0.0,
        # transformers' default (1e-10) assumes pretrained weights are loaded: from scratch it
        # leaves every weight at ~0 and the encoder cannot learn.
        initializer_range=0.02,
    )


def qformer_config(arch: ArchitectureConfig, tokenizer) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=arch.qformer_hidden,
        num_hidden_layers=arch.qformer_layers,
        num_attention_heads=arch.qformer_heads,
        intermediate_size=4 * arch.qformer_hidden,
        encoder_hidden_size=arch.vision_hidden,
        cross_attention_frequency=1,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=arch.qformer_init_range,
    )


def opt_config(arch: ArchitectureConfig, tokenizer) -> OPTConfig:
    return OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.lm_hidden,
        ffn_dim=4 * arch.lm_hidden,
        num_hidden_layers=arch.lm_layers,
        num_attention_heads=arch.lm_heads,
        max_position_embeddings=arch.lm_context,
        word_embed_proj_dim=arch.lm_hidden,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def new_vision_model(arch: ArchitectureConfig) -> Blip2VisionModel:
    return Blip2VisionModel(vision_config(arch))


def new_language_model(arch: ArchitectureConfig, tokenizer) -> OPTForCausalLM:
    return OPTForCausalLM(opt_config(arch, tokenizer))


def captioning_config(
    arch: ArchitectureConfig, processor: Blip2Processor, qformer_tokenizer
) -> Blip2Config | InstructBlipConfig:
    """`qformer_tokenizer`: the one stage 1 trained the Q-Former's word embeddings with."""
    tokenizer = processor.tokenizer
    config_class = InstructBlipConfig if arch.question_aware else Blip2Config
    return config_class(
        vision_config=vision_config(arch).to_dict(),
        qformer_config=qformer_config(arch, qformer_tokenizer).to_dict(),
        text_config=opt_config(arch, tokenizer).to_dict(),
        num_query_tokens=arch.num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content),
    )


def retrieval_config(arch: ArchitectureConfig, processor: Blip2Processor) -> Blip2Config:
    tokenizer = processor.tokenizer
    return Blip2Config(
        vision_config=vision_config(arch).to_dict(),
        qformer_config={**qformer_config(arch, tokenizer).to_dict(), "use_qformer_text_input": True},
        num_query_tokens=arch.num_query_tokens,
        image_text_hidden_size=arch.embed_dim,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content),
    )


def new_captioning_model(
    arch, processor, qformer_tokenizer
) -> Blip2ForConditionalGeneration | InstructBlipForConditionalGeneration:
    model_class = (
        InstructBlipForConditionalGeneration if arch.question_aware else Blip2ForConditionalGeneration
    )
    return model_class(captioning_config(arch, processor, qformer_tokenizer))  # type: ignore[arg-type]  # the config class follows question_aware too


def new_retrieval_model(arch, processor) -> Blip2ForImageTextRetrieval:
    return Blip2ForImageTextRetrieval(retrieval_config(arch, processor))


def trainable(module: torch.nn.Module, flag: bool) -> torch.nn.Module:
    module.requires_grad_(flag)
    return module
