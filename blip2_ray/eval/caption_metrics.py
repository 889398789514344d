"""Caption metrics as the COCO caption evaluation (pycocoevalcap) computes them, in pure Python.

- BLEU-1..4: corpus-level, clipped n-gram counts summed over all images (no smoothing), brevity penalty
  against the *closest* reference length per image (ties -> the shorter), pycocoevalcap's 1e-9/1e-15
  guards included so a zero count gives ~0 rather than an error.
- CIDEr-D: tf-idf n-gram vectors (n = 1..4) with document frequencies from the references of the
  evaluated images, clipped hypothesis weights, a Gaussian length penalty (sigma = 6), mean over n,
  over references, x10. As in pycocoevalcap the "length" of a caption is its number of bigrams.
- Text goes through `ptb_tokenize` first (the PTB tokenisation with punctuation removed).
- METEOR and SPICE run the official Java tools through pycocoevalcap when it and `java` are installed.

Inputs: references {image_id: [captions]} and predictions {image_id: caption}; only the predicted
images are scored (COCOEvalCap does the same), each must have references.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path

from blip2_ray.errors import UserError
from blip2_ray.eval.ptb_tokenizer import ptb_tokenize

NGram = tuple[str, ...]


def ngram_counts(words: list[str], n: int = 4) -> Counter:
    """Counts of every 1..n-gram of `words`."""
    c: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            c[tuple(words[i:i + k])] += 1
    return c


# ---------------------------------------------------------------------------------------------- BLEU
def bleu(references: dict, predictions: dict, n: int = 4) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n and per-image BLEU-1..n ([k][image]) of tokenised captions.

    references {id: [tokenised caption, ...]}, predictions {id: tokenised caption}.
    """
    small, tiny = 1e-9, 1e-15
    total_guess, total_correct = [0] * n, [0] * n
    total_test = total_ref = 0.0
    per_image: list[list[float]] = [[] for _ in range(n)]
    for key, hyp in predictions.items():
        refs = [r.split() for r in references[key]]
        words = hyp.split()
        maxref: dict[NGram, int] = {}
        for r in refs:
            for g, c in ngram_counts(r, n).items():
                maxref[g] = max(maxref.get(g, 0), c)
        testlen = len(words)
        reflen = min((abs(len(r) - testlen), len(r)) for r in refs)[1]  # closest, ties -> shorter
        guess = [max(0, testlen - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for g, c in ngram_counts(words, n).items():
            correct[len(g) - 1] += min(maxref.get(g, 0), c)
        total_test += testlen
        total_ref += reflen
        score = 1.0
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
            score *= (correct[k] + tiny) / (guess[k] + small)
            per_image[k].append(score ** (1.0 / (k + 1)))
        ratio = (testlen + tiny) / (reflen + small)
        if ratio < 1:
            for k in range(n):
                per_image[k][-1] *= math.exp(1 - 1 / ratio)
    corpus, score = [], 1.0
    for k in range(n):
        score *= (total_correct[k] + tiny) / (total_guess[k] + small)
        corpus.append(score ** (1.0 / (k + 1)))
    ratio = (total_test + tiny) / (total_ref + small)
    if ratio < 1:
        corpus = [b * math.exp(1 - 1 / ratio) for b in corpus]
    return corpus, per_image


# ------------------------------------------------------------------------------------------- CIDEr-D
def cider_d(references: dict, predictions: dict, n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """Corpus CIDEr-D (mean over images) and per-image scores of tokenised captions."""
    keys = list(predictions)
    ref_counts = {k: [ngram_counts(r.split(), n) for r in references[k]] for k in keys}
    doc_freq: Counter = Counter()
    for k in keys:
        doc_freq.update({g for c in ref_counts[k] for g in c})  # an n-gram counts once per image
    log_num_docs = math.log(float(len(keys)))

    def vector(counts: Counter):
        vec: list[dict[NGram, float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            i = len(g) - 1
            w = float(tf) * (log_num_docs - math.log(max(1.0, doc_freq[g])))
            vec[i][g] = w
            norm[i] += w * w
            if i == 1:  # pycocoevalcap's caption "length" counts bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for k in keys:
        vh, nh, lh = vector(ngram_counts(predictions[k].split(), n))
        total = [0.0] * n
        for rc in ref_counts[k]:
            vr, nr, lr = vector(rc)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for i in range(n):
                val = sum(min(w, vr[i].get(g, 0.0)) * vr[i].get(g, 0.0) for g, w in vh[i].items())
                if nh[i] != 0 and nr[i] != 0:
                    val /= nh[i] * nr[i]
                total[i] += val * penalty
        scores.append(sum(total) / n / len(ref_counts[k]) * 10.0)
    return (sum(scores) / len(scores) if scores else 0.0), scores


# --------------------------------------------------------------------------------- optional Java tools
def java_available() -> bool:
    return shutil.which("java") is not None


def _pycocoevalcap_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap")  # a namespace package: no __file__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def meteor_available() -> bool:
    d = _pycocoevalcap_dir()
    return java_available() and d is not None and (d / "meteor" / "meteor-1.5.jar").exists()


def spice_available() -> bool:
    # SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use (no network here)
    d = _pycocoevalcap_dir()
    return java_available() and d is not None and any((d / "spice" / "lib").glob("stanford-corenlp-3.6.0*.jar"))


def _official(scorer_cls, refs: dict, preds: dict) -> float:
    gts = {k: list(refs[k]) for k in preds}
    res = {k: [preds[k]] for k in preds}
    score, _ = scorer_cls().compute_score(gts, res)
    return float(score)


# ------------------------------------------------------------------------------------------ together
def caption_scores(references: dict, predictions: dict, *, meteor: bool | None = None,
                   spice: bool | None = None) -> dict[str, float]:
    """{"BLEU-1".."BLEU-4", "CIDEr", ["METEOR", "SPICE"]} for raw (untokenised) captions.

    references {image_id: [caption, ...]}, predictions {image_id: caption}. METEOR / SPICE: None runs
    them when their Java tools are available, True requires them (UserError if missing), False skips.
    """
    if not predictions:
        raise UserError("no predictions to score")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise UserError(f"{len(missing)} predicted images have no reference caption (e.g. image_id {missing[0]!r}); "
                        f"check that predictions and references come from the same split")
    refs = {k: [ptb_tokenize(c) for c in references[k]] for k in predictions}
    preds = {k: ptb_tokenize(c) for k, c in predictions.items()}
    b, _ = bleu(refs, preds)
    out = {f"BLEU-{i + 1}": b[i] for i in range(4)}
    out["CIDEr"] = cider_d(refs, preds)[0]
    for name, want, available, module in (("METEOR", meteor, meteor_available, "meteor.meteor:Meteor"),
                                          ("SPICE", spice, spice_available, "spice.spice:Spice")):
        if want is False:
            continue
        if not available():
            if want:
                raise UserError(f"{name} needs java and pycocoevalcap with its {name} jars; install them or "
                                f"drop {name}")
            continue
        import importlib

        mod, cls = module.split(":")
        out[name] = _official(getattr(importlib.import_module(f"pycocoevalcap.{mod}"), cls), refs, preds)
    return out


# ------------------------------------------------------------------------------------------- formats
def _load_json(path: str, what: str):
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file {path!r} does not exist")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise UserError(f"{what} file {path!r} is not valid JSON ({e})") from None


def _norm_id(x):
    """COCO ids are ints; a string of digits names the same image."""
    if isinstance(x, str) and x.isdigit():
        return int(x)
    return x


def load_references(path: str) -> dict:
    """{image_id: [captions]} from a COCO caption annotation file ({"annotations": [{image_id, caption}]}),
    a Karpathy-split file ({"images": [{"sentences": [{"raw"}], "cocoid"|"imgid"|"filename"}]}) or a
    plain {image_id: [captions]} mapping."""
    data = _load_json(path, "references")
    refs: dict = defaultdict(list)
    if isinstance(data, dict) and "annotations" in data:
        for a in data["annotations"]:
            refs[_norm_id(a["image_id"])].append(a["caption"])
    elif isinstance(data, dict) and "images" in data and data["images"] and "sentences" in data["images"][0]:
        for im in data["images"]:
            key = im.get("cocoid", im.get("imgid", im.get("filename")))
            refs[_norm_id(key)].extend(s.get("raw", " ".join(s.get("tokens", []))) for s in im["sentences"])
    elif isinstance(data, dict):
        for k, v in data.items():
            refs[_norm_id(k)].extend([v] if isinstance(v, str) else list(v))
    elif isinstance(data, list) and data and isinstance(data[0], dict) and "caption" in data[0]:
        for a in data:
            refs[_norm_id(a["image_id"])].append(a["caption"])
    else:
        raise UserError(f"references file {path!r} is in no known format (COCO annotations, Karpathy split, "
                        f"or {{image_id: [captions]}})")
    return dict(refs)


def load_predictions(path: str) -> dict:
    """{image_id: caption} from a COCO result file ([{"image_id", "caption"}]) or a {image_id: caption} map."""
    data = _load_json(path, "predictions")
    if isinstance(data, dict):
        return {_norm_id(k): v for k, v in data.items()}
    if not isinstance(data, list) or any(not isinstance(r, dict) or "image_id" not in r or "caption" not in r
                                         for r in data):
        raise UserError(f"predictions file {path!r} must be a COCO result list [{{\"image_id\", \"caption\"}}, ...]")
    out: dict = {}
    for r in data:
        k = _norm_id(r["image_id"])
        if k in out:
            raise UserError(f"predictions file {path!r} has two captions for image_id {k!r}; keep one per image")
        out[k] = r["caption"]
    return out
