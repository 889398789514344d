"""Instruction tuning end to end (jobs/finetune.py, task instruct, finetune_instruct_tiny.yaml) on generated data:
five held-in tasks (shape, yes / no and count questions, describe, LLaVA-style chat) and one task held out entirely
(colour questions: the colour is only in the captions and in half the yes / no questions); the
instruction-tuned model beats the stage-2 model it starts from on the held-in tasks and, zero-shot, on the held-out
one; the ViT did not change; the LoRA adapters on the LLM are merged into an export that loads in transformers as
InstructBlipForConditionalGeneration (the adapters alone load in peft).

The start (fixtures/tiny_instruct.py) is a tiny BLIP-2 whose ViT was pre-trained to tell the images' colours, shapes
and counts apart and whose OPT was pre-trained on the instruction / response texts after a shuffled context holding
the image's attributes (so that it reads them from its soft prompt, as real LLMs use theirs), with a random Q-Former.

GAINS, measured over seeds 0, 1, 2 with `python bench/instruct_evidence.py --seeds 0 1 2` (docs/finetuning.md,
"Instruction tuning", the figures): the test runs seed 0 and asserts half the smallest gain of each.
"""

from __future__ import annotations

import json
import os
import time

from safetensors.torch import load_file

from blip2_ray.fixtures.tiny_instruct import (
    HELD_OUT,
    instruct_data_and_start,
    instruct_gains,
    instruct_job_sets,
    run_instruct_job,
)

# measured 2026-12-08 on the 2-core machine, with data.preserve_order (the config's: the same batches at each run of a
# seed; seed 0 run twice gave the same scores): held-in gains 62.3 / 105.2 / 108.6, held-out (colour, zero-shot)
# gains 45.8 / 70.8 / 54.2 points for seeds 0 / 1 / 2 (docs/finetuning.md); the thresholds are half the smallest of
# each. Without preserve_order the rows' order followed whichever decode task finished first, and seed 0's held-out
# gain ranged from +4.2 (a loaded run, which failed the then +6.2 threshold) to +79.2 on the same machine.
HELD_IN_GAIN = 31.1
HELD_OUT_GAIN = 22.9


def test_instruction_tuning_beats_the_stage2_start_held_in_and_held_out(ray_session, tiny_tokenizers, tmp_path):
    t0 = time.perf_counter()
    d = instruct_data_and_start(str(tmp_path / "start"), seed=0)
    t_start = time.perf_counter() - t0
    out = tmp_path / "out"
    proc = run_instruct_job(instruct_job_sets(d, str(out), str(tmp_path / "runs"), seed=0, lora_r=4),
                         {"RAY_ADDRESS": ray_session}, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "finetune_report.json").read_text())
    g = instruct_gains(report)
    print(f"[instruct test] start {t_start:.0f}s, job {time.perf_counter() - t0 - t_start:.0f}s; {g}")
    assert g["held_in"][1] > g["held_in"][0] + HELD_IN_GAIN, g
    assert g["held_out"][1] > g["held_out"][0] + HELD_OUT_GAIN, g
    assert report["data"]["sources"]["chat"]["rows"] == 2 * 96 and HELD_OUT not in report["data"]["sources"]

    start = load_file(os.path.join(d["start"], "model.safetensors"))
    tuned = load_file(str(out / "model.safetensors"))
    assert "qformer.embeddings.word_embeddings.weight" in tuned  # the instruction-aware Q-Former
    # the ViT's trunk is frozen; its last LayerNorm (BLIP-2's ln_vision, post_layernorm here) trains, as in LAVIS
    vit = [k for k in start if k.startswith("vision_model.") and not k.startswith("vision_model.post_layernorm.")]
    assert vit and all((start[k] == tuned[k]).all() for k in vit), "the frozen ViT changed"
    q = "language_model.model.decoder.layers.0.self_attn.q_proj.weight"
    fc = "language_model.model.decoder.layers.0.fc1.weight"
    assert (start[q] != tuned[q]).any() and (start[fc] == tuned[fc]).all()  # only the LoRA targets moved

    from peft import PeftConfig
    from transformers import InstructBlipForConditionalGeneration

    hf = InstructBlipForConditionalGeneration.from_pretrained(str(out))
    assert (hf.state_dict()[q] == tuned[q]).all()
    assert PeftConfig.from_pretrained(str(out / "llm_lora_adapter")).r == 4
