"""Users' text files (manifests, class names, prompt templates): UTF-8, with or without a BOM, and nothing else.

Guessing another encoding would store misspelt captions and class names without a word, so a file that is not
UTF-8 stops with the line of its first bad byte and the command that converts it. Every reader of a user's text
file goes through here.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Iterator

from .errors import RecoError

BOM = b"\xef\xbb\xbf"


def decode(raw: bytes, path: str | Path, offset: int = 0) -> str:
    """`raw`, the bytes of `path` from byte `offset` on, as text; a BOM at the file's very start is dropped."""
    skip = len(BOM) if offset == 0 and raw.startswith(BOM) else 0
    try:
        return (raw[skip:] if skip else raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, offset + skip + exc.start) from None


def read_text(path: str | Path) -> str:
    """A whole (small) text file: templates, class names of an image folder, a JSON file."""
    return decode(Path(path).read_bytes(), path)


def lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, text without its line end) per line, streamed: a names file can hold millions."""
    with open(path, "rb") as f:
        offset = 0
        for n, raw in enumerate(f, 1):
            yield n, decode(raw, path, offset).rstrip("\r\n")
            offset += len(raw)


def line_at(path: str | Path, offset: int) -> int:
    """The line number (from 1) holding byte `offset` of `path`, counted in 1 MiB reads."""
    line, left = 1, offset
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            line += chunk.count(b"\n")
            left -= len(chunk)
    return line


def not_utf8(path: str | Path, at: int) -> RecoError:
    """The error for byte `at` of `path` that is not UTF-8: where it is, and how to convert the file (the copy
    keeps the file's suffix, which names a manifest's format)."""
    p = Path(path)
    with open(p, "rb") as f:
        utf16 = f.read(2) in (b"\xff\xfe", b"\xfe\xff")
    out = p.with_name(f"{p.stem}.utf8{p.suffix}")
    src = "utf-16" if utf16 else "latin1"
    return RecoError(f"{p} is not UTF-8 text (line {line_at(p, at)}, byte {at}): convert it, e.g. "
                     f"`iconv -f {src} -t utf-8 {shlex.quote(str(p))} > {shlex.quote(str(out))}` (put the file's "
                     f"real encoding after -f), and give {out.name} instead")
