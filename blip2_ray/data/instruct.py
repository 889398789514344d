"""Instruction-tuning data as InstructBLIP mixes it (Dai et al. 2023, arXiv 2305.06500, section 2): several
sources, each a task kind with its own instruction templates; every visit of a row draws one template; sources
are sampled with weights proportional to the square root of their size (overridable per source). Ray-free.

Kinds, what a row is and the files read (image paths resolved under the source's image root):
  caption       one row per (image, caption); templates without a placeholder; the response is the caption,
                cleaned as BLIP-2 cleans captions. LAVIS/BLIP lists [{image, caption: str | [str]}] (COCO, NoCaps,
                Web CapFilt), Karpathy's dataset_*.json, TextCaps' {data: [{image_id, caption_str}]}
  vqa           one row per question; "{}" in a template is the question; the response is one human answer drawn
                per visit. VQAv2's official pair (with its questions file), LAVIS lists [{question, image, answer}]
                (OK-VQA, GQA; A-OKVQA's direct_answers; answers given as {answer} dicts: VizWiz), TextVQA's
                {data: [{question, image_id, answers}]}
  vqg           visual question generation from the VQA files: "{}" is the question's most frequent answer, the
                response is the question
  conversation  LLaVA-Instruct-150K [{id, image, conversations: [{from: human, value}, {from: gpt, value}, ...]}]:
                one row per (human, gpt) turn; "{}" is the human turn without its "<image>" marker, the response
                the gpt turn (earlier turns are not in the prompt)
Bad input is skipped and counted per reason (SKIP_REASONS); a source left with no row is one UserError. Rows
are packed into parquet shards per source (`data/instruct_shards.py`): key, image bytes, instruction (a JSON list
of the filled templates: one is drawn per visit), caption (a JSON list of responses: one is drawn per visit),
image_id. The data pipeline mixes the sources by `data.weights` (data/pipeline.epoch_file_order).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

from blip2_ray.data.annotations import image_id_of, read_json, vqa_entries
from blip2_ray.errors import UserError

KINDS = ("caption", "vqa", "vqg", "conversation")
PLACEHOLDER = "{}"

NO_IMAGE = "no_image"  # the record names no image
MISSING_IMAGE_FILE = "missing_image_file"  # the image it names is not under the image root
EMPTY_RESPONSE = "empty_response"
EMPTY_INSTRUCTION = "empty_instruction"  # no question / human turn to fill the template with
TEMPLATE_WITHOUT_PLACEHOLDER = "template_without_placeholder"  # counted once per template
SKIP_REASONS = (NO_IMAGE, MISSING_IMAGE_FILE, EMPTY_RESPONSE, EMPTY_INSTRUCTION, TEMPLATE_WITHOUT_PLACEHOLDER)

# The paper's instruction templates (its appendix table of templates for the held-in datasets), without the
# leading "<Image>" marker: the query outputs always come first, before the instruction.
PAPER_TEMPLATES: dict[str, list[str]] = {
    "caption": [
        "A short image caption:",
        "A short image description:",
        "A photo of",
        "An image that shows",
        "Write a short description for the image.",
        "Write a description for the photo.",
        "Provide a description of what is presented in the photo.",
        "Briefly describe the content of the image.",
        "Can you briefly explain what you see in the image?",
        "Could you use a few words to describe what you perceive in the photo?",
        "Please provide a short depiction of the picture.",
        "Using language, provide a short account of the image.",
        "Use a few words to illustrate what is happening in the picture.",
    ],
    "vqa": [
        "{}",
        "Question: {}",
        "{} A short answer to the question is",
        "Q: {} A:",
        "Question: {} Short answer:",
        "Given the image, answer the following question with no more than three words. {}",
        "Based on the image, respond to this question with a short answer: {}. Answer:",
        "Use the provided image to answer the question: {} Provide your answer as short as possible:",
        'What is the answer to the following question? "{}"',
        'The question "{}" can be answered using the image. A short answer is',
    ],
    "vqg": [
        "Given the image, generate a question whose answer is: {}. Question:",
        "Based on the image, provide a question with the answer: {}. Question:",
        'Given the visual representation, create a question for which the answer is "{}".',
        "From the image provided, craft a question that leads to the reply: {}. Question:",
        "Considering the picture, come up with a question where the answer is: {}.",
        "Taking the image into account, generate an question that has the answer: {}. Question:",
    ],
    "conversation": ["{}"],  # LLaVA's turns are instructions already
}
_IMAGE_MARKER = re.compile(r"\s*<image>\s*", re.IGNORECASE)


@dataclass
class InstructSource:
    """The rows of one source: entries {"path", "image_id", "key", "instructions": [filled templates],
    "responses": [str, ...]}; `skipped`: reason -> count."""

    name: str
    kind: str
    entries: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    @property
    def num_images(self) -> int:
        return len({e["path"] for e in self.entries})


def usable_templates(kind: str, templates: list[str] | None, skipped: Counter | None = None) -> list[str]:
    """The templates of a source (None: the paper's for its kind); those of a kind that fills a placeholder
    but lack "{}" are dropped and counted in `skipped`."""
    if kind not in KINDS:
        raise ValueError(f"unknown instruction task kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    templates = PAPER_TEMPLATES[kind] if templates is None else list(templates)
    if kind == "caption":
        return templates
    keep = [t for t in templates if PLACEHOLDER in t]
    if skipped is not None and len(keep) < len(templates):
        skipped[TEMPLATE_WITHOUT_PLACEHOLDER] += len(templates) - len(keep)
    return keep


def fill(template: str, value: str) -> str:
    """`template` with its "{}" replaced by `value` (str.format would choke on braces inside `value`)."""
    return template.replace(PLACEHOLDER, value, 1) if PLACEHOLDER in template else template


# ---------------------------------------------------------------------------------------------- reading
def caption_records(data, what: str, split: str = "train") -> list[dict]:
    """{"image" | None, "image_id", "captions"} of a caption file's parsed JSON (formats in the module docstring)."""
    out = []
    if isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy's dataset_*.json
        splits = {split, "restval"} if split == "train" else {split}
        for im in data["images"]:
            if im.get("split") not in splits:
                continue
            rel = os.path.join(im.get("filepath", ""), im["filename"]) if im.get("filename") else None
            out.append({"image": rel, "image_id": im.get("cocoid", im.get("imgid", rel)),
                        "captions": [s.get("raw") or " ".join(s.get("tokens", [])) for s in im.get("sentences", [])]})
        return out
    if isinstance(data, dict) and isinstance(data.get("data"), list):  # TextCaps: {data: [{image_id, caption_str}]}
        for e in data["data"]:
            image = e.get("image") or (f"{e['image_id']}.jpg" if e.get("image_id") is not None else None)
            caps = e.get("caption_str", e.get("reference_strs", []))
            out.append({"image": image, "image_id": e.get("image_id", image),
                        "captions": caps if isinstance(caps, list) else [caps]})
        return out
    if isinstance(data, list) and all(isinstance(e, dict) for e in data) and any("caption" in e for e in data):
        for e in data:
            caps = e.get("caption", [])
            out.append({"image": e.get("image"), "image_id": e.get("image_id", e.get("img_id")),
                        "captions": caps if isinstance(caps, list) else [caps]})
        return out
    raise UserError(f"{what} is in no known caption format: expected a LAVIS/BLIP list [{{image, caption}}], "
                    f"Karpathy's dataset_*.json {{images: [...]}} or TextCaps' {{data: [{{image_id, caption_str}}]}}")


def _answers(e: dict) -> list[str]:
    ans = e.get("answer", e.get("answers", e.get("direct_answers", [])))
    ans = [ans] if isinstance(ans, (str, dict)) else list(ans or [])
    return [str(a.get("answer", "")) if isinstance(a, dict) else str(a) for a in ans]


def question_records(data, questions_path: str | None, what: str) -> list[dict]:
    """{"image" | None, "image_id", "question_id", "question", "answers"} of a VQA file's parsed JSON."""
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):  # VQAv2 / OK-VQA official pair
        return [{**e, "answers": [str(a) for a in e["answers"]]} for e in vqa_entries(data, questions_path, what)]
    rows = data.get("data") if isinstance(data, dict) else data  # TextVQA: {data: [...]}
    if isinstance(rows, list) and all(isinstance(e, dict) for e in rows) and any("question" in e for e in rows):
        out = []
        for i, e in enumerate(rows):
            image = e.get("image") or (f"{e['image_id']}.jpg" if e.get("image_id") is not None else None)
            out.append({"image": image, "image_id": e.get("image_id", image), "question_id": e.get("question_id", i),
                        "question": str(e.get("question") or ""), "answers": _answers(e)})
        return out
    raise UserError(f"{what} is in no known VQA format: expected VQAv2's official annotations (with its questions "
                    f"file), a LAVIS list [{{question, image, answer}}] or TextVQA's {{data: [...]}}")


def conversation_records(data, what: str) -> list[dict]:
    """{"image" | None, "image_id", "turns": [(human, gpt), ...]} of LLaVA-Instruct's parsed JSON."""
    if not (isinstance(data, list) and all(isinstance(e, dict) and "conversations" in e for e in data)):
        raise UserError(f"{what} is not LLaVA-Instruct's format: expected [{{id, image, conversations: "
                        f"[{{from, value}}, ...]}}, ...]")
    out = []
    for e in data:
        msgs = [m for m in e["conversations"] if isinstance(m, dict)]
        turns = []
        for human, gpt in zip(msgs[0::2], msgs[1::2]):
            if human.get("from") in ("human", "user") and gpt.get("from") in ("gpt", "assistant"):
                turns.append((str(human.get("value") or ""), str(gpt.get("value") or "")))
        out.append({"image": e.get("image"), "image_id": e.get("id", e.get("image")), "turns": turns})
    return out


def read_instruct_source(name: str, kind: str, path: str, image_root: str, *, questions: str | None = None,
                         templates: list[str] | None = None, split: str = "train", max_caption_words: int = 50,
                         what: str | None = None) -> InstructSource:
    """The rows of one training source (kinds and formats in the module docstring), bad input counted per reason.

    UserError: an unreadable or unknown file, no usable template, or no row left (naming the source).
    """
    from blip2_ray.data.transforms import clean_caption

    what = what or f"instruct source {name!r} ({path!r})"
    src = InstructSource(name, kind)
    temps = usable_templates(kind, templates, src.skipped)
    if not temps:
        raise UserError(f"instruct source {name!r} has no usable instruction template: a {kind} template needs "
                        f"'{{}}' where the {'question' if kind == 'vqa' else 'text'} goes")
    data = read_json(path, what)
    rows: list[tuple[dict, list[str], list[str]]] = []  # (record, instructions, responses)
    if kind == "caption":
        for r in caption_records(data, what, split):
            for cap in r["captions"]:
                rows.append((r, list(temps), [clean_caption(str(cap), max_caption_words)]))
    elif kind in ("vqa", "vqg"):
        for r in question_records(data, questions, what):
            answers = [a.strip() for a in r["answers"] if a and a.strip()]
            q = r["question"].strip()
            if kind == "vqa":
                rows.append((r, [fill(t, q) for t in temps] if q else [], answers))
            else:  # the most frequent answer goes into the instruction, the question is the response
                top = Counter(answers).most_common(1)[0][0] if answers else ""
                rows.append((r, [fill(t, top) for t in temps] if top else [], [q] if q else []))
    else:
        for r in conversation_records(data, what):
            for human, gpt in r["turns"]:
                human = _IMAGE_MARKER.sub(" ", human).strip()
                rows.append((r, [fill(t, human) for t in temps] if human else [], [gpt.strip()]))
    seen_missing: set[str] = set()
    counts: Counter = Counter()
    for r, instructions, responses in rows:
        if not r.get("image"):
            src.skipped[NO_IMAGE] += 1
            continue
        full = os.path.join(image_root, str(r["image"]))
        if full in seen_missing or not os.path.isfile(full):
            seen_missing.add(full)
            src.skipped[MISSING_IMAGE_FILE] += 1
            continue
        responses = [x for x in responses if x]
        if not responses:
            src.skipped[EMPTY_RESPONSE] += 1
            continue
        if not instructions:
            src.skipped[EMPTY_INSTRUCTION] += 1
            continue
        image_id = r.get("image_id")
        image_id = image_id if image_id is not None else image_id_of(str(r["image"]))
        n = counts[str(image_id)]
        counts[str(image_id)] += 1
        src.entries.append({"path": full, "image_id": image_id, "key": f"{name}/{image_id}/{n}",
                            "instructions": instructions, "responses": responses})
    if not src.entries:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(src.skipped.items())) or "no record"
        raise UserError(f"instruct source {name!r} ({path!r}) has no usable row ({reasons}); check its file, kind "
                        f"{kind!r} and image root {image_root!r}")
    return src


# ---------------------------------------------------------------------------------------------- mixing
