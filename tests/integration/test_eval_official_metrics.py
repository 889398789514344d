"""Caption metrics against the official implementation run live (pycocoevalcap + Java), and the
`jobs/evaluate.py caption-metrics` command. Skipped where java or pycocoevalcap is missing."""

from __future__ import annotations

import json
import shutil
from importlib.util import find_spec
from pathlib import Path

import pytest

from blip2_ray.eval.caption_metrics import caption_scores
from blip2_ray.eval.ptb_tokenizer import ptb_tokenize


def _fixture():
    """The recorded fixture lives with the unit tests (loaded by path: tests/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "unit" / "test_eval_caption_metrics.py"
    spec = importlib.util.spec_from_file_location("_caption_metrics_fixture", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_F = _fixture()
PREDS, PTB_CASES, REFERENCE, REFS = _F.PREDS, _F.PTB_CASES, _F.REFERENCE, _F.REFS

HAVE_OFFICIAL = shutil.which("java") is not None and find_spec("pycocoevalcap") is not None
needs_official = pytest.mark.skipif(not HAVE_OFFICIAL, reason="needs java and pycocoevalcap")


@needs_official
def test_live_against_pycocoevalcap_with_java():
    """Runs the official scorers now (Java tokenizer included) on the fixture and on odd captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = list(PTB_CASES) + [c for v in REFS.values() for c in v]
    java = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [java[i][0] for i in range(len(texts))] == [ptb_tokenize(t) for t in texts]

    refs = {k: v + [PTB_CASES_KEYS[k % len(PTB_CASES_KEYS)]] for k, v in REFS.items()}
    preds = dict(PREDS)
    preds[5] = "a bus"  # a short one: brevity penalty
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in preds.items()})
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    c, _ = Cider().compute_score(gts, res)
    ours = caption_scores(refs, preds, meteor=False, spice=False)
    assert [ours[f"BLEU-{i}"] for i in range(1, 5)] == pytest.approx(b, abs=1e-9)
    assert ours["CIDEr"] == pytest.approx(c, abs=1e-9)


PTB_CASES_KEYS = list(PTB_CASES)


@needs_official
def test_meteor_through_the_official_jar():
    out = caption_scores(REFS, PREDS, meteor=True, spice=False)
    assert out["METEOR"] == pytest.approx(REFERENCE["METEOR"], abs=1e-4)


def test_caption_metrics_cli_json(tmp_path: Path, job_main, capsys):
    refs = {"annotations": [{"image_id": k, "caption": c} for k, v in REFS.items() for c in v]}
    preds = [{"image_id": k, "caption": c} for k, c in PREDS.items()]
    (tmp_path / "r.json").write_text(json.dumps(refs))
    (tmp_path / "p.json").write_text(json.dumps(preds))
    main = job_main("evaluate")
    capsys.readouterr()
    assert main(["caption-metrics", "--predictions", str(tmp_path / "p.json"), "--references", str(tmp_path / "r.json"),
                 "--json", "--no-meteor"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["BLEU-4"] == pytest.approx(REFERENCE["BLEU"][3], abs=1e-9)
    assert last["CIDEr"] == pytest.approx(REFERENCE["CIDEr"], abs=1e-9)
    assert main(["caption-metrics", "--predictions", str(tmp_path / "nope.json"), "--references",
                 str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.json" in err
