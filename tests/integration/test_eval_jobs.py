"""Evaluation jobs with random tiny models: mechanics, formats, and the distributed retrieval result
equal to a dense single-process computation with the same model (k_test >= number of candidates)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tiny_exports):
    return tiny_exports


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
    """A LAVIS-style Karpathy test file + image folder, from generated shapes (2 captions per image)."""
    from blip2_ray.capfilt.shards import read_tar_members
    from blip2_ray.data.sources import list_shards
    from blip2_ray.fixtures.sample import make_sample_shards

    root = tmp_path_factory.mktemp("karpathy")
    make_sample_shards(str(root / "shards"), "webdataset", num=10, shards=1, image_size=32, seed=3, num_captions=2)
    (root / "images").mkdir()
    entries = []
    for key, m in read_tar_members(list_shards(str(root / "shards"))[0], print):
        name = f"COCO_val2014_{int(key):012d}.jpg"
        (root / "images" / name).write_bytes(m["jpg"])
        meta = json.loads(m["json"])
        entries.append({"image": name, "caption": json.loads(m["txt"]), "colour": meta["colour"],
                        "shape": meta["shape"]})
    (root / "test.json").write_text(json.dumps(entries))
    vqa = [{"question_id": i, "question": "what colour is the shape?", "image": e["image"],
            "answer": [e["colour"]] * 10} for i, e in enumerate(entries)]
    (root / "vqa.json").write_text(json.dumps(vqa))
    return root


# the pool of two actors is tested where results from both are merged (retrieval against the dense reference, the
# captions); elsewhere one actor does (each actor is a process that imports torch and transformers: ~8 CPU s)
ONE_ACTOR = {"num_actors": 1, "batch_size": 4, "num_cpus_per_actor": 0.5}


def _cfg(**data):
    from blip2_ray.config import from_dict
    from blip2_ray.eval.config import EvalConfig

    base = {"compute": {"num_actors": 2, "batch_size": 4, "num_cpus_per_actor": 0.5}, "data": {"image_size": 32}}
    base.update(data)
    return from_dict(EvalConfig, base)


def dense_reference(model_dir: str, ts) -> dict:
    """Single process, full matrices: ITC for all pairs, ITM + ITC for all pairs, then recall."""
    import torch

    from blip2_ray.data.processor import tokenize_qformer
    from blip2_ray.data.transforms import decode_image, eval_transform
    from blip2_ray.eval.retrieval import dense_rankings, itc_similarity, recall_at_k
    from blip2_ray.weights.hf_format import load_stage1

    model, tok = load_stage1(model_dir)
    model.eval()
    with torch.no_grad():
        px = torch.from_numpy(np.stack([eval_transform(decode_image(open(im["path"], "rb").read(), 1, 1 << 30), 32)
                                        for im in ts.images]))
        emb = model.encode_image(px)
        enc = tokenize_qformer(tok, ts.texts, 32)
        ids, mask = torch.from_numpy(enc["qformer_input_ids"]), torch.from_numpy(enc["qformer_attention_mask"])
        sim = itc_similarity(model.image_feats(emb), model.text_feat(ids, mask))  # (I, T)
        n_i, n_t = sim.shape
        itm = torch.zeros(n_i, n_t)
        for i in range(n_i):
            itm[i] = model.itm_logits(emb[i:i + 1].expand(n_t, -1, -1), ids, mask)[:, 1]
    score = (itm + sim).numpy()
    ri, rt = dense_rankings(score, score.T.copy())
    return recall_at_k(ri, ts.img2txt, rt, ts.txt2img)


def test_retrieval_equals_dense_reference(ray_session, models, karpathy, tmp_path):
    from blip2_ray.eval.job import run_evaluation
    from blip2_ray.eval.test_sets import load_test_set

    cfg = _cfg(task="retrieval", model=models["stage1"], output=str(tmp_path / "r.json"),
               test_set={"annotations": str(karpathy / "test.json"), "image_root": str(karpathy / "images")},
               retrieval={"k_test": 128, "itm_batch_size": 7})
    report = run_evaluation(cfg)
    ts = load_test_set(cfg)
    assert report["images"] == 10 and report["texts"] == 20 and report["itm_pairs"] == 200
    ref = dense_reference(models["stage1"], ts)
    for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
        assert report["metrics"][k] == pytest.approx(ref[k]), k
    assert json.loads((tmp_path / "r.json").read_text())["metrics"] == report["metrics"]

    # a small k re-ranks fewer pairs; recall@k' <= k stays a percentage
    cfg2 = _cfg(task="retrieval", model=models["stage1"], output=str(tmp_path / "r2.json"),
                test_set={"annotations": str(karpathy / "test.json"), "image_root": str(karpathy / "images")},
                retrieval={"k_test": 3}, compute=ONE_ACTOR)
    r2 = run_evaluation(cfg2)
    assert r2["itm_pairs"] < 200 and all(0 <= v <= 100 for v in r2["metrics"].values())


def test_retrieval_from_shards_skips_corrupt(ray_session, models, tmp_path):
    from blip2_ray.eval.job import run_evaluation
    from blip2_ray.fixtures.sample import make_sample_shards

    make_sample_shards(str(tmp_path / "s"), "parquet", num=8, shards=2, image_size=32, seed=4,
                       corrupt={"undecodable_image": 1})
    cfg = _cfg(task="retrieval", model=models["stage1"], output=str(tmp_path / "r.json"),
               test_set={"shards": [str(tmp_path / "s")]}, retrieval={"k_test": 4}, compute=ONE_ACTOR)
    report = run_evaluation(cfg)
    assert report["images"] == 8 and report["skipped_images"] == 1 and report["texts"] == 8


def test_a_user_error_inside_an_actor_reaches_the_driver_as_itself(ray_session, models, karpathy, tmp_path):
    """The actors load the model: an export whose config.json is not BLIP-2's fails there, in Ray."""
    import shutil

    from blip2_ray.errors import UserError
    from blip2_ray.eval.job import run_evaluation

    broken = tmp_path / "broken_stage1"
    shutil.copytree(models["stage1"], broken)
    (broken / "config.json").write_text("{not json")
    cfg = _cfg(task="retrieval", model=str(broken), output=str(tmp_path / "r.json"),
               test_set={"annotations": str(karpathy / "test.json"), "image_root": str(karpathy / "images")},
               compute=ONE_ACTOR)
    with pytest.raises(UserError) as info:
        run_evaluation(cfg)
    assert type(info.value) is UserError
    config = str(broken / "config.json")
    assert str(info.value) == f"retrieval model config {config!r} is not readable JSON (JSONDecodeError)"


def test_caption_and_vqa(ray_session, models, karpathy, tmp_path):
    from blip2_ray.eval.job import run_evaluation

    ts = {"annotations": str(karpathy / "test.json"), "image_root": str(karpathy / "images")}
    gen = {"num_beams": 2, "max_new_tokens": 5, "min_new_tokens": 2}
    rep = run_evaluation(_cfg(task="caption", model=models["stage2"], output=str(tmp_path / "c.json"),
                              test_set=ts, generation=gen, meteor=False))  # METEOR's JVM: test_eval_official_metrics
    assert rep["images"] == 10 and {"BLEU-4", "CIDEr"} <= set(rep["metrics"]) and "METEOR" not in rep["metrics"]
    preds = json.loads(Path(rep["predictions"]).read_text())
    assert len(preds) == 10 and {"image_id", "caption"} <= set(preds[0])
    # the references it scored against are written too: `evaluate.py caption-metrics` on the pair agrees
    from blip2_ray.eval.caption_metrics import caption_scores, load_predictions, load_references

    again = caption_scores(load_references(rep["references"]), load_predictions(rep["predictions"]), meteor=False)
    assert again == pytest.approx(rep["metrics"])

    rep = run_evaluation(_cfg(task="vqa", model=models["stage2"], output=str(tmp_path / "v.json"),
                              test_set={**ts, "annotations": str(karpathy / "vqa.json")},
                              generation={**gen, "prompt": ""}, compute=ONE_ACTOR))
    assert rep["questions"] == 10 and 0.0 <= rep["metrics"]["accuracy"] <= 100.0
