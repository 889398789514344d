"""Fine-tuning annotation files -> image-text parquet shards the training pipeline reads. Ray-free.

Formats read (the files users download):
  - LAVIS/BLIP COCO Karpathy and Flickr30k lists: [{"image": "train2014/x.jpg", "caption": str | [str],
    "image_id": ...}] (image_id optional: taken from the file name's number, else the path)
  - Karpathy's dataset_coco.json / dataset_flickr30k.json: {"images": [{"filepath", "filename", "split",
    "sentences": [{"raw"}], "cocoid" | "imgid"}]} (split "restval" joins "train")
Every image path is resolved under the image root; a missing one is counted and skipped, none resolving
is one UserError. Each (image, caption) pair becomes one training row (LAVIS trains one row per caption);
its key "<image_id>/<n>" carries the image id, so objectives can tell captions of one image apart.
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
    files, rows, n = [], {"key": [], "image": [], "caption": [], "image_id": []}, 0

    def flush():
        if not rows["key"]:
            return
        path = os.path.join(out_dir, f"{len(files):05d}.parquet")
        pq.write_table(pa.table(rows), path)
        files.append(path)
        for v in rows.values():
            v.clear()

    for e in ann.entries:
        with open(e["path"], "rb") as f:
            image = f.read()
        for j, caption in enumerate(e["captions"]):
            rows["key"].append(f"{e['image_id']}/{j}")
            rows["image"].append(image)
            rows["caption"].append(caption)
            rows["image_id"].append(str(e["image_id"]))
            n += 1
            if len(rows["key"]) >= records_per_shard:
                flush()
    flush()
    manifest = {"fingerprint": fp, "files": files, "rows": n, "images": len(ann.entries),
                "missing_images": len(ann.missing)}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f)
    os.replace(manifest_path + ".tmp", manifest_path)
    return manifest
