"""Precomputed embeddings in clip-retrieval's layout: no backbone runs, the user names the backbone the
vectors came from, and their dimension is checked against it before anything is stored."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import RecoError
from .base import Item, SkipReason, clean_caption

# the layout's three folders and their files' extension: part N is FOLDER/FOLDER_N.EXT in each
LAYOUT = (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet"))


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)  # never unpickle
    except (OSError, ValueError) as exc:
        raise RecoError(f"cannot read embeddings file {path}: {exc}") from exc


def _parts(folder: Path, ext: str) -> dict[int, Path]:
    """{part number: file} of one of the layout's folders. Any other file in it (a backup such as
    img_emb_0_old.npy) is refused by name rather than read or passed over: either could build a memory the user
    did not mean. Hidden files (.DS_Store) are left alone."""
    pattern = re.compile(rf"{re.escape(folder.name)}_(\d+)\.{ext}")
    out: dict[int, Path] = {}
    for f in sorted(folder.iterdir()) if folder.is_dir() else ():
        if f.name.startswith("."):
            continue
        m = pattern.fullmatch(f.name)
        if not m or not f.is_file():
            raise RecoError(f"{f} is not a part of the clip-retrieval layout ({folder.name}/ holds only "
                            f"{folder.name}_N.{ext}): move it out of {folder}")
        n = int(m.group(1))
        if n in out:
            raise RecoError(f"{out[n].name} and {f.name} are both part {n}: move one of them out of {folder}")
        out[n] = f
    return out


def _matched_parts(root: Path) -> list[tuple[int, Path, Path, Path]]:
    """(part number, img, text, metadata) of every part, in part order. The three folders must hold the same part
    numbers: a part with a file missing is refused by name, never left out of the count."""
    found = {sub: _parts(root / sub, ext) for sub, ext in LAYOUT}
    if not found["img_emb"]:
        raise RecoError(f"{root} has no img_emb/img_emb_N.npy files (clip-retrieval layout expected)")
    numbers = sorted(set().union(*found.values()))
    for n in numbers:
        for sub, ext in LAYOUT:
            if n not in found[sub]:
                have = ", ".join(found[o][n].name for o, _ in LAYOUT if n in found[o])
                raise RecoError(f"{root / sub / f'{sub}_{n}.{ext}'} is missing ({have} present): every part N needs "
                                "img_emb_N.npy, text_emb_N.npy and metadata_N.parquet; restore the file, or move the "
                                "part's other files out to leave it out")
    return [(n, *(found[sub][n] for sub, _ in LAYOUT)) for n in numbers]


def plan(source: str, dim: int | None = None, **_options) -> list[dict]:
    shards = []
    for n, f, txt, meta in _matched_parts(Path(source)):
        a, b = _load(f), _load(txt)
        if a.ndim != 2 or b.ndim != 2 or a.shape != b.shape:
            raise RecoError(f"{f.name} {a.shape} and {txt.name} {b.shape} must be 2-d arrays of the same shape")
        if dim is not None and a.shape[1] != dim:
            raise RecoError(
                f"embeddings in {f} have dimension {a.shape[1]} but the backbone produces {dim}: "
                "name the backbone these embeddings were computed with (--backbone)"
            )
        _check_metadata(meta, a.shape[0])
        shards.append({"img": str(f.resolve()), "text": str(txt.resolve()), "meta": str(meta.resolve()),
                       "part": n, "rows": int(a.shape[0]), "name": f"part {n}"})
    return shards


def _check_metadata(meta: Path, rows: int) -> None:
    """Every part's metadata, checked from its footer before anything is stored: a part without captions would
    otherwise be counted as empty captions and leave a ready version with part of the data."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(meta)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise RecoError(f"cannot read {meta}: {exc}") from exc
    names = pf.schema_arrow.names
    if "caption" not in names:
        raise RecoError(f"{meta} has no 'caption' column (columns: {', '.join(names) or 'none'}): every "
                        "metadata_N.parquet needs one, as clip-retrieval writes it; rename the column that holds "
                        "the captions")
    if pf.metadata.num_rows != rows:
        raise RecoError(f"{meta} has {pf.metadata.num_rows} rows but its embeddings have {rows} vectors")


def _source(raw) -> dict | None:
    """Where the item's image can be read again (a RECO export's `source` column: JSON), when given."""
    if not raw:
        return None
    try:
        src = json.loads(raw)
    except ValueError:
        return None
    return src if isinstance(src, dict) else None


def read(spec: dict) -> Iterator[Item]:
    import pyarrow.parquet as pq

    img, txt = _load(Path(spec["img"])), _load(Path(spec["text"]))
    meta = pq.read_table(spec["meta"]).to_pylist()
    if len(meta) != len(img):
        raise RecoError(f"{spec['meta']} has {len(meta)} rows but {spec['img']} has {len(img)} vectors")
    for i, row in enumerate(meta):
        key = str(row.get("key") or f"{spec['part']}_{i}")
        caption = clean_caption(row.get("caption"))
        if caption is None:
            yield Item(key=key, skip=SkipReason.EMPTY_CAPTION)
            continue
        v, t = np.asarray(img[i], np.float32), np.asarray(txt[i], np.float32)
        nv, nt = float(np.linalg.norm(v)), float(np.linalg.norm(t))
        if not (np.isfinite(nv) and np.isfinite(nt)) or nv == 0 or nt == 0:
            yield Item(key=key, caption=caption, skip=SkipReason.BAD_EMBEDDING)
            continue
        yield Item(key=key, caption=caption, image_emb=v / nv, text_emb=t / nt,
                   extra={"url": row.get("url")} if row.get("url") else None, src=_source(row.get("source")))
