"""`reco memory export` / `reco memory import`: a version as clip-retrieval's layout plus a manifest.

    DIR/img_emb/img_emb_N.npy      float32 [rows, dim], the image vectors as stored
    DIR/text_emb/text_emb_N.npy    float32 [rows, dim]
    DIR/metadata/metadata_N.parquet  key, caption, source (where the image can be read again, JSON), shard
    DIR/manifest.json              backbone spec and fingerprint, dim, counts, storage options, sha256 of every file

Written part by part while the store is scanned, so a memory larger than RAM moves; the manifest is written last
(an export without one is incomplete). Import checks the manifest, every file's size and hash, and the backbone
before anything is stored, then builds a version through the `embeddings` reader (either profile) and verifies
it: the way from the embedded default to a Qdrant cluster without encoding an image again, and a portable backup.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np

from ..backbone import hash_file
from ..errors import RecoError
from ..names import parse_memory_ref
from . import new_directory

FORMAT, FORMAT_VERSION = "reco-memory-export", 1
PART_ROWS = 100_000


class _PartWriter:
    """Accumulates scanned batches and writes one part of `rows` rows at a time."""

    def __init__(self, out: Path, rows: int):
        self.out, self.rows = out, rows
        self.parts: list[dict] = []
        self.files: dict[str, dict] = {}
        self._buf: list[tuple] = []
        self._n = 0
        for sub in ("img_emb", "text_emb", "metadata"):
            (out / sub).mkdir(parents=True)

    def add(self, image: np.ndarray, text: np.ndarray, payloads: list[dict]) -> None:
        self._buf.append((image, text, payloads))
        self._n += len(payloads)
        while self._n >= self.rows:
            self._flush(self.rows)

    def close(self) -> None:
        if self._n:
            self._flush(self._n)

    def _take(self, n: int) -> tuple:
        imgs, txts, pays, left = [], [], [], n
        while left:
            image, text, payloads = self._buf[0]
            take = min(left, len(payloads))
            imgs.append(image[:take])
            txts.append(text[:take])
            pays.extend(payloads[:take])
            if take == len(payloads):
                self._buf.pop(0)
            else:
                self._buf[0] = (image[take:], text[take:], payloads[take:])
            left -= take
        self._n -= n
        return np.concatenate(imgs), np.concatenate(txts), pays

    def _flush(self, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        image, text, payloads = self._take(n)
        i = len(self.parts)
        paths = {"img_emb": f"img_emb/img_emb_{i}.npy", "text_emb": f"text_emb/text_emb_{i}.npy",
                 "metadata": f"metadata/metadata_{i}.parquet"}
        np.save(self.out / paths["img_emb"], np.ascontiguousarray(image, dtype=np.float32))
        np.save(self.out / paths["text_emb"], np.ascontiguousarray(text, dtype=np.float32))
        table = pa.table({
            "key": [str(p.get("key")) for p in payloads],
            "caption": [p.get("caption") for p in payloads],
            "source": [json.dumps(p["src"]) if p.get("src") else None for p in payloads],
            "shard": [None if p.get("shard") is None else str(p.get("shard")) for p in payloads],
        })
        pq.write_table(table, self.out / paths["metadata"])
        for rel in paths.values():
            f = self.out / rel
            self.files[rel] = {"bytes": f.stat().st_size, "sha256": hash_file(f)}
        self.parts.append({**paths, "rows": n})


def export_version(rt, ref: str, out: str | Path, part_rows: int = PART_ROWS, progress: bool = False) -> dict:
    """Write version `ref` (NAME or NAME@V; default the active one) to the empty or new directory `out`."""
    from tqdm import tqdm

    from ..db.models import VersionStatus
    from ..memory import check_complete, forgotten_keys, get_version, storage_of, unfinished_takedowns

    name, number = parse_memory_ref(ref)
    if part_rows < 1:
        raise RecoError("--part-rows must be a whole number above 0")
    out = new_directory(out)
    with rt.db.session() as s:
        v = get_version(s, name, number, active=number is None)
        if v.status not in VersionStatus.ACTIVATABLE:
            raise RecoError(f"{name} v{v.version} is {v.status}: only a ready version can be exported (wait for the "
                            "build, or `reco memory resume`)")
        pending = unfinished_takedowns(s, v.memory_id)
        if pending:
            raise RecoError(f"takedown #{pending[0].id} of {name} is {pending[0].status}: finish it with "
                            f"`reco memory forget {name} --resume` before exporting")
        info = {"memory": name, "version": v.version, "backbone": v.backbone, "backbone_hash": v.backbone_hash,
                "dim": v.dim, "count": v.items_stored, "source": v.source, "source_format": v.source_format}
        storage, collection = storage_of(v), v.collection
        # taken down from every version: never exported, even from a copy that holds them (defence in depth)
        forgotten = forgotten_keys(s, v.memory_id)
    check_complete(rt, name, collection, v)
    out.mkdir(parents=True, exist_ok=True)
    writer = _PartWriter(out, part_rows)
    bar = tqdm(total=info["count"], unit="item", desc=f"export {name} v{info['version']}", disable=not progress)
    seen = withheld = 0
    for _ids, image, text, payloads in rt.store.scan(collection, batch=2048):
        seen += len(payloads)
        bar.update(len(payloads))
        keep = [i for i, p in enumerate(payloads) if p.get("key") not in forgotten]
        withheld += len(payloads) - len(keep)
        if keep:
            writer.add(image[keep], text[keep], [payloads[i] for i in keep])
    writer.close()
    bar.close()
    if seen != info["count"]:
        raise RecoError(f"the store returned {seen} points of {name} v{info['version']}, which records "
                        f"{info['count']}: the export in {out} is incomplete (no manifest written)")
    info["count"] = seen - withheld
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **info,
                "storage": {"quantization": storage.quantization, "on_disk": storage.on_disk},
                "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "parts": writer.parts, "files": writer.files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_export(path: str | Path) -> dict:
    """The manifest of a complete, untouched export, or a RecoError naming what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise RecoError(f"{root} is not a directory: give the directory `reco memory export` wrote")
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise RecoError(f"{root} has no manifest.json: not a RECO export, or an incomplete one (an export writes "
                        "its manifest last)")
    try:
        m = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise RecoError(f"{mpath} is not readable JSON ({exc}): the export is damaged") from exc
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise RecoError(f"{mpath} is not a RECO memory export manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise RecoError(f"{root} is export format {m.get('format_version')}; this RECO reads {FORMAT_VERSION}")
    for key in ("memory", "backbone", "backbone_hash", "dim", "count", "parts", "files"):
        if key not in m:
            raise RecoError(f"{mpath} lacks {key!r}: the export is damaged")
    listed = {rel for p in m["parts"] for k, rel in p.items() if k != "rows"}
    if listed - set(m["files"]):
        raise RecoError(f"{mpath} lists parts whose files have no hash: the export is damaged")
    if sum(int(p["rows"]) for p in m["parts"]) != m["count"]:
        raise RecoError(f"{mpath}: the parts hold {sum(int(p['rows']) for p in m['parts'])} rows, the manifest says "
                        f"{m['count']}: the export is damaged")
    for rel, want in sorted(m["files"].items()):
        f = (root / rel).resolve()
        if root.resolve() not in f.parents:
            raise RecoError(f"{mpath} names a file outside the export ({rel}): refused")
        if not f.is_file():
            raise RecoError(f"{rel} is missing from {root}: the export is incomplete")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise RecoError(f"{rel} is {size} bytes, the manifest says {want['bytes']}: the file is truncated or "
                            "was changed; export again")
        if hash_file(f) != want["sha256"]:
            raise RecoError(f"{rel} does not match its sha256 in the manifest: the file was changed or damaged; "
                            "export again")
    unlisted = sorted(set(m["files"]) - listed)
    if unlisted:
        raise RecoError(f"{mpath} hashes {unlisted[0]}, which none of its parts lists: the export is damaged")
    _check_no_extra_files(root, m)
    _check_shapes(root, m, mpath)
    return m


def _check_no_extra_files(root: Path, m: dict) -> None:
    """The import reads the export's folders, so a file the manifest does not list (a part dropped in later)
    would be stored unchecked: the directory must hold exactly the manifest's files."""
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.relative_to(root).as_posix() not in m["files"] and p.name != "manifest.json")
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise RecoError(f"{root} holds {extra[0]}{more}, which its manifest does not list: an import reads exactly "
                        "the exported files; remove it, or export again")


def _check_shapes(root: Path, m: dict, mpath: Path) -> None:
    """The manifest's dim and rows against the arrays themselves (the hashes cover the parts, not the manifest):
    a manifest edited to another dimension is refused before the backbone is compared with it."""
    try:
        dim = int(m["dim"])
    except (TypeError, ValueError) as exc:
        raise RecoError(f"{mpath}: dim {m['dim']!r} is not a whole number: the export is damaged") from exc
    for part in m["parts"]:
        for key in ("img_emb", "text_emb"):
            shape = np.load(root / part[key], mmap_mode="r", allow_pickle=False).shape
            if shape != (int(part["rows"]), dim):
                raise RecoError(f"{part[key]} holds vectors of shape {shape}, the manifest says {part['rows']} rows "
                                f"of dim {dim}: the manifest was edited or damaged; export again")


def start_import(rt, path: str | Path, manifest: dict | None = None, name: str | None = None,
                 backbone: str | None = None, activate: bool = False, storage=None):
    """Check the export (unless `manifest` is read_export's answer already) and the backbone, then register the
    new version (its shards are the export's parts)."""
    from sqlalchemy import select

    from ..backbone import BackboneSpec
    from ..build import start_build
    from ..db.models import Memory
    from ..names import check_name
    from ..store.base import Storage

    m = manifest or read_export(path)
    name = name or m["memory"]
    check_name(name)
    spec = BackboneSpec.parse(backbone or m["backbone"])
    if m["backbone_hash"] and spec.fingerprint != m["backbone_hash"]:
        raise RecoError(f"the export was embedded with {m['backbone']} (fingerprint {m['backbone_hash'][:12]}…); "
                        f"{spec.canonical} here is {spec.fingerprint[:12]}…: another model or other weights. Give "
                        "--backbone with the spec of the same weights on this machine")
    with rt.db.session() as s:
        mem = s.scalar(select(Memory).where(Memory.name == name))
        others = {v.backbone_hash for v in mem.versions} if mem is not None else set()
        if others and m["backbone_hash"] not in others:
            raise RecoError(f"memory {name} holds versions of another backbone: import under a new name (--as)")
    storage = storage or Storage(m.get("storage", {}).get("quantization", "auto"),
                                 bool(m.get("storage", {}).get("on_disk", False)))
    return start_build(rt, name, str(Path(path).resolve()), backbone=spec.canonical, fmt="embeddings",
                       activate=activate, storage=storage)
