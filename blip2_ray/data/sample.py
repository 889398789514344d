"""Sample shards whose captions describe their images: one coloured shape on a light background.

"a photo of a red circle" really shows a red circle, so tiny models can learn from the data. Corrupt
records of every kind the pipeline must survive can be injected; the returned summary says exactly
how many good records were written and which skip reasons the bad ones must produce.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image, ImageDraw

from blip2_ray.data import transforms as T
from blip2_ray.model.tokenizers import COLOURS, SHAPES

TEMPLATES = ["a {c} {s}", "a photo of a {c} {s}", "a {c} {s} on a white background", "a picture of a {c} {s}"]

# corrupt kind -> the skip reason the pipeline reports for it
CORRUPT_KINDS = {
    "undecodable_image": T.UNDECODABLE_IMAGE,
    "truncated_image": T.UNDECODABLE_IMAGE,
    "small_image": T.IMAGE_TOO_SMALL,
    "bomb_image": T.IMAGE_TOO_LARGE,
    "missing_image": T.MISSING_IMAGE,
    "missing_caption": T.MISSING_CAPTION,
    "empty_caption": T.EMPTY_CAPTION,
    "bad_caption_encoding": T.BAD_CAPTION_ENCODING,
    "truncated_tar": T.TRUNCATED_SHARD,
    "empty_shard": T.EMPTY_SHARD,
}

_RGB = {
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20),
    "purple": (130, 40, 170), "orange": (245, 140, 20), "white": (255, 255, 255), "black": (10, 10, 10),
    "gray": (128, 128, 128), "pink": (245, 130, 190), "cyan": (20, 200, 220), "brown": (120, 70, 30),
}


def draw_shape(colour: str, shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A `size` x `size` RGB image of one `shape` in `colour` on a plain light background."""
    bg = tuple(int(v) for v in rng.integers(225, 256, size=3))
    if colour == "white":
        bg = (200, 205, 210)
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    side = int(size * rng.uniform(0.4, 0.7))
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    x1, y1, cx, cy = x0 + side, y0 + side, x0 + side / 2, y0 + side / 2
    fill = _RGB[colour]
    t = max(side // 5, 2)
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        d.rectangle([cx - t, y0, cx + t, y1], fill=fill)
        d.rectangle([x0, cy - t, x1, cy + t], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "star":
        pts = []
        for i in range(10):
            r = side / 2 if i % 2 == 0 else side / 5
            a = np.pi / 2 + i * np.pi / 5
            pts.append((cx + r * np.cos(a), cy - r * np.sin(a)))
        d.polygon(pts, fill=fill)
    elif shape == "ring":
        d.ellipse([x0, y0, x1, y1], outline=fill, width=t)
    elif shape == "bar":
        d.rectangle([x0, cy - t, x1, cy + t], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return im


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bomb_png(side: int = 100_000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _corrupt_record(kind: str, good_image: bytes, rng: np.random.Generator) -> tuple[bytes | None, bytes | None]:
    """(image bytes, caption bytes) of a bad record of `kind`."""
    caption = b"a photo of something"
    if kind == "undecodable_image":
        return rng.bytes(512), caption
    if kind == "truncated_image":
        return good_image[: len(good_image) // 2], caption
    if kind == "small_image":
        return _jpeg(Image.new("RGB", (8, 8), (200, 30, 30))), caption
    if kind == "bomb_image":
        return _bomb_png(), caption
    if kind == "missing_image":
        return None, caption
    if kind == "missing_caption":
        return good_image, None
    if kind == "empty_caption":
        return good_image, b" ... "
    if kind == "bad_caption_encoding":
        return good_image, b"a red \xff\xfe circle"
    raise ValueError(kind)


def make_sample_shards(out_dir: str, fmt: str = "webdataset", num: int = 100, shards: int = 4,
                       image_size: int = 64, seed: int = 0, corrupt: dict[str, int] | None = None,
                       num_colours: int = 6, num_shapes: int = 4, num_captions: int = 1) -> dict:
    """Write `num` good records (+ corrupt ones) over `shards` shards in `out_dir`.

    Returns {"format", "files", "good", "skipped": {reason: count}}: what the pipeline must report.
    Corrupt records are interleaved with good ones in the same shards. `truncated_tar` adds one record
    to the last tar and cuts the file in the middle of its image; `empty_shard` adds a shard with no
    record. With `num_captions` > 1 the caption is a JSON list of that many phrasings.
    """
    if fmt not in ("webdataset", "parquet"):
        raise ValueError(f"format must be webdataset or parquet, got {fmt!r}")
    corrupt = dict(corrupt or {})
    for kind, count in corrupt.items():
        if kind not in CORRUPT_KINDS:
            raise ValueError(f"unknown corrupt kind {kind!r}; valid: {', '.join(CORRUPT_KINDS)}")
        if count < 0:
            raise ValueError(f"corrupt count for {kind} must be >= 0")
    if fmt == "parquet" and corrupt.get("truncated_tar"):
        raise ValueError("truncated_tar applies to the webdataset format only")
    if corrupt.get("truncated_tar", 0) > 1:
        raise ValueError("truncated_tar can be injected once (it cuts the last shard)")
    if shards < 1 or num < 0:
        raise ValueError("need shards >= 1 and num >= 0")
    colours, shapes = COLOURS[:num_colours], SHAPES[:num_shapes]
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)

    # Records in order: good ones with the bad ones spread between them.
    records: list[dict] = []
    for i in range(num):
        c, s = colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))]
        caps = [TEMPLATES[int(j)].format(c=c, s=s) for j in rng.permutation(len(TEMPLATES))[:num_captions]]
        caption = (json.dumps(caps) if num_captions > 1 else caps[0]).encode()
        image = _jpeg(draw_shape(c, s, image_size, rng))
        records.append({"key": f"{i:07d}", "image": image, "caption": caption, "meta": {"colour": c, "shape": s}})
    bad = [k for k, n in corrupt.items() if k in CORRUPT_KINDS and k not in ("truncated_tar", "empty_shard")
           for _ in range(n)]
    filler = _jpeg(draw_shape(colours[0], shapes[0], image_size, rng))
    for j, kind in enumerate(bad):
        image, caption = _corrupt_record(kind, filler, rng)
        pos = int(rng.integers(0, len(records) + 1))
        records.insert(pos, {"key": f"bad{j:05d}_{kind}", "image": image, "caption": caption,
                             "meta": {"corrupt": kind}})

    per = [records[i::shards] for i in range(shards)]
    ext = "tar" if fmt == "webdataset" else "parquet"
    files = []
    for i, recs in enumerate(per):
        path = os.path.join(out_dir, f"{i:05d}.{ext}")
        truncate = fmt == "webdataset" and i == shards - 1 and corrupt.get("truncated_tar")
        if fmt == "webdataset":
            _write_tar(path, recs, truncated_tail=bool(truncate), image_size=image_size, rng=rng)
        else:
            _write_parquet(path, recs)
        files.append(path)
    for j in range(corrupt.get("empty_shard", 0)):
        path = os.path.join(out_dir, f"{shards + j:05d}.{ext}")
        if fmt == "webdataset":
            _write_tar(path, [])
        else:
            _write_parquet(path, [])
        files.append(path)

    skipped: dict[str, int] = {}
    for kind, n in corrupt.items():
        if n:
            skipped[CORRUPT_KINDS[kind]] = skipped.get(CORRUPT_KINDS[kind], 0) + n
    return {"format": fmt, "files": files, "good": num, "skipped": skipped}


def _write_tar(path: str, recs: list[dict], truncated_tail: bool = False, image_size: int = 64,
               rng: np.random.Generator | None = None) -> None:
    def add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
        """Adds a member; returns the file offset of its data (one 512-byte USTAR header before it)."""
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        start = tar.offset + tarfile.BLOCKSIZE
        tar.addfile(info, io.BytesIO(data))
        return start

    cut_at = None
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for r in recs:
            if r["image"] is not None:
                add(tar, f"{r['key']}.jpg", r["image"])
            if r["caption"] is not None:
                add(tar, f"{r['key']}.txt", r["caption"])
            add(tar, f"{r['key']}.json", json.dumps({"key": r["key"], **r["meta"]}).encode())
        if truncated_tail:
            # one more record, then the file is cut in the middle of its image (an interrupted copy)
            noise = Image.fromarray(rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8))
            data = _jpeg(noise)
            start = add(tar, "zzz_cut.jpg", data)
            add(tar, "zzz_cut.txt", b"a cut record")
            cut_at = start + len(data) // 2
    if cut_at is not None:
        with open(path, "r+b") as f:
            f.truncate(cut_at)


def _write_parquet(path: str, recs: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    captions = [r["caption"] for r in recs]
    try:  # a non-UTF-8 caption can only live in a binary column
        caption_col = pa.array([None if c is None else c.decode("utf-8") for c in captions], type=pa.string())
    except UnicodeDecodeError:
        caption_col = pa.array(captions, type=pa.binary())
    table = pa.table({
        "key": pa.array([r["key"] for r in recs], type=pa.string()),
        "jpg": pa.array([r["image"] for r in recs], type=pa.binary()),
        "caption": caption_col,
        "json": pa.array([json.dumps({"key": r["key"], **r["meta"]}) for r in recs], type=pa.string()),
    })
    pq.write_table(table, path, row_group_size=16)
