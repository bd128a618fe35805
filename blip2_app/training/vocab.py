"""Tokenizers and processors for the models trained here, built from the synthetic text.

A byte-level BPE like OPT's for the language model and a WordPiece like BERT's for the Q-Former,
in which every word of the synthetic corpus is one token. Whole-word tokens matter
twice: the tiny LM learns faster, and the app's `no_repeat_ngram_size=3` counts token trigrams,
so a word split into pieces could repeat a trigram where the words do not.
"""

from __future__ import annotations

from tokenizers import pre_tokenizers
from transformers import BertTokenizer, Blip2Processor, GPT2Tokenizer, InstructBlipProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from . import synthetic

# The app's prompt templates (registry.json, blip2-opt): their words should be tokens too.
PROMPT_TEXT = (
    "Question: what is it? Short answer: yes",
    "Question: Describe this image in detail. Answer: a",
    "A short image caption: Describe this image. Write a detailed description of the image.",
)


def corpus() -> list[str]:
    # imported here: phases imports the engine, and vocab must stay light
    from .phases import GENERIC_EXEMPLARS, INSTRUCTIONS

    extras = [*INSTRUCTIONS, *(f"Question: {t.question} Answer: {t.answer}." for t in GENERIC_EXEMPLARS)]
    return [*synthetic.iter_corpus(), *PROMPT_TEXT, *extras]


def _words(pre_tokenizer) -> list[str]:
    """The corpus' pre-tokenized pieces, sorted: a fixed order whatever the platform."""
    pieces = {piece for line in corpus() for piece, _ in pre_tokenizer.pre_tokenize_str(line)}
    return sorted(pieces)


def opt_tokenizer() -> GPT2Tokenizer:
    """Byte-level BPE with OPT's conventions: </s> is BOS and EOS, <pad> pads, BOS is prepended.

    The merges are built, not learned: `tokenizers`' BPE trainer breaks ties between equally
    frequent pairs in no fixed order, which changed token ids from run to run and so broke
    reproducible training. Here every space-prefixed corpus word ("Ġred") is merged left to right
    into one token; every merge starts with "Ġ", so merges of different words never compete.
    Other text (line starts, unknown words) falls back to bytes, as in any byte-level BPE."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", *alphabet])}
    merges: list[tuple[str, str]] = []
    for word in _words(pre_tokenizers.ByteLevel(add_prefix_space=False)):
        if not word.startswith("Ġ"):
            continue
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                merges.append((word[: end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)
    return GPT2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # pairs are what the tokenizer builds merges from; the stub says str
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
    )


def bert_tokenizer(**settings) -> BertTokenizer:
    """WordPiece with BERT's conventions and a fixed vocabulary: every lower-cased corpus word, and
    single characters (plain and "##") for anything else."""
    words = _words(pre_tokenizers.BertPreTokenizer())
    words = sorted({w.lower() for w in words})
    characters = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,:;?!'-"))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for token in [*characters, *(f"##{c}" for c in characters), *words]:
        if token not in tokens:
            tokens.append(token)
    return BertTokenizer(vocab={token: index for index, token in enumerate(tokens)}, **settings)


def image_processor(image_size: int) -> BlipImageProcessorPil:
    return BlipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


# What the question-aware Q-Former reads of a prompt: its last 64 tokens (its position table's
# length), so in a long chat it sees the question being asked rather than the first turns.
QFORMER_PROMPT_TOKENS = 64


def processors(
    image_size: int, num_query_tokens: int, question_aware: bool = False
) -> tuple[Blip2Processor | InstructBlipProcessor, Blip2Processor]:
    """(captioning processor with the OPT tokenizer, retrieval processor with the BERT tokenizer).
    `question_aware`: the captioning processor is InstructBLIP's, with the BERT tokenizer for the
    Q-Former's reading of the prompt.

    Blip2Processor adds the `<image>` token to each tokenizer, so vocabulary sizes are read after."""
    captioning: Blip2Processor | InstructBlipProcessor
    if question_aware:
        qformer_tokenizer = bert_tokenizer(model_max_length=QFORMER_PROMPT_TOKENS, truncation_side="left")
        captioning = InstructBlipProcessor(
            image_processor(image_size), opt_tokenizer(), qformer_tokenizer, num_query_tokens=num_query_tokens
        )
    else:
        captioning = Blip2Processor(
            image_processor(image_size), opt_tokenizer(), num_query_tokens=num_query_tokens
        )
    retrieval = Blip2Processor(
        image_processor(image_size), bert_tokenizer(), num_query_tokens=num_query_tokens
    )
    return captioning, retrieval
