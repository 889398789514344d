"""Tiny random BLIP captioner and CLIP filter directories, built offline, in the real layouts.

`build_tiny_blip` writes what `BlipForConditionalGeneration.save_pretrained` + `BlipProcessor.save_pretrained`
write for Salesforce/blip-image-captioning-large: a plain BERT WordPiece tokenizer WITHOUT the `[DEC]`
token (the model's text vocabulary is two larger and `[DEC]` = bos_token_id sits just past the
tokenizer's last id, exactly as 30522 does for bert-base-uncased) and a 384x384-style square resize.
`build_tiny_clip` writes the layout of openai/clip-vit-large-patch14: a byte-level BPE with `</w>`
word ends (trained here with `tokenizers` on a small fixed corpus), `<|startoftext|>`/`<|endoftext|>`
at the end of the vocabulary, the legacy `eos_token_id: 2` of OpenAI's config (CLIP then pools at the
highest id, which is `<|endoftext|>`), the 77-token text limit, shortest-edge resize + centre crop.
For tests and benchmarks: the work per image is real, the captions and scores are random.
"""

from __future__ import annotations

import json
from pathlib import Path

from blip2_ray.model.tokenizers import COLOURS, CORPUS_WORDS, SHAPES

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# CLIP's own pre-tokenisation pattern (contractions, letter runs, single digits, other runs)
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _sentences() -> list[str]:
    lines = [f"a picture of a {c} {s} on a white background" for c in COLOURS for s in SHAPES]
    return lines + [" ".join(CORPUS_WORDS), "0123456789 .,;:!?'\"()-_/"]


def blip_tokenizer(out: Path):
    """bert-base-uncased's kind of tokenizer (no `[DEC]`: BLIP's config names it by id), saved to `out`."""
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-_/")
    vocab = specials + chars + ["##" + c for c in chars] + sorted(set(CORPUS_WORDS) - set(chars))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=512)
    tok.save_pretrained(str(out))
    return tok


def clip_tokenizer(out: Path, vocab_size: int = 700):
    """A CLIP byte-level BPE tokenizer (vocab: bytes, bytes+`</w>`, merges, then the two specials)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tk = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                          normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  show_progress=False)
    tk.train_from_iterator(_sentences(), trainer=trainer)
    merges = [tuple(m) for m in json.loads(tk.to_str())["model"]["merges"]]
    # OpenAI's order: every byte alone and at a word end first (so any text tokenises), merges, specials
    tokens = alphabet + [a + "</w>" for a in alphabet]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    # the hub copy also carries the original BPE files beside tokenizer.json
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return tok


def build_tiny_blip(out_dir: str, image_size: int = 32, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A random BlipForConditionalGeneration directory with its processor files, BLIP-large's layout (the
    ViT wider than the text decoder, as 1024 vs 768 there: the decoder's cross-attention maps between them)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    out = Path(out_dir)
    tok = blip_tokenizer(out)
    n = len(tok)
    vision_hidden = hidden * 3 // 2
    text = {"vocab_size": n + 2, "hidden_size": hidden, "encoder_hidden_size": vision_hidden,
            "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
            "max_position_embeddings": 64, "bos_token_id": n, "pad_token_id": tok.pad_token_id,
            "sep_token_id": tok.sep_token_id, "eos_token_id": 2}
    vision = {"hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden, "num_hidden_layers": layers,
              "num_attention_heads": 4, "image_size": image_size, "patch_size": 8}
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=hidden))
    model.save_pretrained(str(out), safe_serialization=True)
    # preprocessor_config.json as the hub copy has it (BlipProcessor reads it back)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_resize": True, "image_mean": CLIP_MEAN, "image_processor_type": "BlipImageProcessor",
        "image_std": CLIP_STD, "processor_class": "BlipProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"height": image_size, "width": image_size}}, indent=2))
    return str(out)


def build_tiny_clip(out_dir: str, image_size: int = 32, hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
    """A random CLIPModel directory with its processor files, openai/clip-vit-large-patch14's layout (ViT
    wider than the text encoder, both projected to one embedding size, as 1024 / 768 -> 768 there)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    out = Path(out_dir)
    tok = clip_tokenizer(out)
    text = {"vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1, "projection_dim": hidden}
    vision = {"hidden_size": hidden * 3 // 2, "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": 4, "image_size": image_size, "patch_size": 8, "projection_dim": hidden}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden))
    model.save_pretrained(str(out), safe_serialization=True)
    # OpenAI's preprocessor_config.json is the old feature-extractor form (sizes as plain ints)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": image_size}, indent=2))
    return str(out)
