"""The two named VQA rule sets (`lavis`, `official`), tested from the evaluators' rules.

Rule names (R1-R5, L1-L3, O1-O3) are those of blip2_ray/eval/vqa_metrics.py's docstring. Each rule has
one case where the two rule sets score differently and one where they agree. An adversarial set of
3000 generated questions is then checked against a second, literal reading of the rules written here.
docs/evaluation.md has the measurement against the evaluators' original code.
"""

from __future__ import annotations

import functools
import random

import pytest

from blip2_ray.config import ConfigError, from_dict
from blip2_ray.eval.config import EvalConfig
from blip2_ray.eval.vqa_metrics import exact_match_accuracy, vqa_accuracy, vqa_scores


def both(prediction, answers):
    return vqa_accuracy(prediction, answers, "lavis"), vqa_accuracy(prediction, answers, "official")


def split(a, k, b):
    """k human answers `a`, 10 - k answers `b`."""
    return [a] * k + [b] * (10 - k)


# (rule, prediction, answers, lavis accuracy, official accuracy): worked by hand from the rules
CASES = [
    # R1 on the human answers: lavis leaves " yes" as given (L2), official strips it (O1); all then agree (O3)
    ("R1 answers, differ", "yes", split(" yes", 8, "yes"), 0.6, 1.0),
    ("R1 prediction, agree", "\tyes\n", ["yes"] * 10, 1.0, 1.0),
    # L2: a newline around every human answer: lavis compares "yes\n" raw
    ("L2 newline, differ", "yes", ["yes\n"] * 10, 0.0, 1.0),
    ("L2 newline inside, agree", "yes", split("ye\ns", 4, "no"), 0.0, 0.0),
    # R2 marks: deleted next to a space, else a space. All agree: official leaves the prediction raw (O3)
    ("R2 hyphen, differ", "left-handed", ["left handed"] * 10, 1.0, 0.0),
    ("R2 hyphen, agree", "left-handed", split("left handed", 5, "lefthanded"), 1.0, 1.0),
    ("R2 spaced hyphen deleted, agree", "t - shirt", split("t shirt", 4, "t-shirt"), 1.0, 1.0),
    # R2 digit-comma-digit: every mark is deleted, not spaced
    ("R2 1,000, differ", "1,000", ["1000"] * 10, 1.0, 0.0),
    ("R2 b-1,2, agree", "b-1,2", split("b12", 3, "b 12"), 0.9, 0.9),
    # R3 the period typo: a period after a digit goes too ("2." -> "2"); one before a digit stays
    ("R3 2., differ", "2.", ["2"] * 10, 1.0, 0.0),
    ("R3 2.5, agree", "2.5", split("2.5", 4, "3"), 1.0, 1.0),
    # R3 at most 32 periods go: 33 leave one behind
    ("R3 32 periods, agree", "yes" + "." * 32, split("yes", 3, "no"), 0.9, 0.9),
    ("R3 33 periods, agree", "yes" + "." * 33, split("yes", 3, "no"), 0.0, 0.0),
    ("R3 33 periods all ten, differ", "yes" + "." * 33, ["yes" + "." * 33] * 10, 0.0, 1.0),
    # R4 number words: official maps the humans' "two" too (O2), lavis only the prediction (L3)
    ("R4 number, differ", "2", split("two", 4, "three"), 0.0, 1.0),
    ("R4 number, agree", "two", split("2", 4, "3"), 1.0, 1.0),
    ("R4 none -> 0, agree", "None", split("0", 4, "1"), 1.0, 1.0),
    # R4 articles
    ("R4 article, differ", "dog", split("the dog", 4, "cat"), 0.0, 1.0),
    ("R4 article, agree", "the dog", split("dog", 4, "cat"), 1.0, 1.0),
    # R4 lower-case
    ("R4 capitals, differ", "yes", split("Yes", 4, "no"), 0.0, 1.0),
    ("R4 capitals, agree", "YES", split("yes", 4, "no"), 1.0, 1.0),
    # R4 contractions, with the table's quirks: "Im" never matches, "somebody'd" -> "somebodyd"
    ("R4 contraction, differ", "don't", split("dont", 4, "no"), 0.0, 1.0),
    ("R4 contraction, agree", "dont", split("don't", 4, "no"), 1.0, 1.0),
    ("R4 capital key, agree", "I'm", split("im", 4, "no"), 0.0, 0.0),
    ("R4 somebody'd, agree", "somebody'd", split("somebodyd", 4, "no"), 1.0, 1.0),
    # O3: all ten agree, so official compares the prediction as cleaned (R1) only
    ("O3 capital prediction, differ", "Yes", ["yes"] * 10, 1.0, 0.0),
    ("O3 exact prediction, agree", " yes ", ["yes"] * 10, 1.0, 1.0),
    # L3: all ten agree raw, so lavis leaves them raw: "two" never equals a prediction normalised to "2"
    ("L3 raw agreement, differ", "two", ["two"] * 10, 0.0, 1.0),
    ("L3 raw agreement, agree", "2", ["2"] * 10, 1.0, 1.0),
]


@pytest.mark.parametrize("rule,prediction,answers,lavis,official", CASES, ids=[c[0] for c in CASES])
def test_rule(rule, prediction, answers, lavis, official):
    assert both(prediction, answers) == (pytest.approx(lavis), pytest.approx(official))


def test_every_rule_has_a_differing_and_an_agreeing_case():
    for rule in ("R1", "R2", "R3", "R4", "L2", "L3", "O3"):
        kinds = {c[3] == c[4] for c in CASES if c[0].startswith(rule)}
        assert kinds == {True, False}, rule


def test_whitespace_around_human_answers_counts_as_in_lavis():
    # The earlier implementation stripped the human answers and so scored this 0.9. LAVIS compares
    # "yes " as given (L2): no match. official strips it (O1): 0.9.
    answers = split("yes ", 3, "no")
    assert both("yes", answers) == (0.0, pytest.approx(0.9))


def test_leave_one_out_is_shared():
    # R5: k of 10 humans gave the answer: k-1 matches when one of them is left out (k subsets), k otherwise
    for k in range(11):
        expected = (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10
        assert both("yes", split("yes", k, "no")) == (pytest.approx(expected), pytest.approx(expected))


def test_scores_round_and_follow_the_question_order():
    qs = {7: {"answers": split("yes", 1, "no")}, 3: {"answers": ["no"] * 10}, 5: {"answers": ["yes"] * 10}}
    preds = {5: "yes", 3: "yes", 7: "yes"}
    assert vqa_scores(preds, qs)["accuracy"] == 43.33  # (0.3 + 0 + 1) / 3, as both evaluators round it
    assert vqa_scores({5: "Yes"}, qs, rules="official")["accuracy"] == 0.0
    with pytest.raises(ValueError, match="not in the questions"):
        vqa_scores({9: "yes"}, qs)
    with pytest.raises(ValueError, match="unknown VQA rules"):
        vqa_scores(preds, qs, rules="vqav2")
    with pytest.raises(ValueError, match="lavis rules only"):
        vqa_scores(preds, qs, metric="exact", rules="official")


def test_gqa_exact_match_has_no_whitespace_clean_up():
    # LAVIS's GQATask: R2+R3 and R4 on both sides, no R1. The leading space makes " -" a spaced mark, so
    # every "-" is deleted ("ab"). Stripped first, they would become spaces ("a b").
    assert exact_match_accuracy(" -a-b", "ab") == 1.0
    assert exact_match_accuracy("-a-b", "ab") == 0.0
    assert exact_match_accuracy("The Table.", "table") == 1.0


def test_config_key():
    base = {"task": "vqa", "model": "m", "test_set": {"annotations": "a.json"}}
    assert from_dict(EvalConfig, base).vqa_rules == "lavis"
    assert from_dict(EvalConfig, {**base, "vqa_rules": "official"}).vqa_rules == "official"
    with pytest.raises(ConfigError, match="vqa_rules"):
        from_dict(EvalConfig, {**base, "vqa_rules": "vqav2"})
    with pytest.raises(ConfigError, match="gqa"):
        from_dict(EvalConfig, {**base, "vqa_format": "gqa", "vqa_rules": "official"})


# ------------------------------------------------------------------ adversarial set and a literal reference
_GROUPS = [
    ["2", "two", "Two", "TWO", "2.", "2 ", " two"], ["0", "none", "zero", "None", "0."], ["10", "ten", "Ten"],
    ["1", "one", "a one", "1."], ["3.5", "3.5.", "3,5", "3 5"], ["1000", "1,000", "1 000", "1.000"],
    ["dog", "the dog", "a dog", "The Dog", "dog.", "dogs"], ["apple", "an apple", "An Apple", "the apple"],
    ["dont", "don't", "Dont", "do not"], ["isnt", "isn't"], ["thats", "that's", "Thats"], ["Im", "im", "i'm", "I'm"],
    ["somebody'd", "somebodyd"], ["yall", "y'all"], ["yes", "Yes", "YES", "yes!", "yes.", "yes?", "(yes)"],
    ["no", "No", "no!", "no.", "nope"], ["left-handed", "left handed", "left - handed", "lefthanded"],
    ["t-shirt", "t shirt", "T-Shirt", "tshirt", "t - shirt"], ["u.s.", "us", "u.s", "U.S.A."],
    ["a/b", "a b", "ab", "a / b"], ["red", "red.", "red,", "(red)", "[red]", "red;", "red-"],
    ["1,2", "1 2", "12", "1, 2", "a-1,2"], ["$5", "5", "5$", "five"], ["#1", "1", "no. 1"],
    ["a", "the", "an", ""], ["x" + "." * 33, "x" + "." * 32, "x", "x."], ["o'clock", "oclock", "3 oclock"],
]
_AROUND = ["", "", "", " ", "  ", "\n", "\t", " \n", "\r", "\x0b"]


def _decorate(rng: random.Random, text: str, p: float) -> str:
    if rng.random() >= p:
        return text
    if rng.random() < 0.3 and " " in text:
        text = text.replace(" ", rng.choice(["  ", "\t", "\n"]), 1)
    return rng.choice(_AROUND) + text + rng.choice(_AROUND)


def adversarial_questions(n: int = 3000, seed: int = 16) -> list[tuple[str, list[str]]]:
    """(prediction, 10 human answers) mixing numbers, articles, marks, whitespace, contractions, all-agree."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        group = rng.choice(_GROUPS)
        if rng.random() < 0.35:  # all ten agree (possibly on a decorated string)
            answers = [_decorate(rng, rng.choice(group), 0.3)] * 10
        else:
            pool = rng.sample(group, min(len(group), rng.randint(2, 3))) + [rng.choice(rng.choice(_GROUPS))]
            answers = [_decorate(rng, rng.choice(pool), 0.15) for _ in range(10)]
        source = group if rng.random() < 0.9 else rng.choice(_GROUPS)
        out.append((_decorate(rng, rng.choice(source), 0.3), answers))
    return out


_REF_MARKS = set(';/[]"{}()=+\\_->' + "<@`,?!")


@functools.lru_cache(maxsize=None)  # the set repeats its strings: keeps this test well under a second
def _ref_punctuation(text: str) -> str:
    """R2 + R3, character by character."""
    delete_all = any(text[i - 1].isdecimal() and text[i] == "," and text[i + 1].isdecimal()
                     for i in range(1, len(text) - 1))
    spaced = {m for m in _REF_MARKS if m + " " in text or " " + m in text}
    marked = "".join(("" if delete_all or c in spaced else " ") if c in _REF_MARKS else c for c in text)
    out, removed = [], 0
    for i, c in enumerate(marked):
        next_is_digit = i + 1 < len(marked) and marked[i + 1].isdecimal()
        if c == "." and not next_is_digit and removed < 32:
            removed += 1
            continue
        out.append(c)
    return "".join(out)


@functools.lru_cache(maxsize=None)
def _ref_digit_article(text: str) -> str:
    """R4, with only the table entries the adversarial set can reach (plus the unreachable capital key)."""
    numbers = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                       "0 0 1 2 3 4 5 6 7 8 9 10".split()))
    contractions = {"dont": "don't", "isnt": "isn't", "thats": "that's", "Im": "I'm", "somebody'd": "somebodyd",
                    "yall": "y'all", "oclock": "o'clock"}
    words = []
    for w in text.lower().split():
        w = numbers.get(w, w)
        if w not in ("a", "an", "the"):
            words.append(contractions.get(w, w))
    return " ".join(words)


def _ref_accuracy(prediction: str, answers: list[str], rules: str, strip_answers: bool = False) -> float:
    """L1-L3 / O1-O3 then R5 with the n leave-one-out subsets built explicitly."""
    def clean(s):
        return s.replace("\n", " ").replace("\t", " ").strip()

    if rules == "lavis":
        pred = _ref_digit_article(_ref_punctuation(clean(prediction)))
        gts = [clean(a) for a in answers] if strip_answers else list(answers)
        if len(set(gts)) > 1:
            gts = [_ref_punctuation(a) for a in gts]
    else:
        pred, gts = clean(prediction), [clean(a) for a in answers]
        if len(set(gts)) > 1:
            pred = _ref_digit_article(_ref_punctuation(pred))
            gts = [_ref_digit_article(_ref_punctuation(a)) for a in gts]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(g == pred for g in others) / 3))
    return sum(scores) / len(scores)


def test_adversarial_set_against_the_literal_reading():
    questions = adversarial_questions()
    assert sum(len(set(a)) == 1 for _, a in questions) > 900  # all-agree questions are well represented
    differ = {"lavis vs official": 0, "lavis vs stripped answers": 0}
    for pred, answers in questions:
        lavis, official = vqa_accuracy(pred, answers, "lavis"), vqa_accuracy(pred, answers, "official")
        # the same float operations in the same order: equal to the last bit
        assert lavis == _ref_accuracy(pred, answers, "lavis"), (pred, answers)
        assert official == _ref_accuracy(pred, answers, "official"), (pred, answers)
        differ["lavis vs official"] += lavis != official
        differ["lavis vs stripped answers"] += lavis != _ref_accuracy(pred, answers, "lavis", strip_answers=True)
    # LAVIS's and GT-Vision-Lab's own code disagree on 1319 of these questions, and LAVIS and the earlier
    # implementation (answers stripped) on 416: measured with the original code (docs/evaluation.md), where
    # ours matched each evaluator on all 3000. A change to the generator needs that measurement again.
    assert differ == {"lavis vs official": 1319, "lavis vs stripped answers": 416}
