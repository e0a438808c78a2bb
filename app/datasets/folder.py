"""`imagefolder:DIR`: one folder per class, class names from the folders or a --classnames file (classnames.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import RecoError
from .base import IMAGE_SUFFIXES, ClassificationSet, need_dir, read_templates, templates_for
from .classnames import read_classnames


def image_folder(root: str, classnames_file: str | None = None, templates_file: str | None = None,
                 kind: str = "imagefolder", names_from_folders: Callable[[str], str] | None = None) -> ClassificationSet:
    base = need_dir(root, kind)
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
        names = read_classnames(Path(classnames_file), [d.name for d in folders], root)
    else:
        clean = names_from_folders or (lambda s: s.replace("_", " "))
        names = [clean(d.name) for d in folders]
    templates = read_templates(templates_file) if templates_file else templates_for(kind)
    return ClassificationSet(f"{kind}:{base.name}", names, templates, samples)
