"""Pure-Python stand-in for the Stanford PTBTokenizer as pycocoevalcap runs it.

pycocoevalcap calls `java edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase` (CoreNLP
3.4.1) and then drops the tokens in PUNCTUATIONS. This module reproduces that output for caption-like
text without Java: contractions split ("don't" -> "do n't", "cat's" -> "cat 's"), punctuation split
off and removed, brackets become "-lrb-"/"-rrb-"/... (lower-cased by the Java tool, so pycocoevalcap's
upper-case filter never removes them: they count as words, and so they do here), numbers such as
"3.5", "1,000", "5:30" and abbreviations such as "u.s." / "mr." kept whole. Checked against the Java
tool in tests/unit/test_eval_caption_metrics.py.
"""

from __future__ import annotations

import re

# the tokens pycocoevalcap removes after tokenisation (tokenizer/ptbtokenizer.py)
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                          "-", "--", "...", ";"])

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_TITLES = ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "mt", "ft", "vs", "etc", "inc", "co", "ltd", "jan",
           "feb", "mar", "apr", "aug", "sep", "sept", "oct", "nov", "dec", "gen", "gov", "rev", "sen", "rep")
# whole words PTB splits in two
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na"),
                "lemme": ("lem", "me"), "gimme": ("gim", "me"), "'tis": ("'t", "is"), "'twas": ("'t", "was")}
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")

_TOKEN = re.compile(
    r"""
    (?P<ellipsis>\.\.\.+|…)
   |(?P<dash>--+|—|―)
   |(?P<abbrev>(?:[a-z]\.){2,}|(?:%s)\.(?=\s+[a-z0-9]))
   |(?P<number>\d+(?:[.,:/]\d+)*(?!\w))
   |(?P<word>'t(?:is|was)\b|\#?\w+(?:(?:[-/&]|'(?=\w))\w+)*)
   |(?P<repeat>[!?]{2,})
   |(?P<quote>[`"“”„‘’']+)
   |(?P<other>\S)
    """ % "|".join(_TITLES),
    re.VERBOSE | re.UNICODE,
)


def _split_word(w: str) -> list[str]:
    if w in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[w])
    if len(w) > 3 and w.endswith("n't"):
        return [w[:-3], "n't"]
    for c in _CLITICS:
        if w.endswith(c) and len(w) > len(c):
            return [w[: -len(c)], c]
    return [w]


def ptb_tokens(text: str) -> list[str]:
    """Lower-cased PTB tokens of `text`, punctuation removed (pycocoevalcap's result, split on spaces)."""
    text = text.replace("\n", " ").lower()
    out: list[str] = []
    for m in _TOKEN.finditer(text):
        kind, tok = m.lastgroup, m.group()
        if kind in ("ellipsis", "dash", "quote"):
            continue  # "...", "--", `` '' ` ': all in PUNCTUATIONS
        if kind == "word":
            out.extend(_split_word(tok))
        elif kind == "other":
            if tok in _BRACKETS:
                out.append(_BRACKETS[tok])
            elif tok not in PUNCTUATIONS:
                out.append(tok)
        else:
            out.append(tok)
    return out


def ptb_tokenize(text: str) -> str:
    """`text` as pycocoevalcap's PTBTokenizer returns it: tokens joined by single spaces."""
    return " ".join(ptb_tokens(text))
