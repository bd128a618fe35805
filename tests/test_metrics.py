"""Metrics against values worked out by hand (the arithmetic is in the comments).

The BLEU and CIDEr-D code was also compared with pycocoevalcap 1.2 on these fixtures and on 20
random corpora (identical to 1e-9); that package is not a dependency, so the expected values are
written out here.
"""

import math

import numpy as np
import pytest

from blip2_app.training import metrics

# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("a red circle", "red circle"),
        ("isnt", "isn't"),
        ("yes!", "yes"),
        ("none", "0"),
        ("3,000", "3000"),  # digits around a comma: punctuation removed, not spaced
        ("black-and-white", "black and white"),
        ("2.5", "2.5"),  # a period before a digit stays
        ("  Ten \n", "10"),
    ],
)
def test_answer_normalisation_follows_the_official_rules(raw, normalized):
    assert metrics.normalize_answer(raw) == normalized


def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets():
    # "red" given by 2 of 10 humans: leaving out one of the 2 "red" leaves 1 match -> 1/3 (2 subsets);
    # leaving out another answer leaves 2 matches -> 2/3 (8 subsets). (2/3 + 16/3) / 10 = 0.6
    two = ["red"] * 2 + ["blue"] * 8
    assert metrics.vqa_accuracy("red", two) == pytest.approx(0.6)
    # 3 of 10: 3 subsets with 2 matches (2/3), 7 with 3 (1): (2 + 7) / 10 = 0.9
    three = ["red"] * 3 + ["blue"] * 7
    assert metrics.vqa_accuracy("red", three) == pytest.approx(0.9)
    # 4 or more of 10: every subset keeps at least 3 matches
    assert metrics.vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    # 1 of 10: 9 subsets with 1 match (1/3), 1 with 0: 3 / 10
    assert metrics.vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    assert metrics.vqa_accuracy("green", two) == 0.0


def test_vqa_accuracy_normalises_prediction_and_answers():
    assert metrics.vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert metrics.vqa_accuracy("the red one", ["red one"] * 10) == 1.0
    assert metrics.mean_vqa_accuracy(["yes", "no"], [["yes"] * 10, ["yes"] * 10]) == 0.5
    with pytest.raises(ValueError):
        metrics.vqa_accuracy("x", [])


# ----------------------------------------------------------------------------- BLEU


def test_bleu4_of_one_changed_word():
    # hypothesis "a red circle on the left" vs reference "a red circle on the right", equal lengths:
    # 1-grams 5/6, 2-grams 4/5, 3-grams 3/4, 4-grams 2/3 -> (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = (1/3) ** 0.25
    value = metrics.bleu4(["a red circle on the left"], [["a red circle on the right"]])
    assert value == pytest.approx((1 / 3) ** 0.25, abs=1e-8)
    assert metrics.bleu4(["A red circle, on the left."], [["a red circle on the left"]]) == pytest.approx(1.0)


def test_bleu_brevity_penalty_uses_the_closest_reference_length():
    # "a red circle" (3 words) against refs of 4 and 9 words: closest is 4, ratio 3/4,
    # BP = exp(1 - 4/3); precisions 3/3, 2/2, 1/1 -> BLEU-3 = BP.
    refs = [["a red circle here", "a big red circle drawn on a blue background"]]
    scores = metrics.bleu(["a red circle"], refs)
    assert scores[2] == pytest.approx(math.exp(1 - 4 / 3), abs=1e-8)
    # No 4-gram in a 3-word hypothesis: pycocoevalcap's smoothing makes that factor
    # (0 + 1e-15) / (0 + 1e-9) = 1e-6, so BLEU-4 = (1 * 1 * 1 * 1e-6) ** (1/4) * BP, small but not 0.
    assert scores[3] == pytest.approx(1e-6**0.25 * math.exp(1 - 4 / 3), rel=1e-6)


def test_bleu_matches_pycocoevalcap_on_a_small_corpus():
    hypotheses = ["a red circle on the left", "a large blue square", "two dogs play in the grass", "a cat"]
    references = [
        ["a red circle on the left", "there is a red circle"],
        ["a small blue square on the right", "a blue square", "big blue box"],
        ["two dogs playing on grass", "dogs in a field"],
        ["a cat sitting on a mat", "the cat is black"],
    ]
    expected = [0.8333333332407409, 0.6900655592602036, 0.5753695825892899, 0.5345224837457311]
    assert metrics.bleu(hypotheses, references) == pytest.approx(expected, abs=1e-9)
    cider, per_image = metrics.cider_d(hypotheses, references)
    assert cider == pytest.approx(3.0348503067813963, abs=1e-9)
    assert per_image == pytest.approx(
        [6.737833446190264, 1.8881210097467214, 1.7070762198074585, 1.8063705513811434]
    )


# ----------------------------------------------------------------------------- CIDEr-D


def test_cider_d_by_hand():
    # Two images, one reference each: "a red circle" and "a blue cross". "a" is in both references,
    # so its idf is log(2) - log(2) = 0; every other n-gram gets weight L = log(2).
    # Image 1, hypothesis = reference: cosine 1 for n = 1, 2, 3; no 4-grams (norm 0 -> 0).
    #   mean(1, 1, 1, 0) * 10 = 7.5
    # Image 2, "a blue square" vs "a blue cross":
    #   n=1: hyp {a:0, blue:L, square:L}, ref {a:0, blue:L, cross:L}: L^2 / (sqrt2 L * sqrt2 L) = 0.5
    #   n=2: {a blue, blue square} vs {a blue, blue cross}: 0.5;  n=3: 0;  n=4: 0
    #   equal lengths, no penalty: mean(0.5, 0.5, 0, 0) * 10 = 2.5
    cider, per_image = metrics.cider_d(
        ["a red circle", "a blue square"], [["a red circle"], ["a blue cross"]]
    )
    assert per_image == pytest.approx([7.5, 2.5])
    assert cider == pytest.approx(5.0)


def test_cider_d_length_penalty():
    # Same images; image 2 hypothesis "a blue cross on the left" (5 bigrams) vs "a blue cross"
    # (2 bigrams): delta 3 -> factor exp(-9 / 72). Its n-grams beyond the reference add norm:
    #   n=1 hyp {a:0, blue, cross, on, the, left: L each} -> norm sqrt5 L; ref norm sqrt2 L; dot 2 L^2
    #       -> 2 / sqrt10
    #   n=2 hyp 5 bigrams with weight L ("a blue" and "blue cross" shared) -> 2 / sqrt10
    #   n=3 hyp 4 trigrams, ref 1 shared -> 1 / sqrt4 = 0.5;  n=4: ref has none -> 0
    penalty = math.exp(-9 / 72)
    expected = (2 / math.sqrt(10) * 2 + 0.5) / 4 * 10 * penalty
    _, per_image = metrics.cider_d(
        ["a red circle", "a blue cross on the left"], [["a red circle"], ["a blue cross"]]
    )
    assert per_image[1] == pytest.approx(expected)


def test_objects_named():
    caption = "a large red circle on the left and a small blue square on the right"
    assert metrics.objects_named(caption, [("red", "circle"), ("blue", "square")])
    assert not metrics.objects_named(caption, [("red", "square")])
    assert not metrics.objects_named("a red and blue circle", [("red", "circle")])


# ----------------------------------------------------------------------------- retrieval


def test_recall_at_k_both_ways():
    # rows: images, columns: texts; the match is on the diagonal.
    similarity = np.array(
        [
            [0.9, 0.1, 0.8],  # image 0: text 0 first -> i2t rank 0
            [0.2, 0.3, 0.5],  # image 1: text 2 (0.5) beats text 1 (0.3) -> rank 1
            [0.95, 0.4, 0.1],  # image 2: texts 0 and 1 beat text 2 -> rank 2
        ]
    )
    # text 0: column (0.9, 0.2, 0.95) -> image 2 beats image 0 -> rank 1
    # text 1: column (0.1, 0.3, 0.4) -> image 2 beats image 1 -> rank 1
    # text 2: column (0.8, 0.5, 0.1) -> both others beat image 2 -> rank 2
    recall = metrics.recall_at_k(similarity, ks=(1, 2, 3))
    assert recall["image_to_text_r1"] == pytest.approx(1 / 3)
    assert recall["image_to_text_r2"] == pytest.approx(2 / 3)
    assert recall["image_to_text_r3"] == 1.0
    assert recall["text_to_image_r1"] == 0.0
    assert recall["text_to_image_r2"] == pytest.approx(2 / 3)
    assert recall["text_to_image_r3"] == 1.0


def test_recall_counts_ties_against_the_model():
    recall = metrics.recall_at_k(np.ones((4, 4)), ks=(1, 4))
    assert recall["text_to_image_r1"] == 0.0
    assert recall["text_to_image_r4"] == 1.0
    with pytest.raises(ValueError):
        metrics.recall_at_k(np.ones((2, 3)))
