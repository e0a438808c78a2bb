"""WebDataset tar shards (img2dataset's output): a directory, a glob, or a brace pattern like
`data/{00000..00099}.tar`. One tar = one shard; members are streamed, never extracted."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..errors import RecoError
from . import tar
from .base import Item, SkipReason, clean_caption

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    a, b = m.group(1), m.group(2)
    width = len(a) if a.startswith("0") or len(a) == len(b) else 0
    out = []
    for n in range(int(a), int(b) + 1):
        out.extend(expand_braces(pattern[: m.start()] + str(n).zfill(width) + pattern[m.end() :]))
    return out


# what a directory source picks up: tar archives, plain or compressed (the tar reader detects the compression)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
# archives it cannot read: a directory holding one of these stops the build rather than lose its items
OTHER_ARCHIVES = (".zip", ".7z", ".rar", ".tar.zst", ".tzst", ".tar.lz4", ".gz", ".bz2", ".xz", ".zst", ".lz4")


def _shard_files(directory: Path) -> list[str]:
    """The directory's tar shards, in name order; img2dataset's sidecar files (`_stats.json`, `.parquet`, ...) are
    not shards and are left alone, but an archive in a form the reader cannot open stops the build."""
    names = sorted(f for f in directory.iterdir() if f.is_file())
    shards = [f for f in names if f.name.lower().endswith(TAR_SUFFIXES)]
    other = [f.name for f in names if f not in shards and f.name.lower().endswith(OTHER_ARCHIVES)]
    if other:
        raise RecoError(f"{directory} holds {len(other)} archive(s) RECO cannot read as shards, e.g. {other[0]}: "
                        f"convert them to .tar (or .tar.gz, .tar.bz2, .tar.xz) or move them out, so that no item is "
                        f"silently left out")
    return [str(f) for f in shards]


def plan(source: str, **_options) -> list[dict]:
    p = Path(source)
    if p.is_dir():
        files = _shard_files(p)
    elif _BRACE.search(source):
        files = expand_braces(source)
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise RecoError(f"{len(missing)} shard(s) of {source} not found, e.g. {missing[0]}")
    elif any(c in source for c in "*?["):
        files = sorted(glob.glob(source))
    elif p.is_file():
        files = [str(p)]
    else:
        raise RecoError(f"corpus source {source} not found: give a directory of .tar shards, a glob or a brace pattern")
    odd = [f for f in files if not f.lower().endswith(TAR_SUFFIXES)]
    if odd:
        raise RecoError(f"{odd[0]} is not a tar shard (the wds format reads {', '.join(TAR_SUFFIXES)}): give "
                        f"--format manifest for a CSV, TSV, JSONL or Parquet manifest, --format embeddings for a "
                        f"clip-retrieval folder")
    if not files and p.is_dir():
        raise RecoError(f"no shards found in {source}: a directory source holds WebDataset tars "
                        f"({', '.join(TAR_SUFFIXES)}); for a manifest or clip-retrieval embeddings, give the file or "
                        f"the folder with img_emb/ (--format manifest|embeddings)")
    return [_checked(f) for f in files]


def _checked(file: str) -> dict:
    """One shard's spec, after reading its headers to the end (seeking past the content): a truncated or damaged
    tar, a file that is no tar, or members not grouped by key stop the build here, before a version exists,
    instead of failing it after the backbone loaded or misfiling items. `rows`: the items it holds."""
    path = str(Path(file).resolve())
    keys = _Keys(path)
    try:
        for member in tar.headers(path):
            if member.type in (tar.LINK, tar.SYMLINK, tar.REGULAR):
                keys.at(_split(member.name.lstrip("/"))[0])
    except (tar.TarError, OSError) as exc:
        raise RecoError(f"shard {path} is not a readable tar archive ({exc}): re-create it, or move it out of the "
                        "source") from exc
    return {"path": path, "name": Path(file).name, "rows": keys.count}


class _Keys:
    """The keys of one tar in order. WebDataset reads an item's members together, so each key's members must be
    adjacent; a key met again after another began would be read as two incomplete items (as `missing_image` and
    `empty_caption`, or a `duplicate_key`), so it is refused with the way to re-pack the tar."""

    def __init__(self, path: str):
        self.path, self.done, self.key, self.count = path, set(), None, 0

    def at(self, key: str) -> bool:
        """Note a member of KEY; True when it starts a new item."""
        if key == self.key:
            return False
        if key in self.done:
            raise RecoError(f"shard {self.path} is not sorted by key: the members of {key!r} are not adjacent; "
                            f"re-pack it with `tar --sort=name` (WebDataset reads an item's members together)")
        if self.key is not None:
            self.done.add(self.key)
        self.key, self.count = key, self.count + 1
        return True


def _safe(name: str) -> bool:
    pp = PurePosixPath(name)
    return not pp.is_absolute() and ".." not in pp.parts and not name.startswith("\\")


def _split(name: str) -> tuple[str, str]:
    """WebDataset key/extension: the key is the path up to the first dot of the basename."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def read(spec: dict) -> Iterator[Item]:
    path = spec["path"]
    if not Path(path).is_file():
        raise RecoError(f"shard {path} not found")
    sample: dict = {}
    key = None
    unsafe = False
    keys = _Keys(path)  # planning checked the order; a tar replaced since is refused the same way
    try:
        for member in tar.members(path):
            if member.type in (tar.LINK, tar.SYMLINK) or not _safe(member.name):
                k, _ = _split(member.name.lstrip("/"))
                if keys.at(k) and key is not None:
                    yield _item(key, sample, unsafe, path)
                    sample, unsafe = {}, False
                key, unsafe = k, True
                continue
            if member.type != tar.REGULAR:
                continue
            k, ext = _split(member.name)
            if keys.at(k) and key is not None:
                yield _item(key, sample, unsafe, path)
                sample, unsafe = {}, False
            key = k
            sample[ext] = member.data
            if ext in IMAGE_EXTS:
                sample["__member__"] = member.name
    except (tar.TarError, OSError) as exc:
        raise RecoError(f"shard {path} is not a readable tar archive: {exc}") from exc
    if key is not None:
        yield _item(key, sample, unsafe, path)


def _item(key: str, sample: dict, unsafe: bool, path: str) -> Item:
    if unsafe:
        return Item(key=key, skip=SkipReason.UNSAFE_PATH)
    member = sample.pop("__member__", None)
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    caption = None
    if "txt" in sample:
        caption = clean_caption(sample["txt"].decode("utf-8", errors="replace"))
    extra = None
    if "json" in sample:
        try:
            extra = json.loads(sample["json"])
        except ValueError:
            extra = None
        if caption is None and isinstance(extra, dict):
            caption = clean_caption(extra.get("caption"))
    if image is None:
        return Item(key=key, caption=caption, skip=SkipReason.MISSING_IMAGE)
    if caption is None:
        return Item(key=key, skip=SkipReason.EMPTY_CAPTION)
    return Item(key=key, caption=caption, image_bytes=image, extra=extra, src={"tar": path, "member": member})
