"""Dataset specs, read from local files only (nothing is downloaded); `load_classification` loads one.

Classification specs (`--dataset KIND:PATH`):
  imagefolder:DIR   one folder per class; optional --classnames FILE (a folder<TAB>name mapping; see classnames.py)
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

from ..errors import RecoError
from .base import ClassificationSet, read_templates
from .folder import image_folder
from .oven import oven
from .standard import aircraft, cars, cub, dogs, flowers, imagenet, places365

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
