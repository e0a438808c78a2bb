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

_NUM = re.compile(r"_(\d+)\.npy$")


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)  # never unpickle
    except (OSError, ValueError) as exc:
        raise RecoError(f"cannot read embeddings file {path}: {exc}") from exc


def plan(source: str, dim: int | None = None, **_options) -> list[dict]:
    root = Path(source)
    img_files = sorted((root / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(_NUM.search(p.name).group(1)))
    if not img_files:
        raise RecoError(f"{source} has no img_emb/img_emb_*.npy files (clip-retrieval layout expected)")
    shards = []
    for f in img_files:
        n = _NUM.search(f.name).group(1)
        txt = root / "text_emb" / f"text_emb_{n}.npy"
        meta = root / "metadata" / f"metadata_{n}.parquet"
        for needed in (txt, meta):
            if not needed.is_file():
                raise RecoError(f"{needed} is missing: every img_emb_N.npy needs text_emb_N.npy and metadata_N.parquet")
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
                       "part": int(n), "rows": int(a.shape[0]), "name": f"part {n}"})
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
