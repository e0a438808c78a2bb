"""Manifests: CSV, TSV, JSONL or Parquet rows with an image path (relative to the manifest) and a caption.

Planning makes one streaming pass that records where every N-th row starts (a byte offset for text formats,
a row number for Parquet), so each shard task seeks straight to its rows.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterator

from ..errors import RecoError
from ..textfile import decode, line_at
from .base import Item, SkipReason, clean_caption

DEFAULT_SHARD_SIZE = 10_000
# csv's own limit (131,072 characters a field, process-wide) would stop a manifest at one long caption; the
# caption limit (base.MAX_CAPTION_CHARS) decides instead. 2**31 - 1 is the largest every platform's csv takes.
csv.field_size_limit(2**31 - 1)


def _kind(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in (".csv", ".tsv"):
        return ext[1:]
    if ext in (".jsonl", ".json"):
        return "jsonl"
    if ext == ".parquet":
        return "parquet"
    raise RecoError(f"manifest {path} must be .csv, .tsv, .jsonl or .parquet")


def _text_rows(path: Path, kind: str, offset: int = 0) -> Iterator[tuple[int, dict]]:
    """(byte offset where the row starts, row dict). CSV rows may span lines (quoted newlines). Text is UTF-8
    (app/textfile.py); a field may be as long as the file, so a caption over the limit is skipped and counted
    (`caption_too_long`) instead of failing the whole manifest."""
    with open(path, "rb") as f:
        if kind == "jsonl":
            f.seek(max(offset, 0))
            pos = f.tell()
            for raw in f:
                start, pos = pos, pos + len(raw)
                text = decode(raw, path, start)
                if text.strip():
                    try:
                        row = json.loads(text)
                    except ValueError as exc:
                        hint = ("; a .json manifest must hold one JSON object per line (JSONL), not one array: "
                                "convert it with `jq -c '.[]' in.json > out.jsonl`") if text.lstrip()[:1] == "[" else ""
                        raise RecoError(f"{path}: line at byte {start} is not JSON ({exc}){hint}") from exc
                    if not isinstance(row, dict):
                        raise RecoError(f"{path}: line at byte {start} holds a JSON {type(row).__name__}, not an "
                                        "object; a .json/.jsonl manifest holds one object per line, e.g. "
                                        '{"image": "a.jpg", "caption": "a dog"} (convert an array with `jq -c \'.[]\'`)')
                    yield start, row
            return
        header_line = f.readline()
        delim = "\t" if kind == "tsv" else ","
        header = next(csv.reader([decode(header_line, path)], delimiter=delim), [])
        f.seek(max(offset, len(header_line)))
        state = {"pos": f.tell()}

        def lines():
            for raw in f:
                at = state["pos"]
                state["pos"] += len(raw)
                yield decode(raw, path, at)

        reader = csv.reader(lines(), delimiter=delim)
        start = state["pos"]
        while True:
            try:
                values = next(reader, None)
            except csv.Error as exc:
                raise RecoError(f"{path} line {line_at(path, start)} is not {kind.upper()} ({exc}): fix or remove "
                                f"that row") from None
            if values is None:
                return
            if values:
                yield start, dict(zip(header, values))
            start = state["pos"]


def _columns(path: Path, kind: str) -> list[str]:
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).schema_arrow.names
    if kind == "jsonl":
        for _, row in _text_rows(path, kind):
            return list(row)
        return []
    with open(path, "rb") as f:
        return next(csv.reader([decode(f.readline(), path)], delimiter="\t" if kind == "tsv" else ","), [])


def plan(source: str, image_column: str = "image", caption_column: str = "caption", key_column: str | None = None,
         shard_size: int = DEFAULT_SHARD_SIZE, **_options) -> list[dict]:
    path = Path(source)
    if path.is_dir():
        raise RecoError(f"manifest {source} is a directory: give the manifest file itself (.csv, .tsv, .jsonl or "
                        ".parquet), or drop --format manifest for a directory of .tar shards")
    if not path.is_file():
        raise RecoError(f"manifest {source} not found")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise RecoError(f"--shard-size must be a whole number of rows above 0, not {shard_size!r}")
    kind = _kind(path)
    cols = _columns(path, kind)
    for what, col in (("image", image_column), ("caption", caption_column), ("key", key_column)):
        if col and col not in cols:
            raise RecoError(
                f"manifest {source} has no {what} column {col!r} (columns: {', '.join(cols) or 'none'}); "
                f"name it with --{what}-column"
            )
    base = {"path": str(path.resolve()), "kind": kind, "image_column": image_column,
            "caption_column": caption_column, "key_column": key_column}
    shards = []
    if kind == "parquet":
        import pyarrow.parquet as pq

        n = pq.ParquetFile(path).metadata.num_rows
        for start in range(0, n, shard_size):
            shards.append({**base, "row": start, "rows": min(shard_size, n - start), "offset": None})
    else:
        row = 0
        for offset, _ in _text_rows(path, kind):
            if row % shard_size == 0:
                shards.append({**base, "row": row, "rows": 0, "offset": offset})
            shards[-1]["rows"] += 1
            row += 1
    for i, s in enumerate(shards):
        s["name"] = f"{path.name}[{s['row']}:{s['row'] + s['rows']}]"
    return shards


def _rows(spec: dict) -> Iterator[dict]:
    path = Path(spec["path"])
    n = spec["rows"]
    if spec["kind"] == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        cols = [c for c in (spec["image_column"], spec["caption_column"], spec.get("key_column")) if c]
        first, seen = spec["row"], 0
        for g in range(pf.num_row_groups):
            g_rows = pf.metadata.row_group(g).num_rows
            if seen + g_rows <= first:
                seen += g_rows
                continue
            table = pf.read_row_group(g, columns=cols)
            for r in table.to_pylist():
                if seen >= first + n:
                    return
                if seen >= first:
                    yield r
                seen += 1
        return
    for i, (_, row) in enumerate(_text_rows(path, spec["kind"], spec["offset"])):
        if i >= n:
            return
        yield row


def _key(row: dict, column: str | None, number: int) -> str | None:
    """The item's key: the key column's value (None where the row lacks one or it is blank), else the row number."""
    if not column:
        return str(number)
    value = row.get(column)
    return None if value is None or not str(value).strip() else str(value)


def read(spec: dict) -> Iterator[Item]:
    base = Path(spec["path"]).parent
    for i, row in enumerate(_rows(spec)):
        number = spec["row"] + i
        key = _key(row, spec.get("key_column"), number)
        if key is None:  # not the string 'None', which every such row would share as a duplicate_key
            yield Item(key=f"row {number}", skip=SkipReason.MISSING_KEY)
            continue
        caption = clean_caption(row.get(spec["caption_column"]))
        rel = row.get(spec["image_column"])
        if caption is None:
            yield Item(key=key, skip=SkipReason.EMPTY_CAPTION)
            continue
        image_path = (base / str(rel)) if rel else None
        if image_path is None or not image_path.is_file():
            yield Item(key=key, caption=caption, skip=SkipReason.MISSING_IMAGE)
            continue
        yield Item(key=key, caption=caption, image_bytes=image_path.read_bytes(), extra={"path": str(rel)},
                   src={"path": str(image_path.resolve())})
