"""Small synthetic image-text corpora (coloured shapes with captions) in every supported layout.

Used by `make demo`, the tests and the benchmarks, so none of them downloads anything.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40),
    "purple": (140, 40, 170), "orange": (250, 140, 20), "black": (15, 15, 15), "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle", "cross")


def concept(i: int) -> tuple[str, str]:
    names = list(COLORS)
    return names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]


def render(color: str, shape: str, size: int = 64, seed: int = 0, jitter: float = 1.0, vendor: int = 0):
    """A shape on a noisy background; `seed` varies position, scale and noise (another 'drawing'), `jitter`
    scales how much (0: every drawing of a concept is the same picture); `vendor` > 0 draws the same concept in
    another artwork style (outlined, shaded, on a striped ground), as emoji vendors draw the same emoji."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    bg = 128 + jitter * (rng.integers(90, 166, size=3) - 128)
    arr = np.clip(bg + jitter * rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    if vendor:
        vrng = np.random.default_rng(10_000 + vendor)
        period = int(vrng.integers(4, 9))
        arr[(np.arange(size)[:, None] + np.arange(size)[None, :]) % (2 * period) < period] //= 2
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    r = int(size * (0.28 + jitter * rng.uniform(-0.06, 0.06)))
    shift = int(jitter * size // 8)
    cx, cy = (int(size / 2 + rng.integers(-shift, shift + 1)) for _ in range(2))
    box = [cx - r, cy - r, cx + r, cy + r]
    c = COLORS[color]
    if vendor:
        c = tuple(int(v * (0.75 + 0.1 * (vendor % 3))) for v in c)
    outline = (20, 20, 20) if vendor else None
    width = 1 + vendor % 3 if vendor else 0
    if shape == "square":
        d.rectangle(box, fill=c, outline=outline, width=width)
    elif shape == "circle":
        d.ellipse(box, fill=c, outline=outline, width=width)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c, outline=outline, width=width)
    else:
        w = max(2, r // 3)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=c, outline=outline, width=width)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=c, outline=outline, width=width)
    return im


def png_bytes(im, fmt: str = "PNG") -> bytes:
    b = io.BytesIO()
    im.save(b, fmt)
    return b.getvalue()


def items(n: int, seed: int = 0, prefix: str = "", jitter: float = 1.0) -> list[tuple[str, bytes, str]]:
    """n (key, png bytes, caption) triples cycling through the colour x shape concepts."""
    out = []
    for i in range(n):
        color, shape = concept(i)
        key = f"{prefix}{seed:02d}{i:06d}"
        im = render(color, shape, seed=seed * 100003 + i, jitter=jitter)
        out.append((key, png_bytes(im), f"a {color} {shape}"))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(root: str | Path, n_shards: int, per_shard: int, seed: int = 0, prefix: str = "",
              jitter: float = 1.0) -> list[Path]:
    """img2dataset-style shards: 00000.tar with <key>.png, <key>.txt, <key>.json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    all_items = items(n_shards * per_shard, seed=seed, prefix=prefix, jitter=jitter)
    paths = []
    for s in range(n_shards):
        p = root / f"{s:05d}.tar"
        with tarfile.open(p, "w") as tar:
            for key, png, cap in all_items[s * per_shard : (s + 1) * per_shard]:
                _add(tar, f"{key}.png", png)
                _add(tar, f"{key}.txt", cap.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "caption": cap}).encode())
        paths.append(p)
    return paths


def write_manifest(root: str | Path, n: int, kind: str = "csv", seed: int = 0) -> Path:
    """Images under root/images and a manifest (csv, tsv, jsonl or parquet) with `image` and `caption`."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for key, png, cap in items(n, seed=seed):
        (root / "images" / f"{key}.png").write_bytes(png)
        rows.append({"image": f"images/{key}.png", "caption": cap, "key": key})
    path = root / f"manifest.{kind}"
    if kind in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "caption", "key"], delimiter="\t" if kind == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=max(1, n // 3))
    return path


def write_embeddings(root: str | Path, parts: int, per_part: int, dim: int, seed: int = 0, prefix: str = "") -> Path:
    """clip-retrieval's output layout with random unit vectors (float16, as clip-retrieval writes); keys
    `{prefix}{part:04d}{row:05d}`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for p in range(parts):
        for sub, name in (("img_emb", "img_emb"), ("text_emb", "text_emb")):
            x = rng.standard_normal((per_part, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            np.save(root / sub / f"{name}_{p}.npy", x.astype(np.float16))
        caps = [f"a {' '.join(concept(p * per_part + i))}" for i in range(per_part)]
        keys = [f"{prefix}{p:04d}{i:05d}" for i in range(per_part)]
        pq.write_table(pa.table({"key": keys, "caption": caps}), root / "metadata" / f"metadata_{p}.parquet")
    return root


def write_imagefolder(root: str | Path, per_class: int, seed: int = 900_000, jitter: float = 1.0,
                     vendor: int = 0) -> Path:
    """root/images/<NN_colour_shape>/<j>.png for the 32 concepts, and root/classnames.txt ('colour shape')."""
    root = Path(root)
    n_concepts = len(COLORS) * len(SHAPES)
    for ci in range(n_concepts):
        color, shape = concept(ci)
        d = root / "images" / f"{ci:02d}_{color}_{shape}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            render(color, shape, seed=seed + 100 * ci + j, jitter=jitter, vendor=vendor).save(d / f"{j}.png")
    (root / "classnames.txt").write_text("".join(f"{c} {s}\n" for c, s in map(concept, range(n_concepts))))
    return root


def write_oven(root: str | Path, entities: int = 32, per_entity: int = 2, unseen_fraction: float = 0.5,
               distractors: int = 0, seed: int = 950_000, jitter: float = 1.0) -> Path:
    """OVEN's published layout with coloured-shape entities: root/oven_entity_val.jsonl, the entity list
    root/Wiki6M_ver_1_0_title_only.jsonl (the split's entities and `distractors` more) and
    root/oven_images/<NN>/oven_<8 digits>.jpg. The first entities are val_seen, the last `unseen_fraction` of them
    val_unseen; lines are shuffled and image ids scattered, so the order and the NN folders mean nothing."""
    if entities < 1 or per_entity < 1 or distractors < 0 or not 0 <= unseen_fraction <= 1:
        raise ValueError("write_oven needs entities >= 1, per_entity >= 1, distractors >= 0, 0 <= unseen_fraction <= 1")
    root = Path(root)
    n_concepts = len(COLORS) * len(SHAPES)
    n_seen = entities - round(entities * unseen_fraction)
    ents = [(f"Q{1_000_000 + i}", " ".join(concept(i)) + (f" {i // n_concepts + 1}" if i >= n_concepts else ""))
            for i in range(entities)]
    rng = np.random.default_rng(seed)
    order = [(int(k) // per_entity, int(k) % per_entity) for k in rng.permutation(entities * per_entity)]
    numbers = rng.choice(10**8, size=len(order), replace=False)
    lines = []
    for row, ((i, j), number) in enumerate(zip(order, numbers)):
        image_id = f"oven_{number:08d}"
        d = root / "oven_images" / image_id.rsplit("_", 1)[-1][:2]
        d.mkdir(parents=True, exist_ok=True)
        render(*concept(i), seed=seed + per_entity * i + j, jitter=jitter).save(d / f"{image_id}.jpg", "JPEG")
        qid, title = ents[i]
        lines.append({"data_id": f"oven_entity_val_{row:08d}", "image_id": image_id, "question": "what is this?",
                      "entity_id": qid, "entity_text": title, "data_split": "val_seen" if i < n_seen else "val_unseen"})
    (root / "oven_entity_val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    kb = ents + [(f"Q{2_000_000 + k}", f"distractor entity {k}") for k in range(distractors)]
    kb = [kb[k] for k in rng.permutation(len(kb))]
    (root / "Wiki6M_ver_1_0_title_only.jsonl").write_text(
        "".join(json.dumps({"wikidata_id": q, "wikipedia_title": t}) + "\n" for q, t in kb))
    return root


TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


def write_tiny_config(path: str | Path) -> Path:
    """A tiny open_clip config (width 128, 64-px images, 64-d embeddings): a real CLIP that builds in a second."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_CONFIG, indent=1))
    return path


def main(argv=None) -> None:
    """`python -m app.synthetic wds DIR [--shards N] [--per-shard N] [--seed S] [--prefix P]`,
    `... image PATH [--color C] [--shape S]`, `... oven DIR [--entities N] [--per-entity N] [--distractors N]`
    and `... config PATH`: data and a tiny model, without downloads."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m app.synthetic", description=main.__doc__)
    sub = ap.add_subparsers(dest="what", required=True)
    w = sub.add_parser("wds", help="write WebDataset shards of coloured shapes")
    w.add_argument("dir")
    w.add_argument("--shards", type=int, default=4)
    w.add_argument("--per-shard", type=int, default=64)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--prefix", default="")
    w.add_argument("--jitter", type=float, default=1.0, help="how much drawings of one concept vary (0-1)")
    f = sub.add_parser("imagefolder", help="write an evaluation image folder (one folder per concept)")
    f.add_argument("dir")
    f.add_argument("--per-class", type=int, default=3)
    f.add_argument("--seed", type=int, default=900_000)
    f.add_argument("--jitter", type=float, default=1.0)
    f.add_argument("--vendor", type=int, default=0)
    o = sub.add_parser("oven", help="write an OVEN-layout entity set (split, entity list, oven_images/)")
    o.add_argument("dir")
    o.add_argument("--entities", type=int, default=32)
    o.add_argument("--per-entity", type=int, default=2)
    o.add_argument("--unseen-fraction", type=float, default=0.5)
    o.add_argument("--distractors", type=int, default=0, help="entity-list entries the split never uses")
    o.add_argument("--seed", type=int, default=950_000)
    o.add_argument("--jitter", type=float, default=1.0)
    c = sub.add_parser("config", help="write the tiny open_clip config")
    c.add_argument("path")
    i = sub.add_parser("image", help="draw one picture (a query image)")
    i.add_argument("path")
    i.add_argument("--color", default="red", choices=list(COLORS))
    i.add_argument("--shape", default="circle", choices=list(SHAPES))
    i.add_argument("--seed", type=int, default=12345)
    i.add_argument("--jitter", type=float, default=1.0)
    a = ap.parse_args(argv)
    if a.what == "imagefolder":
        root = write_imagefolder(a.dir, a.per_class, seed=a.seed, jitter=a.jitter, vendor=a.vendor)
        print(f"wrote {root / 'images'} and {root / 'classnames.txt'}")
    elif a.what == "oven":
        if a.entities < 1 or a.per_entity < 1 or a.distractors < 0 or not 0 <= a.unseen_fraction <= 1:
            ap.error("oven needs --entities >= 1, --per-entity >= 1, --distractors >= 0, 0 <= --unseen-fraction <= 1")
        root = write_oven(a.dir, a.entities, a.per_entity, a.unseen_fraction, a.distractors, a.seed, a.jitter)
        print(f"wrote {root / 'oven_entity_val.jsonl'}, {root / 'Wiki6M_ver_1_0_title_only.jsonl'} and "
              f"{root / 'oven_images'} ({a.entities} entities x {a.per_entity} images)")
    elif a.what == "image":
        Path(a.path).parent.mkdir(parents=True, exist_ok=True)
        render(a.color, a.shape, seed=a.seed, jitter=a.jitter).save(a.path)
        print(a.path)
    elif a.what == "wds":
        paths = write_wds(a.dir, a.shards, a.per_shard, seed=a.seed, prefix=a.prefix, jitter=a.jitter)
        print(f"wrote {len(paths)} shards x {a.per_shard} items to {a.dir}")
    else:
        print(write_tiny_config(a.path))


if __name__ == "__main__":
    main()
