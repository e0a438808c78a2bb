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


def plan(source: str, **_options) -> list[dict]:
    p = Path(source)
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.tar"))
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
    return [{"path": str(Path(f).resolve()), "name": Path(f).name} for f in files]


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
    try:
        for member in tar.members(path):
            if member.type in (tar.LINK, tar.SYMLINK) or not _safe(member.name):
                k, _ = _split(member.name.lstrip("/"))
                if key is not None and k != key:
                    yield _item(key, sample, unsafe, path)
                    sample, unsafe = {}, False
                key, unsafe = k, True
                continue
            if member.type != tar.REGULAR:
                continue
            k, ext = _split(member.name)
            if key is not None and k != key:
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
