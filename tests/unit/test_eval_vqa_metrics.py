"""VQAv2 accuracy under the default (lavis) rules: normalisation and the 10-choose-9 averaging, on hand-worked cases."""

from __future__ import annotations

import pytest

from blip2_ray.eval.vqa_metrics import exact_match_accuracy, normalize_answer, vqa_accuracy, vqa_scores


@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"), ("the dog", "dog"), ("A red ball.", "red ball"), ("dont", "don't"), ("yes!", "yes"),
    ("3.5", "3.5"), ("1,000", "1000"), ("left-handed", "left handed"), ("t - shirt", "t  shirt".replace("  ", " ")),
    ("none", "0"), ("  Ten\n", "10"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_leave_one_out_accuracy():
    # k of 10 humans gave the answer: k-1 matches when one of them is left out (k subsets), k otherwise
    def expected(k):
        return (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10

    for k in range(0, 11):
        answers = ["yes"] * k + ["no"] * (10 - k)
        assert vqa_accuracy("yes", answers) == pytest.approx(expected(k))
    assert expected(1) == pytest.approx(0.3) and expected(2) == pytest.approx(0.6)
    assert expected(3) == pytest.approx(0.9) and expected(4) == pytest.approx(1.0)


def test_prediction_is_normalised_answers_get_punctuation_only():
    answers = ["2", "2", "2", "two", "2.", "two", "2", "2", "2", "2"]
    # "Two" -> "2"; the human "2." -> "2" by punctuation; the human "two" stays "two": 8 matches
    assert vqa_accuracy("Two", answers) == pytest.approx(1.0)
    assert vqa_accuracy("two", ["two"] * 10) == 0.0  # all humans agree: their answers are left as given


def test_scores_and_exact_match():
    qs = {1: {"answers": ["yes"] * 10, "answer_type": "yes/no"},
          2: {"answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number"}}
    out = vqa_scores({1: "Yes", 2: "two"}, qs)
    assert out["accuracy"] == pytest.approx(100 * (1.0 + 0.9) / 2)
    assert out["accuracy/number"] == pytest.approx(90.0)
    assert exact_match_accuracy("The Table.", "table") == 1.0
