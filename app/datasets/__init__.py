"""Evaluation datasets, from local files only (nothing is downloaded).

Classification specs (`--dataset KIND:PATH`):
  imagefolder:DIR   one folder per class; optional --classnames FILE (a folder<TAB>name mapping; see _classnames)
                    and --templates FILE
  cub:DIR           CUB-200-2011 (images.txt, image_class_labels.txt, train_test_split.txt, classes.txt)
  cars:DIR          Stanford Cars as torchvision lays it out (DIR/stanford_cars/...)
  flowers:DIR       Flowers102 (DIR/flowers-102/...)
  aircraft:DIR      FGVC-Aircraft 2013b (DIR/fgvc-aircraft-2013b/...), variant level
  dogs:DIR          Stanford Dogs (DIR/Images/<wnid>-<name>/..., DIR/test_list.mat when present)
  places365:DIR     Places365 validation (DIR/places365_val.txt, categories_places365.txt, val_256/)
  imagenet:DIR      an ImageNet validation folder: 1000 <wnid> sub-folders
  oven:DIR          OVEN entity recognition (DIR/oven_entity_val.jsonl, DIR/Wiki6M_ver_1_0_title_only.jsonl,
                    DIR/oven_images/<NN>/<image_id>.jpg); or oven:DIR/<split>.jsonl for another split file.
                    Classes are the split's Wikidata entities; each sample is grouped seen / unseen
Retrieval specs:
  karpathy:FILE.json   the Karpathy-split JSON used for COCO and Flickr30k; images under --images-root
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import RecoError
from ..textfile import decode, read_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_PROMPTS = json.loads((Path(__file__).with_name("prompts.json")).read_text(encoding="utf-8"))
# A class name goes into every prompt, and CLIP reads a prompt's first 77 tokens (about 300 characters); a name
# far longer is a file read wrongly (a whole file on one line), which would otherwise be encoded for minutes.
MAX_CLASS_NAME_CHARS = 1_000


def check_class_name(path, where: str, name: str) -> None:
    """`where`: "line 3", "folder 'x'" ... as the error should name it."""
    if len(name) > MAX_CLASS_NAME_CHARS:
        raise RecoError(f"{path} {where} holds a class name of {len(name):,} characters, but a class name is at "
                        f"most {MAX_CLASS_NAME_CHARS:,}: give one class name per line")


def templates_for(kind: str) -> list[str]:
    return list(_PROMPTS["templates"].get(kind, _PROMPTS["templates"]["default"]))


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


def _need_dir(path: str, kind: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise RecoError(f"dataset folder {path} not found (for {kind}: see `reco eval classification --help`)")
    return p


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise RecoError(f"{path} not found")
    return [ln.strip() for ln in read_text(path).splitlines() if ln.strip()]


def read_templates(path: str) -> list[str]:
    templates = _read_lines(Path(path))
    if not templates or any("{c}" not in t for t in templates):
        raise RecoError(f"{path}: every prompt template needs a {{c}} placeholder for the class name (one per line)")
    return templates


def _folder_key(name: str) -> str:
    """A folder or class name compared loosely: no leading number, case, '_' or '-' ('07_Red-circle' ~ 'red circle')."""
    return " ".join(re.sub(r"^\d+[_\-. ]+", "", name).replace("_", " ").replace("-", " ").lower().split())


def _classnames(path: Path, folders: list[str], root: str) -> list[str]:
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


def image_folder(root: str, classnames_file: str | None = None, templates_file: str | None = None,
                 kind: str = "imagefolder", names_from_folders: Callable[[str], str] | None = None) -> ClassificationSet:
    base = _need_dir(root, kind)
    folders = sorted(d for d in base.iterdir() if d.is_dir())
    if not folders:
        raise RecoError(f"{root} has no class folders (one folder per class expected)")
    samples = []
    for label, d in enumerate(folders):
        files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise RecoError(f"class folder {d} has no images")
        samples += [(str(f), label) for f in files]
    if classnames_file:
        names = _classnames(Path(classnames_file), [d.name for d in folders], root)
    else:
        clean = names_from_folders or (lambda s: s.replace("_", " "))
        names = [clean(d.name) for d in folders]
    templates = read_templates(templates_file) if templates_file else templates_for(kind)
    return ClassificationSet(f"{kind}:{base.name}", names, templates, samples)


def cub(root: str, split: str = "test") -> ClassificationSet:
    base = _need_dir(root, "cub")
    paths = dict(ln.split(" ", 1) for ln in _read_lines(base / "images.txt"))
    labels = dict(ln.split(" ", 1) for ln in _read_lines(base / "image_class_labels.txt"))
    is_train = dict(ln.split(" ", 1) for ln in _read_lines(base / "train_test_split.txt"))
    classes = [ln.split(" ", 1)[1] for ln in _read_lines(base / "classes.txt")]
    names = [c.split(".", 1)[-1].replace("_", " ") for c in classes]
    want = "1" if split == "train" else "0"
    samples = [(str(base / "images" / paths[i]), int(labels[i]) - 1) for i in sorted(paths, key=int)
               if is_train[i] == want]
    return ClassificationSet("cub", names, templates_for("cub"), samples)


def _torchvision_set(kind: str, root: str, make) -> ClassificationSet:
    _need_dir(root, kind)
    try:
        ds = make()
    except (RuntimeError, FileNotFoundError) as exc:
        raise RecoError(f"{kind} at {root}: {exc} (download is off: lay the files out as torchvision expects)") from exc
    except ImportError as exc:
        raise RecoError(f"{kind} needs {exc.name}: pip install {exc.name}") from exc
    return ds


def cars(root: str, split: str = "test") -> ClassificationSet:
    from torchvision.datasets import StanfordCars

    ds = _torchvision_set("cars", root, lambda: StanfordCars(root, split=split, download=False))
    return ClassificationSet("cars", list(ds.classes), templates_for("cars"), [(str(p), int(y)) for p, y in ds._samples])


def flowers(root: str, split: str = "test") -> ClassificationSet:
    from torchvision.datasets import Flowers102

    ds = _torchvision_set("flowers", root, lambda: Flowers102(root, split=split, download=False))
    return ClassificationSet("flowers", list(_PROMPTS["classnames"]["flowers"]), templates_for("flowers"),
                             [(str(p), int(y)) for p, y in zip(ds._image_files, ds._labels)])


def aircraft(root: str, split: str = "test") -> ClassificationSet:
    from torchvision.datasets import FGVCAircraft

    ds = _torchvision_set("aircraft", root, lambda: FGVCAircraft(root, split=split, annotation_level="variant",
                                                                 download=False))
    return ClassificationSet("aircraft", list(ds.classes), templates_for("aircraft"),
                             [(str(p), int(y)) for p, y in zip(ds._image_files, ds._labels)])


def dogs(root: str, split: str = "test") -> ClassificationSet:
    base = _need_dir(root, "dogs")
    images = base / "Images"
    folders = sorted(d.name for d in images.iterdir() if d.is_dir()) if images.is_dir() else []
    if not folders:
        raise RecoError(f"{root} has no Images/<wnid>-<breed>/ folders (Stanford Dogs layout)")
    names = [f.split("-", 1)[-1].replace("_", " ") for f in folders]
    index = {f: i for i, f in enumerate(folders)}
    listing = base / f"{split}_list.mat"
    if listing.is_file():
        from scipy.io import loadmat

        files = [str(x[0][0]) for x in loadmat(listing)["file_list"]]
    else:
        files = sorted(str(p.relative_to(images)) for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    unknown = sorted({f.split("/", 1)[0] for f in files} - set(index))
    if unknown:
        raise RecoError(f"{listing.name} lists breeds with no folder under {images}: {', '.join(unknown[:3])}")
    samples = [(str(images / f), index[f.split("/", 1)[0]]) for f in files]
    return ClassificationSet("dogs", names, templates_for("dogs"), samples)


def places365(root: str, split: str = "val") -> ClassificationSet:
    base = _need_dir(root, "places365")
    cats = [ln.split(" ")[0] for ln in _read_lines(base / "categories_places365.txt")]
    names = [c.strip("/").split("/", 1)[-1].replace("/", " ").replace("_", " ") for c in cats]
    img_dir = next((base / d for d in ("val_256", "val_large") if (base / d).is_dir()), base / "val_256")
    samples = []
    for ln in _read_lines(base / "places365_val.txt"):
        name, label = ln.split(" ")
        samples.append((str(img_dir / name.lstrip("/")), int(label)))
    return ClassificationSet("places365", names, templates_for("places365"), samples)


def imagenet(root: str) -> ClassificationSet:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    base = _need_dir(root, "imagenet")
    folders = sorted(d for d in base.iterdir() if d.is_dir())
    if len(folders) != len(IMAGENET_CLASSNAMES):
        raise RecoError(f"{root} has {len(folders)} class folders; an ImageNet validation folder has 1000 (<wnid>/)")
    ds = image_folder(root, kind="imagenet")
    ds.classnames = list(IMAGENET_CLASSNAMES)
    return ds


OVEN_SPLITS = ("oven_entity_val.jsonl", "oven_entity_test.jsonl", "oven_query_val.jsonl", "oven_query_test.jsonl")
OVEN_ENTITY_LISTS = ("Wiki6M_ver_1_0_title_only.jsonl", "Wiki6M_ver_1_0.jsonl")
OVEN_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


_WIKIDATA_ID = re.compile(rb'"wikidata_id"\s*:\s*"([^"\\]*)"')


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


def karpathy(path: str, images_root: str | None = None, split: str = "test") -> RetrievalSet:
    p = Path(path)
    if not p.is_file():
        raise RecoError(f"Karpathy split file {path} not found")
    try:
        data = json.loads(read_text(p))
    except ValueError as exc:
        raise RecoError(f"{path} is not JSON: {exc}") from exc
    root = Path(images_root) if images_root else p.parent
    images, captions = [], []
    for img in data.get("images", []):
        if img.get("split") != split:
            continue
        images.append(str(root / img.get("filepath", "") / img["filename"]))
        captions.append([s["raw"] for s in img["sentences"]])
    if not images:
        raise RecoError(f"{path} has no images in split {split!r}")
    return RetrievalSet(f"karpathy:{p.stem}", images, captions)


CLASSIFICATION = {"imagefolder": image_folder, "cub": cub, "cars": cars, "flowers": flowers, "aircraft": aircraft,
                  "dogs": dogs, "places365": places365, "imagenet": imagenet, "oven": oven}


def load_classification(spec: str, classnames: str | None = None, templates: str | None = None) -> ClassificationSet:
    kind, _, path = spec.partition(":")
    if kind not in CLASSIFICATION or not path:
        raise RecoError(f"bad dataset spec {spec!r}: use KIND:PATH with KIND one of {', '.join(CLASSIFICATION)}")
    if kind == "imagefolder":
        ds = image_folder(path, classnames, templates)
    else:
        if classnames:
            raise RecoError(f"--classnames applies to imagefolder datasets; {kind} brings its own class names")
        ds = CLASSIFICATION[kind](path)
        if templates:
            ds.templates = read_templates(templates)
    if not ds.samples:
        raise RecoError(f"dataset {spec} has no images")
    return ds
