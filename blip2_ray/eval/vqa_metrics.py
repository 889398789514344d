"""VQA accuracy under two named rule sets, `lavis` (the default) and `official`.

Both rule sets use the same steps (R1-R5) and the same tables. They differ in which strings get which
step, and when.

Shared steps (identical in LAVIS's copy and in GT-Vision-Lab/VQA's vqaEval.py):
  R1 clean-up: "\\n" and "\\t" become " ", then `str.strip()` (every whitespace character at both ends).
     Other whitespace inside the text ("\\r", double spaces) is left.
  R2 punctuation (`process_punctuation`), for each of the 21 marks  ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !
     The mark is deleted if the ORIGINAL text has it next to a space (mark + " " or " " + mark), or if the
     text has a digit-comma-digit anywhere (then every mark is deleted). Otherwise it becomes a space.
     Apostrophes, colons, "#", "$", "%", "&", "*" and the like stay.
  R3 periods: each "." not followed by a digit is deleted. "2." becomes "2" because the evaluators'
     `(?!<=\\d)` is a look-ahead (a typo for a look-behind) that never excludes anything. At most the first
     32 periods go, because the evaluators pass `re.UNICODE` (= 32) where `sub` takes `count`.
  R4 digits and articles (`process_digit_article`): lower-case, split on whitespace, map none/zero..ten to
     0..10, drop a/an/the, expand the contractions of the evaluators' table, join with single spaces.
     Table keys with capitals ("Im", "Ive") can never match after lower-casing. "somebody'd" ->
     "somebodyd" is in the table as written.
  R5 accuracy: each of the n human answers is left out in turn (they are distinct records: VQAv2's
     answer_id 1..10). Score min(1, matches among the other n-1 / 3) and average over the n.
     `vqa_scores` reports round(100 * sum / count, 2), as both evaluators do.

lavis: LAVIS lavis/common/vqa_tools/vqa_eval.py, called by lavis/tasks/vqa.py (the paper's val numbers).
  L1 prediction: R1, then R2+R3, then R4, always.
  L2 human answers: raw, with no R1. Surrounding spaces, tabs and newlines stay and count.
  L3 if the raw answers are not all equal, each gets R2+R3 only: no R4, so "two" and "the dog" stay as
     given. If they are all equal, they stay raw.
official: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py at master a013f00
(2021-03-11, "Fixed processing answers bug", its latest commit).
  O1 prediction and every human answer: R1.
  O2 if the cleaned answers are not all equal, the answers AND the prediction each get R2+R3, then R4.
  O3 if they are all equal, neither side gets anything more: the prediction is compared as cleaned, so
     "Yes" or "yes." against ten "yes" scores 0.
Where they differ: R1 on the human answers (lavis never applies it), R4 on the human answers (official only,
when they disagree), and the prediction's normalisation when all ten agree (lavis only).
GQA (`metric="exact"`): LAVIS's GQATask. The prediction and the one answer each get R2+R3, then R4, with no
R1, and the score is 1 if they are equal. The official VQA evaluator has no GQA mode, so only `lavis` scores it.

Strings are Python 3 str, so `\\d`, `lower()` and whitespace are Unicode-aware, as in LAVIS. The official
master is Python 2 code (print statements). Run under Python 2.7, its `\\d` matches only 0-9 and its
`lower()` / whitespace tables are Unicode 5.2. The two agree on ASCII text (docs/evaluation.md).
"""

from __future__ import annotations

import re

VQA_RULES = ("lavis", "official")

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_MARKS = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # R3: what the evaluators' "(?!<=\d)(\.)(?!\d)" matches
_MAX_PERIODS = 32  # R3: re.UNICODE's value, passed as `count`


def clean_whitespace(text: str) -> str:
    """R1: newlines and tabs to spaces, then both ends stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """R2 + R3: the 21 marks deleted or spaced (decided on the input text), then up to 32 periods deleted."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _MARKS:
        out = out.replace(mark, "" if delete_all or mark + " " in text or " " + mark in text else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
    """R4: lower-case words, number words to digits, articles dropped, contractions restored, single spaces."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """A prediction as the `lavis` rules compare it (L1: R1, R2+R3, R4)."""
    return process_digit_article(process_punctuation(clean_whitespace(answer)))


def _check_rules(rules: str) -> None:
    if rules not in VQA_RULES:
        raise ValueError(f"unknown VQA rules {rules!r}: choose one of {', '.join(VQA_RULES)}")


def _compared(prediction: str, answers: list[str], rules: str) -> tuple[str, list[str]]:
    """(prediction, human answers) as the named rules compare them."""
    if rules == "lavis":  # L1-L3
        pred = normalize_answer(prediction)
        return pred, [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    pred, gts = clean_whitespace(prediction), [clean_whitespace(a) for a in answers]  # O1
    if len(set(gts)) > 1:  # O2; O3 otherwise
        pred = process_digit_article(process_punctuation(pred))
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
    return pred, gts


def vqa_accuracy(prediction: str, answers: list[str], rules: str = "lavis") -> float:
    """VQAv2 accuracy in [0, 1] of one prediction against its human answers (10 in VQAv2), per `rules`."""
    _check_rules(rules)
    if not answers:
        raise ValueError("a question needs at least one human answer")
    pred, gts = _compared(prediction, answers, rules)
    matches = [g == pred for g in gts]
    total = sum(matches)
    # R5: leaving answer i out leaves total - matches[i] matching answers among the others
    accs = [min(1.0, (total - m) / 3.0) for m in matches]
    return sum(accs) / len(accs)


def exact_match_accuracy(prediction: str, answer: str) -> float:
    """GQA accuracy as LAVIS's GQATask computes it: 1.0 if both sides are equal after R2+R3 and R4 (no R1)."""
    return float(process_digit_article(process_punctuation(prediction)) ==
                 process_digit_article(process_punctuation(answer)))


def vqa_scores(predictions: dict, questions: dict, metric: str = "vqav2", rules: str = "lavis") -> dict[str, float]:
    """{"accuracy": %, and per answer type "accuracy/<type>": %} over the predicted question ids.

    questions: {question_id: {"answers": [str, ...], "answer_type": str (optional)}}. metric: "vqav2"
    (OK-VQA uses the same) or "exact" (GQA: the first answer is the only one, `lavis` rules only).
    rules: "lavis" | "official" (module docstring). The questions are summed in the `questions` order (the
    evaluators sum in annotation order), and the percentages are rounded to 2 decimals as they report them.
    """
    _check_rules(rules)
    if metric not in ("vqav2", "exact"):
        raise ValueError(f"unknown VQA metric {metric!r}: choose vqav2 or exact")
    if metric == "exact" and rules != "lavis":
        raise ValueError("GQA's exact match is scored with the lavis rules only (the official VQA evaluator has none)")
    unknown = [qid for qid in predictions if qid not in questions]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted question ids are not in the questions, e.g. {unknown[0]!r}")
    per_type: dict[str, list[float]] = {}
    accs = []
    for qid, q in questions.items():
        if qid not in predictions:
            continue
        if metric == "vqav2":
            acc = vqa_accuracy(predictions[qid], q["answers"], rules)
        else:
            acc = exact_match_accuracy(predictions[qid], q["answers"][0])
        accs.append(acc)
        per_type.setdefault(q.get("answer_type") or "all", []).append(acc)
    out = {"accuracy": round(100.0 * sum(accs) / max(1, len(accs)), 2)}
    if len(per_type) > 1:
        out.update({f"accuracy/{t}": round(100.0 * sum(v) / len(v), 2) for t, v in sorted(per_type.items())})
    return out
