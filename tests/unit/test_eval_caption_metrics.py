"""Caption metrics against pycocoevalcap (the official COCO caption evaluation).

REFERENCE values were produced by pycocoevalcap 1.2 (Java PTBTokenizer from stanford-corenlp-3.4.1,
Bleu(4) with option 'closest', Cider(), Meteor() with meteor-1.5) on REFS/PREDS below:

    tok = PTBTokenizer(); gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in PREDS.items()})
    Bleu(4).compute_score(gts, res); Cider().compute_score(gts, res); Meteor().compute_score(gts, res)

tests/integration/test_eval_official_metrics.py repeats that run live when pycocoevalcap and java are
installed (skipped otherwise), and runs the caption-metrics command.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from blip2_ray.errors import UserError
from blip2_ray.eval.caption_metrics import bleu, caption_scores, cider_d, load_predictions, load_references
from blip2_ray.eval.ptb_tokenizer import ptb_tokenize

REFS = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.", "Surfer in a black wetsuit riding a wave!", "a man surfing"],
    2: ["Two dogs playing with a frisbee in the park.", "Two dogs don't share the frisbee; they fight.",
        "The dogs' frisbee is red."],
    3: ["A kitchen with a stove, a sink, and a refrigerator.", "A small kitchen (with white cabinets).",
        "There's a stove next to the sink in this kitchen."],
    4: ["A plate of food with broccoli and rice", "Broccoli, rice and chicken on a white plate.",
        "A close up of a plate of food."],
    5: ["A red double-decker bus on a city street.", "The bus is parked at the curb at 3.5 p.m.",
        "A bus driving down the street near buildings."],
}
PREDS = {1: "a man riding a wave on a surfboard", 2: "two dogs playing with a frisbee",
         3: "a kitchen with a stove and a sink", 4: "a plate of food with broccoli", 5: "a bus on a street"}
REFERENCE = {"BLEU": [0.8858460328740196, 0.8536225964929491, 0.7813945513741194, 0.712889782286942],
             "CIDEr": 2.9653027471264246, "METEOR": 0.3802295891979898}

# Java PTBTokenizer output (-preserveLines -lowerCase, then pycocoevalcap's punctuation filter)
PTB_CASES = {
    "A man riding a horse (on the beach).": "a man riding a horse -lrb- on the beach -rrb-",
    "Two dogs don't play; they can't, won't. It's \"fun\" isn't it?":
        "two dogs do n't play they ca n't wo n't it 's fun is n't it",
    "The U.S. flag & a St. Louis sign at 3.5 p.m. costs $5, or 10% - 1,000 items...":
        "the u.s. flag & a st. louis sign at 3.5 p.m. costs $ 5 or 10 % 1,000 items",
    "a black-and-white photo of a cat's toy -- and/or a *star* [box] {brace}":
        "a black-and-white photo of a cat 's toy and/or a * star * -lsb- box -rsb- -lcb- brace -rcb-",
    "Mr. Smith's 'quoted' words: yes! I'm we're they've you'll he'd cannot gonna":
        "mr. smith 's quoted words yes i 'm we 're they 've you 'll he 'd can not gon na",
    "A PERSON WITH AN UMBRELLA... In The Rain!!": "a person with an umbrella in the rain !!",
    "a man @ the park #tag 5:30 e-mail o'clock 'tis ok.": "a man @ the park #tag 5:30 e-mail o'clock 't is ok",
    "The 2nd floor of a building with 3 windows": "the 2nd floor of a building with 3 windows",
    "The dogs' owners are walking them in the park.": "the dogs owners are walking them in the park",
}



@pytest.mark.parametrize("text", list(PTB_CASES))
def test_ptb_tokenize_matches_recorded_java_output(text):
    assert ptb_tokenize(text) == PTB_CASES[text]


def _tokenised():
    return ({k: [ptb_tokenize(c) for c in v] for k, v in REFS.items()}, {k: ptb_tokenize(c) for k, c in PREDS.items()})


def test_bleu_matches_recorded_pycocoevalcap():
    refs, preds = _tokenised()
    corpus, per_image = bleu(refs, preds)
    assert corpus == pytest.approx(REFERENCE["BLEU"], abs=1e-9)
    assert len(per_image) == 4 and len(per_image[3]) == len(PREDS)


def test_cider_d_matches_recorded_pycocoevalcap():
    refs, preds = _tokenised()
    score, per_image = cider_d(refs, preds)
    assert score == pytest.approx(REFERENCE["CIDEr"], abs=1e-9)
    assert len(per_image) == len(PREDS)


def test_caption_scores_and_brevity_penalty():
    out = caption_scores(REFS, PREDS, meteor=False, spice=False)
    assert out["BLEU-4"] == pytest.approx(REFERENCE["BLEU"][3], abs=1e-9)
    assert out["CIDEr"] == pytest.approx(REFERENCE["CIDEr"], abs=1e-9)
    # a prediction identical to its only reference scores BLEU 1; shorter ones are penalised
    same = caption_scores({1: ["a red circle on a table"]}, {1: "a red circle on a table"}, meteor=False)
    assert same["BLEU-4"] == pytest.approx(1.0)
    short = caption_scores({1: ["a red circle on a wooden table"]}, {1: "a red circle on a"}, meteor=False)
    assert short["BLEU-1"] == pytest.approx(math.exp(1 - 7 / 5), rel=1e-6)


def test_missing_references_is_a_user_error():
    with pytest.raises(UserError, match="no reference"):
        caption_scores({1: ["a cat"]}, {2: "a dog"}, meteor=False)


def test_formats(tmp_path: Path):
    ann = {"images": [{"id": 1}],
           "annotations": [{"image_id": 1, "caption": "a cat"}, {"image_id": 1, "caption": "cat"}]}
    (tmp_path / "a.json").write_text(json.dumps(ann))
    assert load_references(str(tmp_path / "a.json")) == {1: ["a cat", "cat"]}
    karpathy = {"images": [{"cocoid": 7, "split": "test", "sentences": [{"raw": "a dog"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    assert load_references(str(tmp_path / "k.json")) == {7: ["a dog"]}
    (tmp_path / "p.json").write_text(json.dumps([{"image_id": "7", "caption": "a dog"}]))
    assert load_predictions(str(tmp_path / "p.json")) == {7: "a dog"}
    (tmp_path / "d.json").write_text(json.dumps([{"image_id": 7, "caption": "a"}, {"image_id": 7, "caption": "b"}]))
    with pytest.raises(UserError, match="two captions"):
        load_predictions(str(tmp_path / "d.json"))
