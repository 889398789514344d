"""`make demo`: generated shapes data -> stage 1 -> stage 2 -> held-out R@1 and captions, on CPU.

The frozen parts are tiny: a random frozen ViT (random features keep colour and shape) and a tiny OPT
first trained for a few seconds as a plain language model on the caption text (so the frozen LLM can
say "a red circle" at all); both stay frozen for BLIP-2. Everything else is the real job:
`run_pretrain` with 2 Ray Train workers and DeepSpeed ZeRO-2.
"""

from __future__ import annotations

import os
import time

import torch


def pretrain_tiny_llm(out_dir: str, captions: list[str], steps: int = 300, seed: int = 0) -> str:
    """A tiny OPT trained on `captions` (plain PyTorch, seconds), saved with its tokenizer to `out_dir`."""
    from blip2_ray.data.records import tokenize_llm
    from blip2_ray.model.config import model_config
    from blip2_ray.model.hf_io import build_language_model, llm_tokenizer, padded_vocab

    torch.manual_seed(seed)
    cfg = model_config("tiny")
    tok = llm_tokenizer(cfg)
    lm = build_language_model(cfg, padded_vocab(len(tok)))
    enc = tokenize_llm(tok, captions, 16)
    ids, mask = torch.from_numpy(enc["llm_input_ids"]), torch.from_numpy(enc["llm_attention_mask"])
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    lm.train()
    for _ in range(steps):
        i = torch.randint(0, len(ids), (64,))
        labels = ids[i].masked_fill(mask[i] == 0, -100)
        loss = lm(input_ids=ids[i], attention_mask=mask[i], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def held_out_rows(shards: str, image_size: int, qformer_tok: str | None, llm_tok: str | None) -> list[dict]:
    """Eval-transformed rows of the held-out shards (through the real pipeline, no augmentation)."""
    from blip2_ray.data.config import DataConfig
    from blip2_ray.data.pipeline import build_dataset

    cfg = DataConfig(image_size=image_size)
    return build_dataset(cfg, [shards], train=False, qformer_tokenizer=qformer_tok, llm_tokenizer=llm_tok).take_all()


def colour_shape(caption: str) -> tuple[str, str]:
    from blip2_ray.model.tokenizers import COLOURS, SHAPES

    words = caption.split()
    return next(w for w in words if w in COLOURS), next(w for w in words if w in SHAPES)


def main(work: str = "demo_out", stage1_steps: int = 600, stage2_steps: int = 400) -> dict:
    import ray

    from blip2_ray.config import load_config
    from blip2_ray.data.sample import make_sample_shards
    from blip2_ray.model.hf_io import load_stage1, load_stage2, tokenizer_path
    from blip2_ray.model.stage2 import generate_text
    from blip2_ray.train.config import PretrainConfig
    from blip2_ray.train.evaluate import caption_names_object, retrieval_recall_at_1
    from blip2_ray.train.trainer import run_pretrain

    t0 = time.time()
    work = os.path.abspath(work)
    train = make_sample_shards(f"{work}/data/train", num=2048, shards=8, image_size=32, seed=0)
    make_sample_shards(f"{work}/data/heldout", num=96, shards=1, image_size=32, seed=12345)
    print(f"data: {train['good']} training and 96 held-out images of coloured shapes", flush=True)
    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", num_cpus=4, include_dashboard=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}})
    common = [f"data.train=[{work}/data/train]", "data.image_size=32", "data.min_crop_scale=0.8",
              "data.shuffle_buffer=256", "data.num_cpus_per_decode_task=0.5", "data.decode_batch_size=64",
              "train.global_batch_size=64", "train.micro_batch_size=32", "train.precision=fp32",
              "train.lr=1e-3", "train.warmup_steps=20", "train.log_every=25", "train.checkpoint_every=1000",
              "scaling.num_workers=2", f"storage_path={work}/runs", "model.qformer.dropout=0.0"]
    s1 = load_config(PretrainConfig, None, common + [
        "stage=1", f"run_name=demo_stage1_{int(t0)}", f"output_dir={work}/stage1", f"train.max_steps={stage1_steps}"])
    run_pretrain(s1)

    qtok = tokenizer_path("tiny", "qformer")
    rows = held_out_rows(f"{work}/data/heldout", 32, qtok, None)
    stage1, _ = load_stage1(s1.output_dir, vision_dtype="float32")
    stack = lambda k: torch.stack([torch.as_tensor(r[k]) for r in rows])  # noqa: E731
    r1, chance = retrieval_recall_at_1(stage1, stack("pixel_values"), stack("qformer_input_ids"),
                                       stack("qformer_attention_mask"),
                                       [colour_shape(r["caption"]) for r in rows])
    print(f"stage 1: held-out image->text R@1 {r1:.2f} (chance {chance:.2f}) [{time.time() - t0:.0f}s]", flush=True)

    from blip2_ray.data.sample import TEMPLATES
    from blip2_ray.model.tokenizers import COLOURS, SHAPES

    texts = [t.format(c=c, s=s) for t in TEMPLATES for c in COLOURS[:6] for s in SHAPES[:4]]
    llm_dir = pretrain_tiny_llm(f"{work}/tiny_llm", texts)
    s2 = load_config(PretrainConfig, None, common + [
        "stage=2", f"run_name=demo_stage2_{int(t0)}", f"output_dir={work}/stage2", f"train.max_steps={stage2_steps}",
        f"model.init_from={s1.output_dir}", f"model.llm.path={llm_dir}"])
    run_pretrain(s2)

    model = load_stage2(s2.output_dir, vision_dtype=torch.float32, llm_dtype=torch.float32)
    from blip2_ray.model.hf_io import llm_tokenizer

    tok = llm_tokenizer(s2.model)
    tok.padding_side = "left"
    gen = generate_text(model, tok, stack("pixel_values"), num_beams=1, max_new_tokens=8)
    truth = [colour_shape(r["caption"]) for r in rows]
    right = sum(caption_names_object(g, c, s) for g, (c, s) in zip(gen, truth))
    for g, (c, s) in list(zip(gen, truth))[:6]:
        print(f"  true: {c} {s:10s} generated: {g!r}")
    print(f"stage 2: {right}/{len(rows)} held-out captions name the right colour and shape "
          f"[{time.time() - t0:.0f}s total]", flush=True)
    return {"r1": r1, "chance": chance, "caption_accuracy": right / len(rows), "seconds": time.time() - t0}
