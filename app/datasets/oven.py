"""`oven:DIR`: OVEN entity recognition as zero-shot classification over the Wikidata entities a split names."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import RecoError
from .base import ClassificationSet, read_jsonl, templates_for

OVEN_SPLITS = ("oven_entity_val.jsonl", "oven_entity_test.jsonl", "oven_query_val.jsonl", "oven_query_test.jsonl")
OVEN_ENTITY_LISTS = ("Wiki6M_ver_1_0_title_only.jsonl", "Wiki6M_ver_1_0.jsonl")
OVEN_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_WIKIDATA_ID = re.compile(rb'"wikidata_id"\s*:\s*"([^"\\]*)"')


def _field(obj: dict, key: str, path: Path, n: int, needed: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        hint = " (a split without answers cannot be scored: use oven_entity_val.jsonl)" if key == "entity_id" else ""
        raise RecoError(f"{path} line {n} has no {key!r}: every line needs {needed}{hint}")
    return value


def _oven_files(path: str, split: str | None) -> tuple[Path, Path, Path]:
    """(split file, entity list, image folder), each checked before a line is read."""
    p = Path(path)
    if p.suffix == ".jsonl":
        if split:
            raise RecoError(f"oven:{path} names a split file and split={split!r} another: give one of them")
        base, split_file = p.parent, p
    else:
        base = p
        split_file = p / (f"oven_{split if '_' in split else 'entity_' + split}.jsonl" if split else OVEN_SPLITS[0])
    if not base.is_dir():
        raise RecoError(f"OVEN folder {base} not found: give the folder holding OVEN's oven_entity_*.jsonl files")
    if not split_file.is_file():
        fix = (f"check the file name (OVEN's are {', '.join(OVEN_SPLITS)})" if p.suffix == ".jsonl" else
               f"put OVEN's {split_file.name} in {base}, or give a split file itself (oven:{base}/{OVEN_SPLITS[1]})")
        raise RecoError(f"OVEN split file {split_file} not found: {fix}")
    entity_list = next((base / n for n in OVEN_ENTITY_LISTS if (base / n).is_file()), None)
    if entity_list is None:
        raise RecoError(f"{base} has no OVEN entity list: put {OVEN_ENTITY_LISTS[0]} (or the full "
                        f"{OVEN_ENTITY_LISTS[1]}) next to {split_file.name}")
    images = base / "oven_images"
    if not images.is_dir():
        raise RecoError(f"{base} has no oven_images folder: put OVEN's images there as "
                        f"oven_images/<NN>/<image_id>.jpg (NN: the first two digits after the id's last '_')")
    return split_file, entity_list, images


def _oven_group(data_split: str, path: Path, n: int) -> str:
    """OVEN's evaluation reads `_seen` / `_unseen` in the split name (val_seen, test_unseen, ...)."""
    if "_unseen" in data_split:
        return "unseen"
    if "_seen" in data_split:
        return "seen"
    raise RecoError(f"{path} line {n} has data_split {data_split!r}: OVEN's are val_seen, val_unseen, test_seen "
                    f"or test_unseen (a name with _seen or _unseen)")


def _oven_titles(entity_list: Path, wanted: dict[str, int], split_file: Path) -> dict[str, str]:
    """The titles of the `wanted` ids (id -> first split line using it), keeping nothing else of the list."""
    titles: dict[str, str] = {}
    needed = "'wikidata_id' and 'wikipedia_title'"

    def maybe_wanted(line: bytes) -> bool:  # a regex is many times faster than json.loads on lines not wanted
        m = _WIKIDATA_ID.search(line)
        return m is None or m.group(1).decode("utf-8", "replace") in wanted

    for n, obj in read_jsonl(entity_list, maybe_wanted):
        qid = obj.get("wikidata_id")
        if isinstance(qid, str) and qid in wanted and qid not in titles:
            titles[qid] = _field(obj, "wikipedia_title", entity_list, n, needed)
            if len(titles) == len(wanted):
                break
    missing = sorted((line, qid) for qid, line in wanted.items() if qid not in titles)
    if missing:
        line, qid = missing[0]
        raise RecoError(f"{split_file} line {line}: entity {qid} is not in {entity_list} ({len(missing)} of the "
                        f"split's {len(wanted)} entities are missing): use the entity list that comes with OVEN's "
                        f"split files (Wiki6M_ver_1_0)")
    return titles


def _oven_image(images: Path, image_id: str) -> str:
    """oven_images/<NN>/<image_id>.<ext>, NN the first two characters after the id's last '_' (as OVEN's
    merge_oven_images.py lays them out); the first extension that exists, else .jpg (skipped at evaluation)."""
    stem = images / image_id.rsplit("_", 1)[-1][:2] / image_id
    for suffix in OVEN_IMAGE_SUFFIXES:
        candidate = stem.with_name(image_id + suffix)
        if candidate.is_file():
            return str(candidate)
    return str(stem.with_name(image_id + ".jpg"))


def oven(path: str, split: str | None = None) -> ClassificationSet:
    """An OVEN split as zero-shot classification over the entities it names; `groups` keeps seen / unseen, whose
    harmonic mean is OVEN's score. `split` ('val', 'test', 'query_val', ...) picks a file when `path` is a folder."""
    split_file, entity_list, images = _oven_files(path, split)
    needed = "'image_id', 'entity_id' and 'data_split'"
    rows, first_line = [], {}
    for n, obj in read_jsonl(split_file):
        image_id, qid, data_split = (_field(obj, k, split_file, n, needed)
                                     for k in ("image_id", "entity_id", "data_split"))
        if "/" in image_id or "\\" in image_id or image_id.strip(".") == "":
            raise RecoError(f"{split_file} line {n} has image_id {image_id!r}, not a file name: OVEN's look like "
                            f"oven_04965476")
        rows.append((image_id, qid, _oven_group(data_split, split_file, n)))
        first_line.setdefault(qid, n)
    if not rows:
        raise RecoError(f"OVEN split file {split_file} has no lines: give a split with questions "
                        f"(oven_entity_val.jsonl or oven_entity_test.jsonl)")
    titles = _oven_titles(entity_list, first_line, split_file)
    ids = sorted(first_line)
    label = {qid: i for i, qid in enumerate(ids)}
    return ClassificationSet(f"oven:{split_file.stem}", [titles[q] for q in ids], templates_for("oven"),
                             [(_oven_image(images, image_id), label[qid]) for image_id, qid, _ in rows],
                             class_ids=ids, groups=[g for _, _, g in rows])
