"""Fine-tuning pieces without Ray: config, annotation files -> shards, the trainable ViT, layer-wise lr decay."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from blip2_ray.config import ConfigError, from_dict, load_config
from blip2_ray.data.annotations import fingerprint, read_caption_annotations, write_caption_shards
from blip2_ray.errors import UserError
from blip2_ray.train.finetune_config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**data) -> FinetuneConfig:
    data.setdefault("data", {"image_size": 32})
    return from_dict(FinetuneConfig, {"annotations": {"train": "train.json"}, **data})


def test_task_decides_the_stage_and_contradictions_are_errors():
    assert _cfg(task="caption").stage == 2
    assert _cfg().train.lr == 1e-5 and _cfg().train.warmup_steps == 1000  # LAVIS caption_coco_ft values
    assert _cfg(task="retrieval", model={"init_from": "some/stage1"}).stage == 1  # a stage-1 export is allowed
    with pytest.raises(ConfigError, match="contradicts task"):
        _cfg(task="caption", stage=1)
    with pytest.raises(ConfigError, match="annotations.train"):
        from_dict(FinetuneConfig, {"data": {"image_size": 32}})
    with pytest.raises(ConfigError, match="layer_decay"):
        _cfg(vision_training={"layer_decay": 0})
    assert _cfg().vision_training.freeze_vit is False  # fine-tuning trains the ViT by default
    with pytest.raises(ConfigError, match="grad_checkpointing apply to a trained ViT"):
        _cfg(vision_training={"freeze_vit": True, "grad_checkpointing": True})


def test_shipped_tiny_config_loads():
    cfg = load_config(FinetuneConfig, ROOT / "jobs/configs/finetune_caption_tiny.yaml")
    assert cfg.task == "caption" and cfg.model.llm.prompt == "a photo of "


@pytest.mark.parametrize("path", sorted((ROOT / "jobs/configs").glob("finetune_*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_finetune_config_passes_the_validating_constructor(path):
    cfg = load_config(FinetuneConfig, path)  # unknown keys and invalid values are ConfigErrors
    assert path.stem.split("_")[1] == cfg.task and cfg.stage in (1, 2)


def test_real_retrieval_configs_carry_lavis_retrieval_coco_ft_values():
    coco = load_config(FinetuneConfig, ROOT / "jobs/configs/finetune_retrieval_coco.yaml")
    flickr = load_config(FinetuneConfig, ROOT / "jobs/configs/finetune_retrieval_flickr30k.yaml")
    for cfg in (coco, flickr):
        t, vt = cfg.train, cfg.vision_training
        assert (cfg.task, cfg.stage, cfg.model.vision.image_size, cfg.data.image_size) == ("retrieval", 1, 364, 364)
        assert (t.lr, t.min_lr, t.warmup_steps, t.warmup_start_lr, t.weight_decay) == (1e-5, 0.0, 1000, 1e-8, 0.05)
        assert (t.micro_batch_size, t.global_batch_size, cfg.scaling.num_workers) == (14, 112, 8)
        assert (vt.freeze_vit, vt.grad_checkpointing, vt.layer_decay, vt.drop_path) == (False, True, 0.95, 0.0)
        assert cfg.evaluation.retrieval.k_test == 128 and cfg.deepspeed.zero_stage == 2
    assert coco.train.max_steps == -(-566_747 * 5 // 112)  # 5 epochs of COCO Karpathy train captions
    assert flickr.train.max_steps == -(-145_000 * 6 // 112)  # BLIP's 6 epochs of Flickr30K train captions
    assert (flickr.annotations.train_split, flickr.annotations.eval_split) == ("train", "test")


def _images(root: Path, names: list[str]) -> None:
    from blip2_ray.fixtures.sample import _jpeg, draw_shape

    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(_jpeg(draw_shape("red", "circle", 32, __import__("numpy").random.default_rng(0))))


def test_lavis_list_groups_captions_per_image_and_counts_missing_images(tmp_path):
    _images(tmp_path / "img", ["train2014/COCO_train2014_000000000007.jpg", "train2014/b.jpg"])
    ann = [{"image": "train2014/COCO_train2014_000000000007.jpg", "caption": "a red circle", "image_id": "coco_7"},
           {"image": "train2014/COCO_train2014_000000000007.jpg", "caption": "a photo of a red circle",
            "image_id": "coco_7"},
           {"image": "train2014/b.jpg", "caption": ["one", "two"]},
           {"image": "train2014/gone.jpg", "caption": "x", "image_id": 9}]
    (tmp_path / "a.json").write_text(json.dumps(ann))
    got = read_caption_annotations(str(tmp_path / "a.json"), str(tmp_path / "img"))
    assert [e["image_id"] for e in got.entries] == ["coco_7", "train2014/b.jpg"]
    assert got.entries[0]["captions"] == ["a red circle", "a photo of a red circle"]
    assert got.num_pairs == 4 and got.missing == [str(tmp_path / "img/train2014/gone.jpg")]

    manifest = write_caption_shards(got, str(tmp_path / "shards"), 3, "fp1")
    assert manifest["rows"] == 4 and len(manifest["files"]) == 2 and manifest["missing_images"] == 1
    t = pq.read_table(manifest["files"][0]).to_pydict()
    assert t["key"] == ["coco_7/0", "coco_7/1", "train2014/b.jpg/0"]
    assert t["caption"][1] == "a photo of a red circle"
    assert t["image"][0] == (tmp_path / "img/train2014/COCO_train2014_000000000007.jpg").read_bytes()
    mtime = Path(manifest["files"][0]).stat().st_mtime_ns
    assert write_caption_shards(got, str(tmp_path / "shards"), 3, "fp1") == manifest  # same fingerprint: reused
    assert Path(manifest["files"][0]).stat().st_mtime_ns == mtime


def test_karpathy_dataset_json_takes_the_split_with_restval(tmp_path):
    _images(tmp_path, ["val2014/a.jpg", "val2014/b.jpg", "val2014/c.jpg"])
    data = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "train", "cocoid": 1, "sentences": [{"raw": "A x."}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "cocoid": 2,
         "sentences": [{"raw": "b one"}, {"tokens": ["b", "two"]}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "test", "cocoid": 3, "sentences": [{"raw": "c"}]}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    got = read_caption_annotations(str(tmp_path / "dataset_coco.json"), str(tmp_path))
    assert [(e["image_id"], e["captions"]) for e in got.entries] == [(1, ["A x."]), (2, ["b one", "b two"])]
    test = read_caption_annotations(str(tmp_path / "dataset_coco.json"), str(tmp_path), split="test")
    assert [e["image_id"] for e in test.entries] == [3]


def test_bad_annotation_files_are_one_user_error(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"questions": []}))
    with pytest.raises(UserError, match="no known format"):
        read_caption_annotations(str(tmp_path / "q.json"), str(tmp_path))
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x/1.jpg", "caption": "c"}]))
    with pytest.raises(UserError, match="none of the 1 images.*exists under image root"):
        read_caption_annotations(str(tmp_path / "a.json"), str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        read_caption_annotations(str(tmp_path / "nope.json"), str(tmp_path))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        read_caption_annotations(str(tmp_path / "bad.json"), str(tmp_path))
    assert fingerprint(str(tmp_path / "a.json"), str(tmp_path), "train") != fingerprint(
        str(tmp_path / "a.json"), str(tmp_path), "test")


def test_vqa_without_a_source_for_the_question_encoder_is_refused_before_any_work(tmp_path):
    from blip2_ray.train.finetune_job import check_finetune_inputs

    with pytest.raises(UserError, match="set vqa.question_encoder_from"):
        check_finetune_inputs(_cfg(task="vqa"))


def _tiny_vision():
    from blip2_ray.model.config import model_config
    from blip2_ray.model.vision import freeze_vision
    from blip2_ray.weights.vision import build_vision_model

    torch.manual_seed(0)
    v = build_vision_model(model_config("tiny").vision)
    freeze_vision(v, torch.float32)
    return v


def test_unfrozen_vit_gets_gradients_and_checkpointing_computes_the_same():
    from blip2_ray.model.vision import encode_image, unfreeze_vision

    px = torch.randn(2, 3, 32, 32)
    frozen = _tiny_vision()
    ref = encode_image(frozen, px)
    assert not ref.requires_grad or all(p.grad is None for p in frozen.embeddings.parameters())
    grads = []
    for ckpt in (False, True):
        v = _tiny_vision()
        unfreeze_vision(v, grad_checkpointing=ckpt)
        v.train()
        out = encode_image(v, px)
        torch.testing.assert_close(out, ref)  # same weights, no drop path: the frozen path's values
        out.square().sum().backward()
        g = v.encoder.layers[0].mlp.fc1.weight.grad
        assert g is not None and g.abs().sum() > 0
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1])


def test_drop_path_drops_whole_blocks_per_sample_in_training_only():
    from blip2_ray.model.vision import encode_image, unfreeze_vision

    v = _tiny_vision()
    ref = encode_image(v, torch.ones(64, 3, 32, 32))
    unfreeze_vision(v, drop_path=0.5)
    assert v.vit_training.drop_path == [0.0, 0.5]  # linear from 0 at the first block to the rate at the last
    v.eval()
    torch.testing.assert_close(encode_image(v, torch.ones(64, 3, 32, 32)), ref)
    v.train()
    torch.manual_seed(1)
    out = encode_image(v, torch.ones(64, 3, 32, 32))
    # identical inputs: a sample either drops the last block's update or keeps it scaled by 1 / (1 - 0.5)
    like_first = torch.tensor([torch.allclose(r, out[0], atol=1e-4) for r in out])
    rest = out[~like_first]
    assert 0 < len(rest) < 64 and all(torch.allclose(r, rest[0], atol=1e-4) for r in rest)


def test_layer_decay_scales_blocks_and_embeddings_and_groups_carry_their_lr():
    from blip2_ray.model.config import model_config
    from blip2_ray.train.finetune_model import finetune_model, vit_lr_scale
    from blip2_ray.train.optim import param_groups
    from blip2_ray.weights.builders import build_stage2

    cfg = _cfg(vision_training={"layer_decay": 0.5})
    torch.manual_seed(0)
    model = build_stage2(model_config("tiny"))
    finetune_model(model, cfg)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.vision_model.parameters())
    assert not any(p.requires_grad for p in model.language_model.parameters())  # the LLM stays frozen
    scale = vit_lr_scale(model, cfg)
    assert scale("vision_model.encoder.layers.1.mlp.fc1.weight") == 0.5  # the last of 2 blocks: d^1
    assert scale("vision_model.encoder.layers.0.mlp.fc1.weight") == 0.25
    assert scale("vision_model.embeddings.patch_embedding.weight") == 0.125
    assert scale("vision_model.post_layernorm.weight") == 1.0 and scale("qformer.layernorm.weight") == 1.0
    groups = param_groups(model, 0.05, lr_scale=scale, lr=1e-3)
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == [1.25e-4, 2.5e-4, 5e-4, 1e-3]
    n = sum(len(g["params"]) for g in groups)
    assert n == sum(1 for p in model.parameters() if p.requires_grad)
    assert vit_lr_scale(model, _cfg()) is None


def test_memory_sentence_for_an_unfrozen_real_vit_on_one_worker():
    from blip2_ray.train.finetune_job import start_warnings

    cfg = _cfg(model={"preset": "vitg_opt2.7b"}, scaling={"num_workers": 1}, train={"global_batch_size": 16},
               data={"image_size": 224})
    (msg,) = start_warnings(cfg)
    assert "without ZeRO sharding" in msg and "14.7 GiB" in msg, msg
    assert start_warnings(_cfg(model={"preset": "vitg_opt2.7b"}, vision_training={"freeze_vit": True},
                               data={"image_size": 224})) == []


def test_a_larger_image_size_resamples_the_position_embeddings_once():
    from blip2_ray.model.vision import encode_image, interpolate_position_embedding, resize_vision_input

    v = _tiny_vision()
    before = v.embeddings.position_embedding.detach().clone()  # (1, 1 + 4*4, 32): 32 px, patch 8
    assert resize_vision_input(v, 48) and not resize_vision_input(v, 48)
    after = v.embeddings.position_embedding
    assert after.shape == (1, 1 + 36, 32) and v.config.image_size == 48
    torch.testing.assert_close(after.detach(), interpolate_position_embedding(before, (1, 37, 32)))
    torch.testing.assert_close(after[0, 0].detach(), before[0, 0])  # CLS position kept
    assert encode_image(v, torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)


def test_init_from_a_whole_blip2_directory_becomes_hf_path(tmp_path):
    from blip2_ray.train.finetune_job import resolve_start

    (tmp_path / "blip2").mkdir()
    (tmp_path / "blip2/config.json").write_text(json.dumps({"model_type": "blip-2",
                                                            "architectures": ["Blip2ForConditionalGeneration"]}))
    cfg = resolve_start(_cfg(model={"init_from": str(tmp_path / "blip2")}))
    assert cfg.model.hf_path == str(tmp_path / "blip2") and cfg.model.init_from is None
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1/config.json").write_text(json.dumps({"model_type": "blip-2",
                                                         "architectures": ["Blip2ForImageTextRetrieval"]}))
    cfg = resolve_start(_cfg(model={"init_from": str(tmp_path / "s1")}))
    assert cfg.model.init_from == str(tmp_path / "s1") and cfg.model.hf_path is None  # a stage-1 export


def test_real_caption_config_carries_lavis_caption_coco_ft_values():
    cfg = load_config(FinetuneConfig, ROOT / "jobs/configs/finetune_caption_coco.yaml")
    t, g = cfg.train, cfg.evaluation.generation
    assert (cfg.model.preset, cfg.model.vision.image_size, cfg.data.image_size) == ("vitg_opt2.7b", 364, 364)
    assert (t.lr, t.warmup_steps, t.weight_decay, t.micro_batch_size, cfg.scaling.num_workers) == (1e-5, 1000, 0.05,
                                                                                                   16, 8)
    assert t.max_steps == -(-566_747 * 5 // t.global_batch_size)  # 5 epochs of COCO Karpathy train captions
    assert (g.num_beams, g.max_new_tokens, g.min_new_tokens) == (5, 30, 8)  # new tokens only (LAVIS #707)
    assert cfg.model.llm.prompt == "a photo of " and not cfg.vision_training.freeze_vit
    assert cfg.vision_training.grad_checkpointing


def test_itc_by_image_spreads_targets_over_captions_of_the_same_image():
    import torch.nn.functional as F

    from blip2_ray.model import losses
    from blip2_ray.model.retrieval_finetune import itc_loss_by_image, same_image

    torch.manual_seed(0)
    sim_i2t, sim_t2i = torch.randn(4, 4), torch.randn(4, 4)
    distinct = same_image(torch.tensor([1, 2, 3, 4]))
    torch.testing.assert_close(itc_loss_by_image(sim_i2t, sim_t2i, distinct, 0.1),
                               losses.itc_loss(sim_i2t, sim_t2i, 0, 0.1))
    same = same_image(torch.tensor([7, 7, 8, 9]))  # samples 0 and 1: two captions of one image
    assert same.tolist()[0] == [True, True, False, False]
    ref = 0.0
    for sim in (sim_i2t, sim_t2i):
        for b in range(4):
            t = torch.tensor([0.5, 0.5, 0, 0]) if b < 2 else F.one_hot(torch.tensor(b), 4).float()
            t = 0.9 * t + 0.1 / 4
            ref += -(F.log_softmax(sim[b], 0) * t).sum() / 4
    torch.testing.assert_close(itc_loss_by_image(sim_i2t, sim_t2i, same, 0.1), ref / 2)


def test_hard_negatives_never_come_from_the_same_image():
    from blip2_ray.model.retrieval_finetune import hard_negatives_of_other_images, same_image

    ids = torch.tensor([5, 5, 5, 6, 6, 7])
    same = same_image(ids)
    sim = torch.zeros(6, 6)
    sim[same] = 50.0  # the same image's captions are by far the most similar: the hardest, but not negatives
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        neg_img, neg_txt = hard_negatives_of_other_images(sim, sim, same, g)
        assert (ids[neg_img] != ids).all() and (ids[neg_txt] != ids).all()
    with pytest.raises(ValueError, match="another image"):
        one = same_image(torch.tensor([3, 3]))
        hard_negatives_of_other_images(torch.zeros(2, 2), torch.zeros(2, 2), one)


def test_retrieval_step_uses_image_ids_and_trains_the_vit():
    from blip2_ray.model.config import model_config
    from blip2_ray.train.finetune_model import finetune_model, image_ids_of_keys
    from blip2_ray.weights.builders import build_stage1

    torch.manual_seed(0)
    model = build_stage1(model_config("tiny"))
    finetune_model(model, _cfg(task="retrieval"))
    model.train()
    assert model.vision_model.training
    ids = image_ids_of_keys(["coco_7/0", "coco_7/1", "coco_9/0", "coco_10/0"])
    assert ids[0] == ids[1] and len(set(ids.tolist())) == 3
    out = model(torch.randn(4, 3, 32, 32), torch.randint(5, 50, (4, 8)), torch.ones(4, 8, dtype=torch.long),
                image_ids=ids)
    out.loss.backward()
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_flickr30k_files_as_downloaded_arrive_in_the_shards_with_their_image_ids(tmp_path):
    """Karpathy's dataset_flickr30k.json (no "filepath": file names under flickr30k-images/, "imgid" the image
    id) and LAVIS' flickr30k_train.json (paths under the folder above, string ids): the rows, and image ids
    that keep the five captions of one image from being negatives of each other."""
    from blip2_ray.train.finetune_model import image_ids_of_keys

    _images(tmp_path / "flickr30k-images", ["1000092795.jpg", "10002456.jpg", "1000268201.jpg"])

    def sentences(imgid, raws):
        return [{"tokens": r.lower().rstrip(".").split(), "raw": r, "imgid": imgid, "sentid": 5 * imgid + j}
                for j, r in enumerate(raws)]

    karpathy = {"dataset": "flickr30k", "images": [
        {"sentids": [0, 1], "imgid": 0, "split": "train", "filename": "1000092795.jpg",
         "sentences": sentences(0, ["Two young guys with shaggy hair.", "Two men in green shirts."])},
        {"sentids": [5, 6], "imgid": 1, "split": "val", "filename": "10002456.jpg",
         "sentences": sentences(1, ["Workers look down from up above.", "Men on a ladder."])},
        {"sentids": [10, 11], "imgid": 2, "split": "test", "filename": "1000268201.jpg",
         "sentences": [{"tokens": ["a", "child", "in", "pink"], "imgid": 2, "sentid": 10},
                       {"tokens": ["a", "girl"], "raw": "A girl going into a building.", "imgid": 2,
                        "sentid": 11}]}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    root = str(tmp_path / "flickr30k-images")
    train = read_caption_annotations(str(tmp_path / "dataset_flickr30k.json"), root)
    assert [(e["path"], e["image_id"], e["captions"]) for e in train.entries] == [
        (f"{root}/1000092795.jpg", 0, ["Two young guys with shaggy hair.", "Two men in green shirts."])]
    test = read_caption_annotations(str(tmp_path / "dataset_flickr30k.json"), root, split="test")
    assert test.entries[0]["captions"] == ["a child in pink", "A girl going into a building."]  # no raw: tokens
    assert test.entries[0]["image_id"] == 2 and not test.missing

    lavis = [{"image": "flickr30k-images/1000092795.jpg", "caption": "Two young guys with shaggy hair.",
              "image_id": "1000092795"},
             {"image": "flickr30k-images/1000092795.jpg", "caption": "Two men in green shirts.",
              "image_id": "1000092795"},
             {"image": "flickr30k-images/10002456.jpg", "caption": "Men on a ladder.", "image_id": "10002456"},
             {"image": "flickr30k-images/404.jpg", "caption": "gone", "image_id": "404"}]
    (tmp_path / "flickr30k_train.json").write_text(json.dumps(lavis))
    ann = read_caption_annotations(str(tmp_path / "flickr30k_train.json"), str(tmp_path))
    assert [e["image_id"] for e in ann.entries] == ["1000092795", "10002456"] and len(ann.missing) == 1

    for got, name, want_keys in ((train, "k", ["0/0", "0/1"]),
                                 (ann, "l", ["1000092795/0", "1000092795/1", "10002456/0"])):
        manifest = write_caption_shards(got, str(tmp_path / name), 100, name)
        t = pq.read_table(manifest["files"][0]).to_pydict()
        assert t["key"] == want_keys and manifest["rows"] == len(want_keys)
        assert t["image"][0] == (tmp_path / "flickr30k-images/1000092795.jpg").read_bytes()
        assert t["caption"][:2] == ["Two young guys with shaggy hair.", "Two men in green shirts."]
        ids = image_ids_of_keys(t["key"]).tolist()
        assert ids[0] == ids[1] and len(set(ids)) == len({k.rsplit("/", 1)[0] for k in want_keys})
    assert t["image_id"] == ["1000092795", "1000092795", "10002456"]
    assert t["image"][2] == (tmp_path / "flickr30k-images/10002456.jpg").read_bytes()


def test_s3_storage_packs_the_shards_once_into_the_bucket(tmp_path, monkeypatch):
    """storage_path s3://... (a real S3 server, moto, on 127.0.0.1): the shards are uploaded under
    <run_name>/finetune_shards, data.train points there and reads from the storage's endpoint; a resumed run
    finds them by fingerprint and uploads nothing; a changed annotation file replaces them."""
    import boto3
    from moto.server import ThreadedMotoServer

    from blip2_ray.runtime.cluster import free_port
    from blip2_ray.train.finetune_job import prepare_shards

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="runs")
        _images(tmp_path / "img", ["a.jpg", "b.jpg"])
        lavis = [{"image": "a.jpg", "caption": "a red circle", "image_id": "1"},
                 {"image": "b.jpg", "caption": "a blue square", "image_id": "2"}]
        (tmp_path / "train.json").write_text(json.dumps(lavis))
        cfg = _cfg(annotations={"train": str(tmp_path / "train.json"), "image_root": str(tmp_path / "img"),
                                "shard_records": 1},
                   storage_path="s3://runs/ft", storage_endpoint_url=endpoint, run_name="r")
        ann = read_caption_annotations(str(tmp_path / "train.json"), str(tmp_path / "img"))
        out, manifest = prepare_shards(cfg, ann)
        assert out.data.train == ["s3://runs/ft/r/finetune_shards"] and out.data.s3_endpoint_url == endpoint
        assert manifest["files"] == ["s3://runs/ft/r/finetune_shards/00000.parquet",
                                     "s3://runs/ft/r/finetune_shards/00001.parquet"] and manifest["rows"] == 2
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="runs")["Contents"])
        assert keys == ["ft/r/finetune_shards/00000.parquet", "ft/r/finetune_shards/00001.parquet",
                        "ft/r/finetune_shards/manifest.json"]
        stamp = s3.head_object(Bucket="runs", Key="ft/r/finetune_shards/00000.parquet")["ETag"]
        assert prepare_shards(cfg, ann)[1] == manifest  # the resumed run: found, nothing packed again
        s3.delete_object(Bucket="runs", Key="ft/r/finetune_shards/00001.parquet")
        assert prepare_shards(cfg, ann)[1] == manifest  # a shard gone: packed and uploaded again
        assert s3.head_object(Bucket="runs", Key="ft/r/finetune_shards/00000.parquet")["ETag"] == stamp
        (tmp_path / "train.json").write_text(json.dumps(lavis[:1]))
        cfg = _cfg(annotations={"train": str(tmp_path / "train.json"), "image_root": str(tmp_path / "img"),
                                "shard_records": 1},
                   storage_path="s3://runs/ft", storage_endpoint_url=endpoint, run_name="r")
        _, manifest = prepare_shards(cfg, read_caption_annotations(str(tmp_path / "train.json"), str(tmp_path / "img")))
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="runs")["Contents"])
        assert manifest["rows"] == 1 and keys == ["ft/r/finetune_shards/00000.parquet",
                                                  "ft/r/finetune_shards/manifest.json"]
    finally:
        server.stop()


def test_relative_paths_the_workers_read_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    """The README's tiny configs name demo_out/... relative to the checkout; the Train workers run elsewhere."""
    from blip2_ray.train.finetune_job import absolute_annotation_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_annotation_paths(_cfg(task="vqa", vqa={"question_encoder_from": "demo_out/stage1"},
                                         annotations={"train": "a.json", "questions": "q.json", "eval": "e.json",
                                                      "eval_questions": "eq.json", "image_root": "img"}))
    a = cfg.annotations
    assert cfg.vqa.question_encoder_from == str(tmp_path / "demo_out/stage1")
    assert [a.train, a.questions, a.eval, a.eval_questions, a.image_root] == [
        str(tmp_path / n) for n in ("a.json", "q.json", "e.json", "eq.json", "img")]
