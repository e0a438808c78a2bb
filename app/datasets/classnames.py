"""The class names of an image folder from a --classnames file: a mapping (JSON object, or `folder<TAB>name` lines)
or a plain list, read only where the folders say which line is which class."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import RecoError
from ..textfile import read_text
from .base import check_class_name


def _folder_key(name: str) -> str:
    """A folder or class name compared loosely: no leading number, case, '_' or '-' ('07_Red-circle' ~ 'red circle')."""
    return " ".join(re.sub(r"^\d+[_\-. ]+", "", name).replace("_", " ").replace("-", " ").lower().split())


def read_classnames(path: Path, folders: list[str], root: str) -> list[str]:
    """Class names in sorted folder order, from a mapping (JSON object, or `folder<TAB>name` lines) or a plain list.

    A plain list says nothing about which folder is which class, so it is read only where the folders say it:
    line N names the N-th folder in sorted order and the names match (`_folder_key`), or the folders are numbered
    0..n-1 or 1..n and line N names folder number N (numerically, so 10 comes after 9). Any other plain list would
    label images by a guess, wrongly without a word when the guess is wrong, so it is refused."""
    fix = "write one `folder<TAB>class name` line per folder, or a JSON object {folder: class name}"
    if not path.is_file():
        raise RecoError(f"{path} not found")
    text = read_text(path)
    mapping = None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RecoError(f"{path} is not valid JSON ({exc}): {fix}") from exc
        if isinstance(data, dict):
            mapping = {str(k): str(v) for k, v in data.items()}
            for k, v in mapping.items():
                check_class_name(path, f"folder {k!r}", v)
        elif isinstance(data, list):
            lines = [str(x).strip() for x in data if str(x).strip()]
            for i, v in enumerate(lines, 1):
                check_class_name(path, f"item {i}", v)
        else:
            raise RecoError(f"{path} must hold a JSON object or list: {fix}")
    else:
        numbered = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        for n, ln in numbered:
            check_class_name(path, f"line {n}", ln)
        lines = [ln for _, ln in numbered]
        if any("\t" in ln for ln in lines):
            pairs = [ln.split("\t", 1) for ln in lines]
            if any(len(p) != 2 or not p[1].strip() for p in pairs):
                raise RecoError(f"{path}: every line needs `folder<TAB>class name` once one line has a tab")
            mapping = {k.strip(): v.strip() for k, v in pairs}
    if mapping is not None:
        missing = [f for f in folders if f not in mapping]
        unknown = sorted(set(mapping) - set(folders))
        if missing or unknown:
            raise RecoError(f"{path} does not map the class folders of {root}: "
                            + "; ".join(x for x in (f"no name for {', '.join(missing[:5])}" if missing else "",
                                                    f"no folder {', '.join(unknown[:5])}" if unknown else "") if x))
        return [mapping[f] for f in folders]
    if len(lines) != len(folders):
        raise RecoError(f"{path} has {len(lines)} class names but {root} has {len(folders)} class folders: {fix}")
    keys = [_folder_key(f) for f in folders]
    if [_folder_key(name) for name in lines] == keys:
        return lines
    by_number = _numbered(folders)
    if by_number is not None:
        return [lines[i] for i in by_number]
    moved = [(name, keys.index(_folder_key(name))) for i, name in enumerate(lines)
             if _folder_key(name) in keys and keys.index(_folder_key(name)) != i]
    if moved:
        name, at = moved[0]
        raise RecoError(f"{path} lists the class folders' names in another order ({name!r} is line "
                        f"{lines.index(name) + 1} but folder {folders[at]!r} is number {at + 1} in sorted order): a "
                        f"plain list is read in sorted folder order, so every image would get another class's "
                        f"name. {fix[0].upper()}{fix[1:]}, or list the names in sorted folder order")
    i = next(i for i, (k, name) in enumerate(zip(keys, lines)) if _folder_key(name) != k)
    raise RecoError(f"{path} is a plain list, but the class folders of {root} are not named like its classes "
                    f"(folder {folders[i]!r} comes number {i + 1} in sorted order, line {i + 1} is {lines[i]!r}), "
                    f"so nothing says which folder is which class: {fix} (a plain list is read only when line N "
                    f"names the N-th folder, or the folders are numbered 0..{len(folders) - 1} or 1..{len(folders)})")


def _numbered(folders: list[str]) -> list[int] | None:
    """For folders numbered 0..n-1 or 1..n (padded or not), each folder's line index, in the folders' order."""
    if not all(f.isascii() and f.isdigit() for f in folders):
        return None
    numbers = [int(f) for f in folders]
    for first in (0, 1):
        if sorted(numbers) == list(range(first, first + len(numbers))):
            return [x - first for x in numbers]
    return None
