"""The standard fine-grained and scene sets, each read from its own published layout (nothing is downloaded):
cub, cars, flowers, aircraft (torchvision's readers, imported when used), dogs, places365 and imagenet."""

from __future__ import annotations

from ..errors import RecoError
from .base import IMAGE_SUFFIXES, PROMPTS, ClassificationSet, need_dir, read_lines, templates_for
from .folder import image_folder


def cub(root: str, split: str = "test") -> ClassificationSet:
    base = need_dir(root, "cub")
    paths = dict(ln.split(" ", 1) for ln in read_lines(base / "images.txt"))
    labels = dict(ln.split(" ", 1) for ln in read_lines(base / "image_class_labels.txt"))
    is_train = dict(ln.split(" ", 1) for ln in read_lines(base / "train_test_split.txt"))
    classes = [ln.split(" ", 1)[1] for ln in read_lines(base / "classes.txt")]
    names = [c.split(".", 1)[-1].replace("_", " ") for c in classes]
    want = "1" if split == "train" else "0"
    samples = [(str(base / "images" / paths[i]), int(labels[i]) - 1) for i in sorted(paths, key=int)
               if is_train[i] == want]
    return ClassificationSet("cub", names, templates_for("cub"), samples)


def _torchvision_set(kind: str, root: str, make) -> ClassificationSet:
    need_dir(root, kind)
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
    return ClassificationSet("flowers", list(PROMPTS["classnames"]["flowers"]), templates_for("flowers"),
                             [(str(p), int(y)) for p, y in zip(ds._image_files, ds._labels)])


def aircraft(root: str, split: str = "test") -> ClassificationSet:
    from torchvision.datasets import FGVCAircraft

    ds = _torchvision_set("aircraft", root, lambda: FGVCAircraft(root, split=split, annotation_level="variant",
                                                                 download=False))
    return ClassificationSet("aircraft", list(ds.classes), templates_for("aircraft"),
                             [(str(p), int(y)) for p, y in zip(ds._image_files, ds._labels)])


def dogs(root: str, split: str = "test") -> ClassificationSet:
    base = need_dir(root, "dogs")
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
    base = need_dir(root, "places365")
    cats = [ln.split(" ")[0] for ln in read_lines(base / "categories_places365.txt")]
    names = [c.strip("/").split("/", 1)[-1].replace("/", " ").replace("_", " ") for c in cats]
    img_dir = next((base / d for d in ("val_256", "val_large") if (base / d).is_dir()), base / "val_256")
    samples = []
    for ln in read_lines(base / "places365_val.txt"):
        name, label = ln.split(" ")
        samples.append((str(img_dir / name.lstrip("/")), int(label)))
    return ClassificationSet("places365", names, templates_for("places365"), samples)


def imagenet(root: str) -> ClassificationSet:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    base = need_dir(root, "imagenet")
    folders = sorted(d for d in base.iterdir() if d.is_dir())
    if len(folders) != len(IMAGENET_CLASSNAMES):
        raise RecoError(f"{root} has {len(folders)} class folders; an ImageNet validation folder has 1000 (<wnid>/)")
    ds = image_folder(root, kind="imagenet")
    ds.classnames = list(IMAGENET_CLASSNAMES)
    return ds
