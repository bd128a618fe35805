"""Evaluation metrics, written here and checked against hand-computed values (tests/test_metrics.py).

- VQA accuracy: the official VQAv2 formula, min(#humans who gave the answer / 3, 1) averaged over
  the 10 leave-one-out subsets of the 10 human answers, after the official answer normalisation
  (punctuation, articles, number words, contractions; the lists are those of the official
  `vqaEval.py`). One deliberate difference: the official script normalises only when the ten
  answers disagree; here prediction and answers are always normalised, so "2" and "two" match.
- BLEU-4 and CIDEr-D as pycocoevalcap computes them (corpus BLEU with the closest reference
  length; CIDEr-D with document frequencies over the references, sigma = 6, clipped counts, x10),
  on lower-cased text split at whitespace with punctuation removed (pycocoevalcap runs the
  Stanford PTB tokenizer first, which needs Java; for plain English captions the two agree).
- Retrieval recall@K in both directions from a similarity matrix.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

# --------------------------------------------------------------------------- VQA

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# Copied as the official script has it, look-behind typo included ("(?!<=\d)" is a look-ahead that
# never matches, so every period not followed by a digit is removed).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy of one prediction against the human answers (10 in VQAv2; any number works)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer.")
    predicted = normalize_answer(prediction)
    normalized = [normalize_answer(a) for a in answers]
    if len(normalized) == 1:
        return float(predicted == normalized[0])
    scores = []
    for leave_out in range(len(normalized)):
        others = normalized[:leave_out] + normalized[leave_out + 1 :]
        scores.append(min(1.0, others.count(predicted) / 3.0))
    return sum(scores) / len(scores)


def mean_vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    if len(predictions) != len(answers):
        raise ValueError("one list of answers per prediction")
    return float(np.mean([vqa_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)]))


# --------------------------------------------------------------------------- captions


def tokenize(text: str) -> list[str]:
    """Lower case, punctuation removed, split at whitespace."""
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _all_ngrams(words: Sequence[str], max_n: int = 4) -> Counter:
    counts: Counter = Counter()
    for n in range(1, max_n + 1):
        counts.update(_ngrams(words, n))
    return counts


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n as pycocoevalcap's BleuScorer (option "closest") computes them."""
    if len(hypotheses) != len(references):
        raise ValueError("one list of references per hypothesis")
    tiny, small = 1e-15, 1e-9
    guess = [0] * max_n
    correct = [0] * max_n
    test_length = ref_length = 0
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        words = tokenize(hypothesis)
        ref_words = [tokenize(r) for r in refs]
        test_length += len(words)
        # the closest reference length; ties go to the shorter reference
        ref_length += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(words, n)
            max_ref: Counter = Counter()
            for r in ref_words:
                for gram, count in _ngrams(r, n).items():
                    max_ref[gram] = max(max_ref[gram], count)
            correct[n - 1] += sum(min(count, max_ref[gram]) for gram, count in counts.items())
            guess[n - 1] += max(0, len(words) - n + 1)
    scores = []
    product = 1.0
    for n in range(max_n):
        product *= (correct[n] + tiny) / (guess[n] + small)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (test_length + tiny) / (ref_length + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    return bleu(hypotheses, references)[3]


def cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0, max_n: int = 4
) -> tuple[float, list[float]]:
    """CIDEr-D (pycocoevalcap's `Cider`): (corpus mean, per-image scores)."""
    if len(hypotheses) != len(references):
        raise ValueError("one list of references per hypothesis")
    refs = [[_all_ngrams(tokenize(r), max_n) for r in group] for group in references]
    tests = [_all_ngrams(tokenize(h), max_n) for h in hypotheses]
    document_frequency: Counter = Counter()
    for group in refs:
        document_frequency.update({gram for counts in group for gram in counts})
    log_images = math.log(float(len(refs)))

    def vector(counts: Counter):
        vec: list[dict] = [dict() for _ in range(max_n)]
        norm = [0.0] * max_n
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            vec[n][gram] = tf * (log_images - math.log(max(1.0, document_frequency[gram])))
            norm[n] += vec[n][gram] ** 2
            if n == 1:  # pycocoevalcap counts bigrams as the "length"; only differences matter
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def similarity(hyp, ref) -> list[float]:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        delta = float(len_h - len_r)
        values = []
        for n in range(max_n):
            value = sum(
                min(w, vec_r[n].get(gram, 0.0)) * vec_r[n].get(gram, 0.0) for gram, w in vec_h[n].items()
            )
            if norm_h[n] != 0 and norm_r[n] != 0:
                value /= norm_h[n] * norm_r[n]
            values.append(value * math.exp(-(delta**2) / (2 * sigma**2)))
        return values

    scores = []
    for test, group in zip(tests, refs, strict=True):
        hyp = vector(test)
        total = np.zeros(max_n)
        for ref in group:
            total += similarity(hyp, vector(ref))
        scores.append(float(np.mean(total) / len(group) * 10.0))
    return float(np.mean(scores)), scores


def objects_named(caption: str, objects: Sequence[tuple[str, str]]) -> bool:
    """True when the caption names every (colour, shape) pair as the two words "colour shape"."""
    words = tokenize(caption)
    pairs = set(itertools.pairwise(words))
    return all((colour, shape) in pairs for colour, shape in objects)


# --------------------------------------------------------------------------- retrieval


def recall_at_k(similarity: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways for a square (images x texts) matrix whose diagonal holds the matches.

    Ties rank the correct item after the wrong ones (a constant score scores zero)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError("recall_at_k needs a square (images x texts) similarity matrix")
    diagonal = np.diag(similarity)
    # rank = how many candidates score at least as high as the correct one, besides itself
    text_to_image = (similarity >= diagonal[None, :]).sum(axis=0) - 1  # per text (column)
    image_to_text = (similarity >= diagonal[:, None]).sum(axis=1) - 1  # per image (row)
    result = {}
    for k in ks:
        result[f"text_to_image_r{k}"] = float(np.mean(text_to_image < k))
        result[f"image_to_text_r{k}"] = float(np.mean(image_to_text < k))
    return result
