"""What every dataset loader shares: the two set types, prompt templates, class-name checks, and readers of
line files and JSONL files (all text read as app/textfile.py says)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import RecoError
from ..textfile import decode, read_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# prompts.json: "templates" per dataset kind (and a "default"), "classnames" for sets whose files name no classes
PROMPTS = json.loads((Path(__file__).with_name("prompts.json")).read_text(encoding="utf-8"))
# A class name goes into every prompt, and CLIP reads a prompt's first 77 tokens (about 300 characters); a name
# far longer is a file read wrongly (a whole file on one line), which would otherwise be encoded for minutes.
MAX_CLASS_NAME_CHARS = 1_000


def check_class_name(path, where: str, name: str) -> None:
    """`where`: "line 3", "folder 'x'" ... as the error should name it."""
    if len(name) > MAX_CLASS_NAME_CHARS:
        raise RecoError(f"{path} {where} holds a class name of {len(name):,} characters, but a class name is at "
                        f"most {MAX_CLASS_NAME_CHARS:,}: give one class name per line")


def templates_for(kind: str) -> list[str]:
    return list(PROMPTS["templates"].get(kind, PROMPTS["templates"]["default"]))


@dataclass
class ClassificationSet:
    name: str
    classnames: list[str]
    templates: list[str]
    samples: list[tuple[str, int]]  # (image path, label)
    loader: Callable[[str], object] | None = None  # path -> PIL image (default: PIL.open)
    skipped: dict = field(default_factory=dict)
    # a stable id per class (OVEN: the Wikidata id), matched against a stored class set's ids; default the names
    class_ids: list[str] | None = None
    # a group per sample whose accuracies are reported apart, with their harmonic mean (OVEN: seen / unseen)
    groups: list[str] | None = None

    def ids(self) -> list[str]:
        return list(self.class_ids) if self.class_ids is not None else list(self.classnames)

    def content_hash(self) -> str:
        """A cheap fingerprint (no image is read): sha256 over class names, templates and every (class folder/file
        name, size in bytes, label). Adding, removing, relabelling or resizing a file changes it."""
        h = hashlib.sha256(json.dumps([self.classnames, self.templates]).encode())
        for path, label in self.samples:
            p = Path(path)
            h.update(f"{p.parent.name}/{p.name}\0{p.stat().st_size if p.exists() else -1}\0{label}\n".encode())
        # appended only when set, so sets without ids or groups keep the fingerprints already stored
        for tag, extra in (("class_ids", self.class_ids), ("groups", self.groups)):
            if extra is not None:
                h.update(f"\0{tag}\0{json.dumps(list(extra))}".encode())
        return h.hexdigest()


@dataclass
class RetrievalSet:
    name: str
    images: list[str]
    captions: list[list[str]]  # captions[i]: every caption of image i

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for path, caps in zip(self.images, self.captions):
            p = Path(path)
            h.update(f"{p.name}\0{p.stat().st_size if p.exists() else -1}\0{json.dumps(caps)}\n".encode())
        return h.hexdigest()


def need_dir(path: str, kind: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise RecoError(f"dataset folder {path} not found (for {kind}: see `reco eval classification --help`)")
    return p


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise RecoError(f"{path} not found")
    return [ln.strip() for ln in read_text(path).splitlines() if ln.strip()]


def read_templates(path: str) -> list[str]:
    templates = read_lines(Path(path))
    if not templates or any("{c}" not in t for t in templates):
        raise RecoError(f"{path}: every prompt template needs a {{c}} placeholder for the class name (one per line)")
    return templates


def read_jsonl(path: Path, parse: Callable[[bytes], bool] | None = None):
    """(line number, object) per non-blank line (that `parse` accepts), streamed: OVEN's entity list has six
    million. A line that is not a JSON object stops the read with its number; text is UTF-8 (app/textfile.py)."""
    with open(path, "rb") as f:  # bytes: `parse` skips most lines of a big file before they are decoded
        offset = 0
        for n, line in enumerate(f, 1):
            at, offset = offset, offset + len(line)
            if not line.strip() or (parse is not None and not parse(line)):
                continue
            text = decode(line, path, at)
            if not text.strip():  # a BOM alone on the first line
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RecoError(f"{path} line {n} is not JSON ({exc.msg}): a JSONL file holds one JSON object per "
                                f"line; fix or remove that line") from exc
            if not isinstance(obj, dict):
                raise RecoError(f"{path} line {n} is not a JSON object: a JSONL file holds one JSON object per line")
            yield n, obj
