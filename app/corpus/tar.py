"""A streaming tar member reader, about 4x faster than `tarfile` on WebDataset shards.

`tarfile` builds a TarInfo per member through Python-level field parsing; a shard of small images has three
members per item, so on a small backbone that parsing was a tenth of the whole ingestion's time. This reader parses
the 512-byte headers with one struct call, verifies each header's checksum, follows the long-name extensions
(pax `path`/`size` records, GNU `L` names) and reads gzip, bzip2 and xz compressed archives through the
standard library. It yields names and types as the archive states them; what is safe to use is the caller's
decision (wds.py refuses links and names that leave the archive).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from typing import BinaryIO, Iterator, NamedTuple

BLOCK = 512
_HEADER = struct.Struct("100s24x12s12s8s1s100s6s2s32s32s8s8s155s12x")

REGULAR, LINK, SYMLINK, DIRECTORY, OTHER = "file", "link", "symlink", "dir", "other"
_TYPES = {b"0": REGULAR, b"\0": REGULAR, b"7": REGULAR, b"1": LINK, b"2": SYMLINK, b"5": DIRECTORY}


class TarError(Exception):
    """The archive is not a tar, or is damaged or truncated."""


class Member(NamedTuple):
    name: str
    type: str  # REGULAR, LINK, SYMLINK, DIRECTORY or OTHER
    data: bytes  # the content of a regular file; b"" otherwise


def _open(path: str, buffering: int = -1) -> BinaryIO:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb", buffering=1 << 20 if buffering < 0 else buffering)


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as exc:
        raise TarError(f"invalid number field {field!r}") from exc


def _checksum(field: bytes) -> int:
    """The header's stated checksum, -1 when the field holds none (text, not a header: never equal to a sum)."""
    try:
        return _number(field) if field.strip(b"\0 ") else -1
    except TarError:
        return -1


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _read(f: BinaryIO, n: int, exact: bool = True) -> bytes:
    try:
        data = f.read(n)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:  # a damaged compressed stream
        raise TarError(str(exc)) from exc
    if exact and len(data) != n:
        raise TarError("unexpected end of data (truncated archive?)")
    return data


def _pax(data: bytes) -> dict[str, str]:
    """`LEN key=value\\n` records (POSIX.1-2001)."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            raise TarError("invalid pax header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def members(path: str) -> Iterator[Member]:
    """Every member of the archive at PATH, in order. Raises TarError on a damaged or truncated archive."""
    return _walk(path, with_data=True)


def headers(path: str) -> Iterator[Member]:
    """Every member's name and type (data b""), seeking past the content: a cheap check, before any version
    exists, that the whole archive can be read to its end. It applies the same rules as `members`."""
    return _walk(path, with_data=False)


def _skip(f: BinaryIO, n: int) -> None:
    """Past n bytes of content. Past the end of a file is found by the next header read (it comes back short)."""
    if n:
        try:
            f.seek(n, 1)
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:  # a damaged compressed stream
            raise TarError(str(exc)) from exc


def _walk(path: str, with_data: bool) -> Iterator[Member]:
    # the header scan reads 512 bytes a member, unbuffered: a large read buffer would read every image anyway
    with _open(path, buffering=-1 if with_data else 0) as f:
        long_name: str | None = None
        pax: dict[str, str] = {}
        first = True
        while True:
            header = _read(f, BLOCK, exact=False)
            if len(header) < BLOCK:
                if first and not header:
                    raise TarError("empty file")
                raise TarError("unexpected end of data (truncated archive?)")
            if header == b"\0" * BLOCK:
                return  # end-of-archive marker
            (name, size, _mtime, chksum, typeflag, _link, magic, _ver, _u, _g, _maj, _min, prefix) = (
                _HEADER.unpack(header))
            if _checksum(chksum) != sum(header[:148]) + 256 + sum(header[156:]):
                raise TarError("invalid header (not a tar archive, or a damaged one)")
            first = False
            n = int(pax["size"]) if "size" in pax else _number(size)
            if typeflag in (b"x", b"g", b"L", b"K"):  # extensions that describe the next member
                data = _read(f, n)
                _read(f, -n % BLOCK)
                if typeflag == b"x":
                    pax = _pax(data)
                elif typeflag == b"L":
                    long_name = _text(data)
                continue
            full = _text(name)
            if magic.startswith(b"ustar") and prefix[0:1] not in (b"\0", b""):
                full = f"{_text(prefix)}/{full}"
            full = pax.get("path", long_name or full)
            kind = _TYPES.get(typeflag, OTHER)
            if typeflag == b"\0" and full.endswith("/"):
                kind = DIRECTORY  # old-style directory entry (tarfile reads it the same way)
            if kind == DIRECTORY:
                full = full.rstrip("/")
            if with_data:
                data = _read(f, n)
                _read(f, -n % BLOCK)
            else:
                data = b""
                _skip(f, n + -n % BLOCK)
            yield Member(full, kind, data if kind == REGULAR else b"")
            long_name, pax = None, {}
