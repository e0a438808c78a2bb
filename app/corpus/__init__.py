"""Corpus readers. Each format cuts a source into shards (JSON-able specs, one ingest task each) and
streams the items of one shard; nothing has to fit in memory.

  wds        WebDataset tars as img2dataset writes them: <key>.jpg|png|webp, <key>.txt, optional <key>.json
  manifest   CSV / TSV / JSONL / Parquet with an image-path column and a caption column
  embeddings clip-retrieval output: img_emb/img_emb_*.npy, text_emb/text_emb_*.npy, metadata/metadata_*.parquet
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..errors import RecoError
from .base import Item, SkipReason  # noqa: F401

FORMATS = ("wds", "manifest", "embeddings")


def detect_format(source: str) -> str:
    p = Path(source)
    if p.is_dir() and (p / "img_emb").is_dir():
        return "embeddings"
    if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".parquet", ".json"):
        return "manifest"
    return "wds"


def plan_shards(source: str, fmt: str | None = None, **options) -> tuple[str, list[dict]]:
    """(format, shard specs) for a source; raises RecoError with what to fix when the source is unusable."""
    fmt = fmt or detect_format(source)
    if fmt == "wds":
        from .wds import plan
    elif fmt == "manifest":
        from .manifest import plan
    elif fmt == "embeddings":
        from .embeddings import plan
    else:
        raise RecoError(f"unknown corpus format {fmt!r}: use one of {', '.join(FORMATS)}")
    shards = plan(source, **options)
    if not shards:
        raise RecoError(f"no shards found in {source} (format {fmt})")
    return fmt, shards


def read_shard(fmt: str, spec: dict) -> Iterator[Item]:
    if fmt == "wds":
        from .wds import read
    elif fmt == "manifest":
        from .manifest import read
    elif fmt == "embeddings":
        from .embeddings import read
    else:
        raise RecoError(f"unknown corpus format {fmt!r}")
    return read(spec)


def read_source_images(srcs: dict) -> dict:
    """{key: the image the item came from, read again from its source, or None when it cannot be}, for
    {key: src payload}: the leakage guard's pixel check and the evaluation gallery. Each tar is opened and its
    index read once for all the items it holds (one open per item re-reads the whole index each time)."""
    import io
    import tarfile
    from collections import defaultdict

    from PIL import Image

    def decode(data):
        im = Image.open(io.BytesIO(data))
        im.load()
        return im.convert("RGB")

    out: dict = {}
    by_tar = defaultdict(list)
    for key, src in srcs.items():
        out[key] = None
        if src and "path" in src:
            try:
                out[key] = decode(Path(src["path"]).read_bytes())
            except (OSError, ValueError):
                pass
        elif src and "tar" in src:
            by_tar[src["tar"]].append((key, src["member"]))
    for path, members in by_tar.items():
        try:
            with tarfile.open(path) as tar:
                for key, member in members:
                    try:
                        f = tar.extractfile(member)
                        out[key] = decode(f.read()) if f is not None else None
                    except (OSError, KeyError, tarfile.TarError, ValueError):
                        pass
        except (OSError, tarfile.TarError):
            pass
    return out
