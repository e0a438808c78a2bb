"""Evaluation datasets, from local files only (nothing is downloaded); the specs each kind takes: specs.py.

base.py       ClassificationSet, RetrievalSet, prompt templates (prompts.json), class-name checks, line/JSONL readers
classnames.py an image folder's class names from a --classnames file
folder.py     imagefolder:DIR
standard.py   cub, cars, flowers, aircraft, dogs, places365, imagenet
oven.py       oven:DIR (OVEN entity recognition)
retrieval.py  karpathy:FILE.json (COCO, Flickr30k)
specs.py      KIND:PATH -> a loaded set (load_classification)

Nothing here imports torch, torchvision or open_clip at import time: a loader imports what it needs when called.
"""

from .base import (IMAGE_SUFFIXES, MAX_CLASS_NAME_CHARS, PROMPTS, ClassificationSet, RetrievalSet,
                   check_class_name, read_jsonl, read_templates, templates_for)
from .classnames import read_classnames
from .folder import image_folder
from .oven import OVEN_ENTITY_LISTS, OVEN_IMAGE_SUFFIXES, OVEN_SPLITS, _oven_group, oven
from .retrieval import karpathy
from .specs import CLASSIFICATION, load_classification
from .standard import aircraft, cars, cub, dogs, flowers, imagenet, places365

__all__ = ["CLASSIFICATION", "IMAGE_SUFFIXES", "MAX_CLASS_NAME_CHARS", "OVEN_ENTITY_LISTS", "OVEN_IMAGE_SUFFIXES",
           "OVEN_SPLITS", "PROMPTS", "ClassificationSet", "RetrievalSet", "aircraft", "cars", "check_class_name", "cub",
           "dogs", "flowers", "image_folder", "imagenet", "karpathy", "load_classification", "oven", "places365",
           "read_classnames", "read_jsonl", "read_templates", "templates_for",
           "_oven_group"]  # _oven_group: tests/test_oven.py checks OVEN's seen / unseen rule through it
