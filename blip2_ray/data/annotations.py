"""Fine-tuning annotation files -> image-text parquet shards the training pipeline reads. Ray-free.

Formats read (the files users download):
  - LAVIS/BLIP COCO Karpathy and Flickr30k lists: [{"image": "train2014/x.jpg", "caption": str | [str],
    "image_id": ...}] (image_id optional: taken from the file name's number, else the path)
  - Karpathy's dataset_coco.json / dataset_flickr30k.json: {"images": [{"filepath", "filename", "split",
    "sentences": [{"raw"}], "cocoid" | "imgid"}]} (split "restval" joins "train")
  - VQA: VQAv2's official pair (v2_OpenEnded_mscoco_train2014_questions.json {"data_subtype", "questions":
    [{question_id, image_id, question}]} + v2_mscoco_train2014_annotations.json {"annotations": [{question_id,
    image_id, answers: [{answer}, ...x10]}]}; images COCO_<data_subtype>_<image_id:012d>.jpg), or LAVIS's
    vqav2 / OK-VQA lists [{"question_id", "question", "image": "train2014/...jpg", "answer": [str, ...]}]
Every image path is resolved under the image root; a missing one is counted and skipped, none resolving
is one UserError. Each (image, caption) pair becomes one training row (LAVIS trains one row per caption);
its key "<image_id>/<n>" carries the image id, so objectives can tell captions of one image apart. Each
question becomes one row whose "caption" column holds its human answers as a JSON list (the data pipeline
draws one per visit, so an answer is trained as often as the annotators gave it) and "question" the question.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from blip2_ray.errors import UserError

MANIFEST = "manifest.json"


@dataclass
class CaptionAnnotations:
    """Images with their captions: entries {"path", "image_id", "captions"}; `missing`: paths not found."""

    entries: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def num_pairs(self) -> int:
        return sum(len(e["captions"]) for e in self.entries)


def read_json(path: str, what: str):
    """The JSON at `path`; UserError naming `what` when it is missing or not JSON."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise UserError(f"{what} {path!r} is not valid JSON ({e})") from None


def image_id_of(path: str) -> int | str:
    """COCO-style ids from file names (COCO_train2014_000000391895.jpg -> 391895), else the path itself."""
    m = re.search(r"(\d+)\.\w+$", path)
    return int(m.group(1)) if m else path


def read_caption_annotations(path: str, image_root: str, split: str = "train",
                             what: str = "annotations.train") -> CaptionAnnotations:
    """The images and captions of a caption/retrieval annotation file (grouped per image, file order kept).

    UserError: missing or non-JSON file, an unknown format, or no image found under `image_root`.
    """
    data = read_json(path, what)
    by_image: dict[str, dict] = {}
    if isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy's dataset_*.json
        splits = {split, "restval"} if split == "train" else {split}
        for im in data["images"]:
            if im.get("split") not in splits:
                continue
            rel = os.path.join(im.get("filepath", ""), im["filename"])
            e = by_image.setdefault(rel, {"image_id": im.get("cocoid", im.get("imgid", rel)), "captions": []})
            e["captions"] += [s.get("raw") or " ".join(s.get("tokens", [])) for s in im.get("sentences", [])]
    elif isinstance(data, list) and all(isinstance(e, dict) and "image" in e and "caption" in e for e in data):
        for entry in data:
            rel = entry["image"]
            e = by_image.setdefault(rel, {"image_id": entry.get("image_id", image_id_of(rel)), "captions": []})
            caps = entry["caption"]
            e["captions"] += caps if isinstance(caps, list) else [caps]
    else:
        raise UserError(f"{what} {path!r} is in no known format: expected a LAVIS/BLIP Karpathy list [{{image, "
                        f"caption, image_id}}, ...] or Karpathy's dataset_*.json {{images: [...]}}")
    out = CaptionAnnotations()
    for rel, e in by_image.items():
        full = os.path.join(image_root, rel)
        if not os.path.isfile(full):
            out.missing.append(full)
            continue
        out.entries.append({"path": full, "image_id": e["image_id"], "captions": [str(c) for c in e["captions"]]})
    if not out.entries:
        hint = f" (e.g. {out.missing[0]!r})" if out.missing else ""
        raise UserError(f"none of the {len(by_image)} images of {what} {path!r} exists under image root "
                        f"{image_root!r}{hint}; set the image root to the folder the paths are relative to")
    return out


@dataclass
class VqaAnnotations:
    """Questions with their image and human answers: entries {"path", "image_id", "question_id", "question",
    "answers"}; `missing`: image paths not found (each counted once)."""

    entries: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len({e["path"] for e in self.entries})


def vqa_entries(data, questions_path: str | None, what: str, image_pattern: str | None = None) -> list[dict]:
    """{"question_id", "question", "image" (relative path), "answers", "answer_type"} of a VQA annotation
    file's parsed JSON (formats in the module docstring; `questions_path`: the official questions file)."""
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):  # VQAv2 / OK-VQA official pair
        if not questions_path:
            raise UserError(f"{what} holds VQAv2 official annotations; name its questions file too "
                            f"(v2_OpenEnded_mscoco_*_questions.json)")
        qdata = read_json(questions_path, f"the questions of {what}")
        if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
            raise UserError(f"{questions_path!r} is not a VQAv2 questions file ({{questions: [...]}})")
        qs = {q["question_id"]: q for q in qdata["questions"]}
        pattern = image_pattern or f"COCO_{qdata.get('data_subtype', 'train2014')}_{{image_id:012d}}.jpg"
        out = []
        for a in data["annotations"]:
            q = qs.get(a["question_id"])
            if q is None:
                raise UserError(f"question {a['question_id']} of {what} is not in {questions_path!r}")
            out.append({"question_id": a["question_id"], "question": q["question"],
                        "image": pattern.format(image_id=a["image_id"]), "image_id": a["image_id"],
                        "answers": [x["answer"] for x in a["answers"]], "answer_type": a.get("answer_type")})
        return out
    if isinstance(data, list) and all(isinstance(e, dict) and {"question", "image"} <= set(e) for e in data):
        out = []
        for e in data:  # LAVIS lists; GQA: "answer" is one string
            ans = e.get("answer", e.get("answers", []))
            out.append({"question_id": e.get("question_id", len(out)), "question": e["question"], "image": e["image"],
                        "image_id": e.get("image_id", image_id_of(e["image"])),
                        "answers": [ans] if isinstance(ans, str) else list(ans), "answer_type": e.get("answer_type")})
        return out
    raise UserError(f"{what} is in no known VQA format: expected VQAv2's official annotations {{annotations: "
                    f"[...]}} (with its questions file) or a LAVIS list [{{question_id, question, image, answer}}]")


def read_vqa_annotations(path: str, questions: str | None, image_root: str,
                         what: str = "annotations.train") -> VqaAnnotations:
    """The questions of a VQA training file with their resolved image paths (missing images counted and
    skipped; questions without an answer dropped). UserError: unreadable or unknown file, no image found."""
    entries = vqa_entries(read_json(path, what), questions, f"{what} {path!r}")
    out, seen_missing = VqaAnnotations(), set()
    for e in entries:
        full = os.path.join(image_root, e["image"])
        if not os.path.isfile(full):
            if full not in seen_missing:
                seen_missing.add(full)
                out.missing.append(full)
            continue
        answers = [str(a).strip() for a in e["answers"] if str(a).strip()]
        if answers:
            out.entries.append({"path": full, "image_id": e["image_id"], "question_id": e["question_id"],
                                "question": str(e["question"]), "answers": answers})
    if not out.entries:
        hint = f" (e.g. {out.missing[0]!r})" if out.missing else ""
        raise UserError(f"none of the images of the {len(entries)} questions of {what} {path!r} exists under image "
                        f"root {image_root!r}{hint}; set the image root to the folder the image names are relative to")
    return out


def fingerprint(path: str, image_root: str, split: str) -> str:
    """What identifies prepared shards: the annotation file (path, size, mtime), image root and split."""
    st = os.stat(path)
    text = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, os.path.abspath(image_root), split])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_caption_shards(ann: CaptionAnnotations, out_dir: str, records_per_shard: int, fp: str) -> dict:
    """One parquet row per (image, caption): columns key "<image_id>/<n>", image (bytes), caption, image_id.

    Skips the work when `out_dir` already holds the shards of the same fingerprint (a resumed run).
    Returns the manifest {"fingerprint", "files", "rows", "images", "missing_images"}.
    """
    def rows():
        for e in ann.entries:
            image = _read_bytes(e["path"])
            for j, caption in enumerate(e["captions"]):
                yield {"key": f"{e['image_id']}/{j}", "image": image, "caption": caption,
                       "image_id": str(e["image_id"])}

    return _write_shards(rows(), ("key", "image", "caption", "image_id"), out_dir, records_per_shard, fp,
                         images=len(ann.entries), missing_images=len(ann.missing))


def write_vqa_shards(ann: VqaAnnotations, out_dir: str, records_per_shard: int, fp: str) -> dict:
    """One parquet row per question: key "<image_id>/q<question_id>", image (bytes), question, caption (the
    human answers as a JSON list: one is drawn per visit), image_id. Manifest and reuse as write_caption_shards."""
    def rows():
        cache: dict[str, bytes] = {}  # the questions of one image are consecutive in VQAv2's files
        for e in ann.entries:
            if e["path"] not in cache:
                cache.clear()
                cache[e["path"]] = _read_bytes(e["path"])
            yield {"key": f"{e['image_id']}/q{e['question_id']}", "image": cache[e["path"]],
                   "question": e["question"], "caption": json.dumps(e["answers"]), "image_id": str(e["image_id"])}

    return _write_shards(rows(), ("key", "image", "question", "caption", "image_id"), out_dir, records_per_shard,
                         fp, images=ann.num_images, missing_images=len(ann.missing))


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_shards(rows, columns: tuple[str, ...], out_dir: str, records_per_shard: int, fp: str, **counts) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("fingerprint") == fp and all(os.path.isfile(p) for p in manifest["files"]):
            return manifest
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name.endswith(".parquet"):
            os.remove(os.path.join(out_dir, name))
    files, pending, n = [], {c: [] for c in columns}, 0

    def flush():
        if not pending["key"]:
            return
        path = os.path.join(out_dir, f"{len(files):05d}.parquet")
        pq.write_table(pa.table(pending), path)
        files.append(path)
        for v in pending.values():
            v.clear()

    for row in rows:
        for c in columns:
            pending[c].append(row[c])
        n += 1
        if len(pending["key"]) >= records_per_shard:
            flush()
    flush()
    manifest = {"fingerprint": fp, "files": files, "rows": n, **counts}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f)
    os.replace(manifest_path + ".tmp", manifest_path)
    return manifest
