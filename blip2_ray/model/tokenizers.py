"""Tokenizers: loaded from local HF-format directories, or built offline for the tiny preset.

Real users point `model.qformer.tokenizer` / `model.llm.path` at local copies of bert-base-uncased and
of their LLM. Tests and the demo cannot download anything, so `build_tiny_tokenizers` trains small
tokenizers of the same *kind* (BERT WordPiece with `[DEC]`, OPT byte-level BPE with `</s>` as BOS,
T5 unigram with `</s>` appended, Llama byte-fallback BPE with `<s>` as BOS, Qwen2 byte-level BPE with
no BOS) on a fixed corpus, deterministically, and saves them in HF format. The caption conventions of
each LLM family (what ends a caption, whether a BOS leads) live here too: the data pipeline and the
model both read them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from blip2_ray.errors import UserError
from blip2_ray.model.checkpoint_files import require_local_dir

DEC_TOKEN = "[DEC]"

# Words of the generated shapes data (blip2_ray.data.sample) and of the prompts, so tiny models see
# whole-word tokens; any other text still tokenises through characters / bytes.
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink", "cyan", "brown"]
SHAPES = ["circle", "square", "triangle", "cross", "diamond", "star", "ring", "bar"]
CORPUS_WORDS = COLOURS + SHAPES + (
    "a an the of and on in with is are what which how many there this that photo picture image of "
    "above below left right next to top bottom background small large big one two three four "
    "question answer short color colour shape object objects scene shows showing two cats dog "
    "man woman people street table room sitting standing green field sky water"
).split()


def _corpus() -> list[str]:
    lines = []
    for c in COLOURS:
        for s in SHAPES:
            lines.append(f"a {c} {s}")
            lines.append(f"a photo of a {c} {s} on a white background")
            lines.append(f"Question: what color is the {s}? Answer: {c}")
            lines.append(f"Question: what shape is it? Short answer: {s}")
    lines.append(" ".join(CORPUS_WORDS))
    lines.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-_/\n")
    return lines


def word_piece_tokenizer(out: Path):
    """A tiny bert-base-uncased-like WordPiece tokenizer over the sample corpus (no `[DEC]`); writes out/vocab.txt."""
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-_/")
    vocab = specials + chars + ["##" + c for c in chars] + sorted(set(CORPUS_WORDS) - set(chars))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=512)


def _build_bert(out: Path) -> None:
    tok = word_piece_tokenizer(out)
    # BLIP-2 adds a [DEC] bos token to bert-base-uncased (vocab 30522 -> 30523) for the ITG decoder.
    tok.add_special_tokens({"bos_token": DEC_TOKEN})
    tok.save_pretrained(str(out))


def _build_opt(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],  # OPT's ids: <s>=0 <pad>=1 </s>=2 <unk>=3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_corpus(), trainer=trainer)
    # OPT prepends </s> as its BOS token.
    tk.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", tk.token_to_id("</s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=2048,
    )
    tok.save_pretrained(str(out))


def _build_t5(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("\n", " ")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tk.train_from_iterator(_corpus(), trainer=trainer)
    # T5 appends </s> to every sequence.
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tk.token_to_id("</s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=512
    )
    tok.save_pretrained(str(out))


def _build_llama(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # Llama's layout: SentencePiece-style BPE on "▁"-joined text with byte fallback, <s> prepended
    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False)
    tk.train_from_iterator(_corpus(), trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=2048)  # no pad token, as Llama ships
    tok.save_pretrained(str(out))


def _build_qwen2(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Qwen2's layout: byte-level BPE, no BOS and no EOS added; <|endoftext|> ends text and pads
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  model_max_length=2048)
    tok.save_pretrained(str(out))


TINY_KINDS = {"qformer": ("bert", _build_bert), "opt": ("opt", _build_opt), "t5": ("t5", _build_t5),
              "llama": ("llama", _build_llama), "qwen2": ("qwen2", _build_qwen2)}


def build_tiny_tokenizers(out_dir: str | os.PathLike) -> dict[str, str]:
    """Build (once; cached in `out_dir`) the tiny tokenizers: {"qformer", "opt", "t5", "llama", "qwen2"} -> dir."""
    out = Path(out_dir)
    paths = {kind: out / name for kind, (name, _) in TINY_KINDS.items()}
    builders = {kind: build for kind, (_, build) in TINY_KINDS.items()}
    for name, p in paths.items():
        if not (p / "tokenizer_config.json").exists():
            tmp = p.with_name(p.name + f".tmp{os.getpid()}")
            builders[name](tmp)
            try:
                os.replace(tmp, p)
            except OSError:  # another process built it first
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    return {k: str(v) for k, v in paths.items()}


def default_tiny_tokenizer_dir() -> Path:
    """Where the tiny tokenizers are cached: $BLIP2_RAY_CACHE or ~/.cache/blip2_ray."""
    root = os.environ.get("BLIP2_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "blip2_ray")
    return Path(root) / "tiny_tokenizers"


def load_tokenizer(path: str, what: str = "tokenizer"):
    """Load an HF tokenizer from a local directory; a hub id or a missing path is one clear error."""
    from transformers import AutoTokenizer

    p = Path(require_local_dir(path, what))
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{what} directory {path!r} holds no readable tokenizer ({e.__class__.__name__})") from None


def load_qformer_tokenizer(path: str):
    """The Q-Former's BERT tokenizer with the `[DEC]` bos token BLIP-2 adds (added if missing)."""
    tok = load_tokenizer(path, "Q-Former tokenizer")
    if tok.bos_token != DEC_TOKEN:
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    return tok


def load_llm_tokenizer(path: str):
    """The LLM's tokenizer; one without a pad token (Llama) pads with its EOS (padding is masked anyway)."""
    tok = load_tokenizer(path, "LLM tokenizer")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def prepends_bos(tok) -> bool:
    """True when the tokenizer starts every sequence with its BOS (OPT, Llama, Mistral; not GPT-2, Qwen2, T5)."""
    if tok.bos_token_id is None:
        return False
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def appends_eos(tok) -> bool:
    """True when the tokenizer ends every sequence with its EOS by itself (T5)."""
    ids = tok("a")["input_ids"]
    return tok.eos_token_id is not None and bool(ids) and ids[-1] == tok.eos_token_id


def caption_end_ids(tok, llm_family: str | None) -> list[int]:
    """Token ids appended to a training caption so the LLM learns where captions end.

    OPT: "\\n" (how BLIP-2 trained OPT; its generation stops at "\\n"). A tokenizer that appends its EOS
    itself (T5): nothing. Every other family: the tokenizer's EOS token.
    """
    if llm_family == "opt":
        return tok("\n", add_special_tokens=False)["input_ids"]
    if appends_eos(tok) or tok.eos_token_id is None:
        return []
    return [tok.eos_token_id]


def caption_stop_ids(tok, llm_family: str | None) -> list[int]:
    """Token ids that end a generated caption: how training ends a caption (`caption_end_ids`: "\\n" for OPT)
    and the tokenizer's EOS. Generation stops at the first of them (Blip2Stage2.generate, the engine)."""
    ids = list(caption_end_ids(tok, llm_family))
    if len(ids) > 1:  # a multi-token end cannot stop a token-wise search: only the EOS does
        ids = []
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids
