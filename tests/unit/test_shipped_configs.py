"""Every shipped config (jobs/configs/*.yaml) loads through its job's typed config as shipped, and passes its job's
start-up checks rehearsed at tiny size: each file or directory it names is replaced by a tiny stand-in of the kind
that key expects (in the layout of the real one: a CLIP or EVA ViT directory, a BERT, an OPT / T5, a stage-1 or
stage-2 export, annotation files, shards), and its model sizes by the tiny preset's (the kinds, dtypes and every
other setting kept). A config a job refuses at start (as the vitl ones once were) fails here."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from blip2_ray.config import from_dict, load_config, read_yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
CLIP_EPS = 1e-5  # CLIP's layer_norm_eps (the vitl presets')


def job_of(path: Path) -> str:
    name = path.stem
    for prefix, job in (("stage", "pretrain"), ("finetune_", "finetune"), ("eval_", "evaluate"),
                        ("capfilt_", "capfilt"), ("serve", "serve"), ("index_", "index")):
        if name.startswith(prefix):
            return job
    raise AssertionError(f"{path.name}: no job for this config name; add it to job_of")


def test_every_shipped_config_has_a_job():
    assert CONFIGS and {job_of(p) for p in CONFIGS} == {"pretrain", "finetune", "evaluate", "capfilt", "serve", "index"}


@pytest.fixture(scope="module")
def standins(tmp_path_factory, tiny_tokenizers, tiny_blip_clip) -> dict[str, str]:
    """Tiny stand-ins of every kind of file the shipped configs name, in the real layouts."""
    import torch
    from transformers import BertConfig, BertForPreTraining, CLIPVisionConfig, CLIPVisionModel

    from blip2_ray.fixtures.sample import make_sample_shards
    from blip2_ray.fixtures.sample_coco import make_coco_karpathy_sample
    from blip2_ray.fixtures.sample_vqa import make_vqav2_sample
    from blip2_ray.model.config import model_config
    from blip2_ray.model.language_model import padded_vocab
    from blip2_ray.model.vision import vision_module
    from blip2_ray.weights.builders import build_stage1, build_stage2
    from blip2_ray.weights.hf_format import export_stage1, export_stage2
    from blip2_ray.weights.language_model import build_language_model
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer

    root = tmp_path_factory.mktemp("standins")
    torch.manual_seed(0)
    eva, clip = model_config("tiny"), model_config("tiny", vision={"kind": "clip_vit_l", "layer_norm_eps": CLIP_EPS})
    out = {"shards": make_sample_shards(str(root / "shards"), num=4, shards=1, image_size=32)["files"][0]}
    out["shards"] = str(Path(out["shards"]).parent)
    vision_module(eva.vision).save_pretrained(root / "eva_vit")
    v = eva.vision
    CLIPVisionModel(CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                     num_hidden_layers=v.num_layers + 1, num_attention_heads=v.num_heads,
                                     image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=CLIP_EPS)
                    ).save_pretrained(root / "clip_vit")
    q, qtok = eva.qformer, qformer_tokenizer(eva)
    BertForPreTraining(BertConfig(vocab_size=len(qtok) - 1, hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
                                  num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size)
                       ).save_pretrained(root / "bert")
    for preset, name in (("tiny", "opt"), ("tiny_t5", "t5")):
        cfg = model_config(preset)
        tok = llm_tokenizer(cfg)
        build_language_model(cfg, padded_vocab(len(tok))).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        export_stage2(build_stage2(cfg, tok), str(root / f"stage2_{name}"), tok, cfg)
    for cfg, name in ((eva, "eva_vit_g"), (clip, "clip_vit_l")):
        export_stage1(build_stage1(cfg), str(root / f"stage1_{name}"), qformer_tokenizer(cfg), cfg)
    coco = make_coco_karpathy_sample(str(root / "coco"), num_train=4, num_test=2, image_size=32)
    vqa = make_vqav2_sample(str(root / "vqa"), num_train=4, num_test=2, image_size=32)
    (root / "references.json").write_text("{}")
    out.update({k: str(root / k) for k in ("eva_vit", "clip_vit", "bert", "opt", "t5", "stage2_opt", "stage2_t5",
                                           "stage1_eva_vit_g", "stage1_clip_vit_l")})
    out.update(coco=coco, vqa=vqa, references=str(root / "references.json"), blip=tiny_blip_clip["blip"],
               clip=tiny_blip_clip["clip"])
    return out


def tiny_model_section(model: dict, s: dict, vision_kind: str, llm_kind: str) -> dict:
    """The config's model section at the tiny preset's sizes, its paths on stand-ins of the same kinds."""
    from blip2_ray.model.config import PRESETS

    keep = ("kind", "dtype", "path", "prompt", "tokenizer", "init_from_bert", "ln_vision_eps", "layer_norm_eps")
    tiny = PRESETS["tiny_t5" if llm_kind == "t5" else "tiny"]
    m = copy.deepcopy(model)
    for part in ("vision", "qformer", "llm"):
        m[part] = {**m.get(part, {}), **{k: v for k, v in tiny[part].items() if k not in keep}}
    m["vision"]["image_size"] = 32
    if vision_kind == "clip_vit_l":
        m["vision"]["layer_norm_eps"] = CLIP_EPS
    if m["vision"].get("path"):
        m["vision"]["path"] = s["clip_vit" if vision_kind == "clip_vit_l" else "eva_vit"]
    if m["qformer"].get("init_from_bert"):
        m["qformer"]["init_from_bert"] = s["bert"]
    m["qformer"]["tokenizer"] = "tiny"
    if m["llm"].get("path"):
        m["llm"]["path"] = s["t5" if llm_kind == "t5" else "opt"]
    m["llm"]["tokenizer"] = "tiny"
    return m


def rehearse_pretrain(path: Path, s: dict, tmp: Path) -> None:
    from blip2_ray.train.config import PretrainConfig
    from blip2_ray.train.trainer import absolute_paths, check_inputs

    shipped = load_config(PretrainConfig, path)
    data = read_yaml(path)
    data["model"] = tiny_model_section(data.get("model", {}), s, shipped.model.vision.kind, shipped.model.llm.kind)
    if shipped.model.init_from:
        data["model"]["init_from"] = s[f"stage1_{shipped.model.vision.kind}"]
    data["data"] = {**data.get("data", {}), "train": [s["shards"]], "image_size": 32}
    cfg = absolute_paths(from_dict(PretrainConfig, data))
    assert (cfg.model.vision.kind, cfg.model.llm.kind, cfg.stage) == (
        shipped.model.vision.kind, shipped.model.llm.kind, shipped.stage)
    check_inputs(cfg)
    cfg.start_warnings()


def rehearse_finetune(path: Path, s: dict, tmp: Path) -> None:
    from blip2_ray.train.finetune_config import FinetuneConfig
    from blip2_ray.train.finetune_job import check_finetune_inputs, resolve_start, start_warnings
    from blip2_ray.train.trainer import absolute_paths

    shipped = load_config(FinetuneConfig, path)
    data = read_yaml(path)
    m = shipped.model
    data["model"] = tiny_model_section(data.get("model", {}), s, m.vision.kind, m.llm.kind)
    data["model"]["init_from"] = s[f"stage1_{m.vision.kind}"] if shipped.task == "retrieval" else s["stage2_opt"]
    data["data"] = {**data.get("data", {}), "image_size": 32}
    a = dict(data.get("annotations", {}))
    if shipped.task == "instruct":
        rehearse_instruct_sources(data, s, tmp)
    elif shipped.task == "vqa":
        v = s["vqa"]
        data["vqa"] = {**data.get("vqa", {}), "question_encoder_from": s["stage1_eva_vit_g"]}
        a.update(train=v["train"], questions=v["train_questions"], eval=v["test"], eval_questions=v["test_questions"],
                 image_root=v["train_image_root"], eval_image_root=v["test_image_root"])
    else:
        c = s["coco"]
        a.update(train=c["train"], eval=c["test"], image_root=c["image_root"], train_split="train",
                 eval_split="test")
    data["annotations"] = a
    cfg = resolve_start(absolute_paths(from_dict(FinetuneConfig, data)))
    check_finetune_inputs(cfg)
    start_warnings(cfg)


def rehearse_instruct_sources(data: dict, s: dict, tmp: Path) -> None:
    """Each instruction source's files replaced by generated ones of its kind (LAVIS caption / VQA lists, LLaVA
    conversations), held-in and held-out as shipped; the Q-Former's text path from a tiny stage-1 export."""
    from blip2_ray.fixtures.sample_instruct import make_instruct_sample

    d = make_instruct_sample(str(tmp / "instruct"), 8, 4, 32, 0)
    by_kind = {"caption": "describe", "vqa": "colour", "vqg": "colour", "conversation": "chat"}
    sources = []
    for src in data["instruct"]["sources"]:
        src, task = dict(src), by_kind[src["kind"]]
        src.pop("questions", None), src.pop("eval_questions", None)
        if src.get("train"):
            src.update(train=d[f"{task}_train"], image_root=d["image_root"]["train"])
        if src.get("eval"):
            src.update(eval=d[f"{task}_test"], eval_image_root=d["image_root"]["test"])
            src.setdefault("image_root", d["image_root"]["test"])
        sources.append(src)
    data["instruct"] = {**data["instruct"], "sources": sources, "qformer_text_from": s["stage1_eva_vit_g"]}


def rehearse_evaluate(path: Path, s: dict, tmp: Path) -> None:
    from blip2_ray.eval.config import EvalConfig
    from blip2_ray.eval.job import check_inputs

    shipped = load_config(EvalConfig, path)
    data = read_yaml(path)
    if shipped.task == "retrieval":
        data["model"] = s["stage1_eva_vit_g"]
    else:
        data["model"] = s["stage2_t5" if "t5" in shipped.model else "stage2_opt"]
    t = dict(data.get("test_set", {}))
    for key, standin in (("annotations", s["coco"]["test"]), ("questions", s["vqa"]["test_questions"]),
                         ("references", s["references"]), ("image_root", s["coco"]["image_root"])):
        if t.get(key):
            t[key] = standin
    if t.get("shards"):
        t["shards"] = [s["shards"]]
    data["test_set"], data["output"] = t, str(tmp / "report.json")
    check_inputs(from_dict(EvalConfig, data))


def rehearse_capfilt(path: Path, s: dict, tmp: Path) -> None:
    from blip2_ray.capfilt.config import CapFiltConfig
    from blip2_ray.capfilt.job import check_models
    from blip2_ray.data.pipeline import resolve_sources

    shipped = load_config(CapFiltConfig, path)
    data = read_yaml(path)
    data["captioner"] = {**data["captioner"], "model": {"blip": s["blip"], "blip2": s["stage2_opt"]}[
        shipped.captioner.kind]}
    data["filter"] = {**data["filter"], "model": {"clip": s["clip"], "blip2_itc": s["stage1_eva_vit_g"]}[
        shipped.filter.kind]}
    data.update(input=[s["shards"]], output_dir=str(tmp / "capfilt"))
    cfg = from_dict(CapFiltConfig, data)
    check_models(cfg)
    assert resolve_sources(cfg.input, cfg.data)


def rehearse_serve(path: Path, s: dict, tmp: Path) -> None:
    from blip2_ray.serve.config import ServeConfig
    from blip2_ray.serve.model_kinds import check_servable

    (app,) = read_yaml(path)["applications"]
    assert app["import_path"] == "blip2_ray.serve.app:app_builder"
    args = dict(app["args"])
    # the shipped directories, as the strict config reads them (they exist only on a serve node)
    assert {"model", "retrieval_model"} <= set(args)
    args.update(model=s["stage2_opt"], retrieval_model=s["stage1_clip_vit_l"])
    assert check_servable(from_dict(ServeConfig, args)) == {"model": "stage2", "retrieval_model": "stage1"}


def rehearse_index(path: Path, s: dict, tmp: Path) -> None:
    from blip2_ray.search.config import IndexJobConfig
    from blip2_ray.search.job import plan

    load_config(IndexJobConfig, path)
    data = read_yaml(path)
    data.update(model=s["stage1_eva_vit_g"], input=[s["shards"]], output_dir=str(tmp / "index"))
    files, todo, identity = plan(from_dict(IndexJobConfig, data))
    assert files and todo == files and identity["fingerprint"]


REHEARSALS = {"pretrain": rehearse_pretrain, "finetune": rehearse_finetune, "evaluate": rehearse_evaluate,
              "capfilt": rehearse_capfilt, "serve": rehearse_serve, "index": rehearse_index}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_passes_its_jobs_start_up_checks(path, standins, tmp_path):
    REHEARSALS[job_of(path)](path, standins, tmp_path)
