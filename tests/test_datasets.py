"""Dataset loaders (app.datasets): each reads a standard local layout, built here in tmp_path with tiny images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio

from app import datasets, synthetic
from app.datasets import karpathy, load_classification
from app.errors import RecoError

PROMPTS = json.loads((Path(datasets.__file__).with_name("prompts.json")).read_text())


def _img(path: Path, seed: int = 0, fmt: str | None = None) -> Path:
    """A 16x16 synthetic image at path (JPEG for .jpg, PNG otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color, shape = synthetic.concept(seed)
    fmt = fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    synthetic.render(color, shape, size=16, seed=seed).save(path, fmt)
    return path


def _lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- imagefolder

@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "shapes"
    _img(root / "red_square" / "b.png", 0)
    _img(root / "red_square" / "a.png", 1)
    _img(root / "blue_circle" / "x.jpg", 2)
    _img(root / "blue_circle" / "nested" / "y.JPEG", 3)  # rglob, case-insensitive suffix
    (root / "blue_circle" / "notes.txt").write_text("not an image")
    _img(root / "green_cross" / "z.png", 4)
    (root / "README.txt").write_text("a file at the top is not a class")
    return root


def test_imagefolder_samples_labels_names_templates(folder):
    ds = datasets.image_folder(str(folder))
    assert ds.name == "imagefolder:shapes"
    # sorted folder order = labels; "_" -> " " in names
    assert ds.classnames == ["blue circle", "green cross", "red square"]
    assert ds.samples == [
        (str(folder / "blue_circle" / "nested" / "y.JPEG"), 0),
        (str(folder / "blue_circle" / "x.jpg"), 0),
        (str(folder / "green_cross" / "z.png"), 1),
        (str(folder / "red_square" / "a.png"), 2),
        (str(folder / "red_square" / "b.png"), 2),
    ]
    assert ds.templates == PROMPTS["templates"]["default"]
    assert all("{c}" in t for t in ds.templates)


def test_imagefolder_classnames_and_templates_files(folder, tmp_path):
    names = _lines(tmp_path / "names.tsv", ["blue_circle\tcircle of blue", "", "green_cross\tcross of green",
                                            "red_square\tsquare of red"])  # names unlike the folders: a mapping
    tmpl = _lines(tmp_path / "tmpl.txt", ["a drawing of a {c}.", "  ", "{c}"])
    ds = datasets.image_folder(str(folder), str(names), str(tmpl))
    assert ds.classnames == ["circle of blue", "cross of green", "square of red"]  # blank lines dropped
    assert ds.templates == ["a drawing of a {c}.", "{c}"]
    assert [y for _, y in ds.samples] == [0, 0, 1, 2, 2]


def test_imagefolder_classnames_count_mismatch(folder, tmp_path):
    names = _lines(tmp_path / "names.txt", ["one", "two"])
    with pytest.raises(RecoError) as e:
        datasets.image_folder(str(folder), str(names))
    msg = str(e.value)
    assert "2 class names" in msg and "3 class folders" in msg


def test_imagefolder_classnames_as_a_mapping_in_any_order(folder, tmp_path):
    tsv = _lines(tmp_path / "names.tsv", ["red_square\tsquare of red", "blue_circle\tcircle of blue",
                                          "green_cross\tcross of green"])
    assert datasets.image_folder(str(folder), str(tsv)).classnames == ["circle of blue", "cross of green",
                                                                        "square of red"]
    js = tmp_path / "names.json"
    js.write_text(json.dumps({"green_cross": "a green cross", "red_square": "a red square", "blue_circle": "a blue circle"}))
    assert datasets.image_folder(str(folder), str(js)).classnames == ["a blue circle", "a green cross", "a red square"]
    js.write_text(json.dumps({"green_cross": "x", "red_square": "y", "purple": "z"}))
    with pytest.raises(RecoError, match="no name for blue_circle; no folder purple"):
        datasets.image_folder(str(folder), str(js))
    bad = _lines(tmp_path / "bad.tsv", ["red_square\tsquare", "blue_circle"])
    with pytest.raises(RecoError, match="every line needs `folder<TAB>class name`"):
        datasets.image_folder(str(folder), str(bad))


def test_imagefolder_plain_list_of_the_folder_names_in_another_order_is_refused(folder, tmp_path):
    """Read in sorted folder order, it would name every image after another class, silently."""
    names = _lines(tmp_path / "names.txt", ["red square", "blue circle", "green cross"])
    with pytest.raises(RecoError) as e:
        datasets.image_folder(str(folder), str(names))
    msg = str(e.value)
    assert "in another order" in msg and "'red square' is line 1" in msg and "folder<TAB>class name" in msg
    ordered = _lines(tmp_path / "ordered.txt", ["Blue-Circle", "green cross", "RED SQUARE"])  # same order: fine
    assert datasets.image_folder(str(folder), str(ordered)).classnames == ["Blue-Circle", "green cross", "RED SQUARE"]


def test_imagefolder_missing_classnames_file(folder, tmp_path):
    with pytest.raises(RecoError, match="not found"):
        datasets.image_folder(str(folder), str(tmp_path / "nope.txt"))


def test_imagefolder_template_without_placeholder(folder, tmp_path):
    tmpl = _lines(tmp_path / "tmpl.txt", ["a photo of a {c}.", "a photo of something."])
    with pytest.raises(RecoError, match=r"\{c\}"):
        datasets.image_folder(str(folder), templates_file=str(tmpl))


def test_imagefolder_empty_templates_file(folder, tmp_path):
    tmpl = _lines(tmp_path / "tmpl.txt", ["", "   "])
    with pytest.raises(RecoError, match="template"):
        datasets.image_folder(str(folder), templates_file=str(tmpl))


def test_imagefolder_empty_class_folder(folder):
    (folder / "zz_empty").mkdir()
    (folder / "zz_empty" / "notes.txt").write_text("no images here")
    with pytest.raises(RecoError, match="zz_empty"):
        datasets.image_folder(str(folder))


def test_imagefolder_no_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    _img(tmp_path / "flat" / "a.png")
    with pytest.raises(RecoError, match="no class folders"):
        datasets.image_folder(str(tmp_path / "flat"))


def test_imagefolder_missing_folder(tmp_path):
    with pytest.raises(RecoError, match="not found"):
        datasets.image_folder(str(tmp_path / "missing"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RecoError, match="not found"):
        datasets.image_folder(str(tmp_path / "afile"))


# --------------------------------------------------------------------------------------------- CUB

@pytest.fixture
def cub_root(tmp_path):
    root = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images = [  # id, class index (1-based), file, is_training_image
        (1, 1, "Black_Footed_Albatross_0046_18.jpg", 1),
        (2, 1, "Black_Footed_Albatross_0009_34.jpg", 0),
        (3, 2, "Laysan_Albatross_0002_1027.jpg", 0),
        (4, 3, "Sooty_Albatross_0031_1066.jpg", 1),
        (5, 3, "Sooty_Albatross_0001_1071.jpg", 0),
        (10, 2, "Laysan_Albatross_0100_735.jpg", 1),  # ids sort numerically, not as text
    ]
    _lines(root / "classes.txt", [f"{i} {c}" for i, c in enumerate(classes, 1)])
    _lines(root / "images.txt", [f"{i} {classes[c - 1]}/{f}" for i, c, f, _ in images])
    _lines(root / "image_class_labels.txt", [f"{i} {c}" for i, c, _, _ in images])
    _lines(root / "train_test_split.txt", [f"{i} {t}" for i, _, _, t in images])
    for i, c, f, _ in images:
        _img(root / "images" / classes[c - 1] / f, i)
    return root


def test_cub_test_split(cub_root):
    ds = datasets.cub(str(cub_root))
    assert ds.name == "cub"
    assert ds.classnames == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    img = cub_root / "images"
    assert ds.samples == [
        (str(img / "001.Black_footed_Albatross" / "Black_Footed_Albatross_0009_34.jpg"), 0),
        (str(img / "002.Laysan_Albatross" / "Laysan_Albatross_0002_1027.jpg"), 1),
        (str(img / "003.Sooty_Albatross" / "Sooty_Albatross_0001_1071.jpg"), 2),
    ]
    assert all(Path(p).is_file() for p, _ in ds.samples)
    assert ds.templates == PROMPTS["templates"]["cub"]


def test_cub_train_split(cub_root):
    ds = datasets.cub(str(cub_root), split="train")
    assert [(Path(p).name, y) for p, y in ds.samples] == [
        ("Black_Footed_Albatross_0046_18.jpg", 0),
        ("Sooty_Albatross_0031_1066.jpg", 2),
        ("Laysan_Albatross_0100_735.jpg", 1),
    ]


def test_cub_missing_file(cub_root):
    (cub_root / "train_test_split.txt").unlink()
    with pytest.raises(RecoError, match="train_test_split.txt not found"):
        datasets.cub(str(cub_root))
    with pytest.raises(RecoError, match="not found"):
        datasets.cub(str(cub_root / "nope"))


# --------------------------------------------------------------------------------------------- Stanford Cars

CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]


def _struct_array(rows: list[dict]) -> np.ndarray:
    """A 1xN MATLAB struct array, as the devkit .mat files hold."""
    keys = list(rows[0])
    arr = np.zeros((1, len(rows)), dtype=[(k, object) for k in keys])
    for i, row in enumerate(rows):
        for k in keys:
            arr[0, i][k] = row[k]
    return arr


def _cell_column(strings: list[str]) -> np.ndarray:
    out = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        out[0, i] = s
    return out


@pytest.fixture
def cars_root(tmp_path):
    root = tmp_path / "cars"
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": _cell_column(CAR_CLASSES)})
    test = [("00001.jpg", 3), ("00002.jpg", 1), ("00003.jpg", 2)]
    sio.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": _struct_array([
        {"bbox_x1": np.uint8(1), "bbox_y1": np.uint8(1), "bbox_x2": np.uint8(15), "bbox_y2": np.uint8(15),
         "class": np.uint8(c), "fname": f} for f, c in test])})
    for i, (f, _) in enumerate(test):
        _img(base / "cars_test" / f, i)
    return root


def test_cars(cars_root):
    ds = datasets.cars(str(cars_root))
    assert ds.name == "cars"
    assert ds.classnames == CAR_CLASSES
    test_dir = cars_root / "stanford_cars" / "cars_test"
    assert ds.samples == [(str(test_dir / "00001.jpg"), 2), (str(test_dir / "00002.jpg"), 0),
                          (str(test_dir / "00003.jpg"), 1)]
    assert all(type(y) is int for _, y in ds.samples)
    assert ds.templates == PROMPTS["templates"]["cars"]


def test_cars_incomplete_layout(cars_root, tmp_path):
    (cars_root / "stanford_cars" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(RecoError, match="download is off"):
        datasets.cars(str(cars_root))
    with pytest.raises(RecoError, match="not found"):
        datasets.cars(str(tmp_path / "nope"))


# --------------------------------------------------------------------------------------------- Flowers102

@pytest.fixture
def flowers_root(tmp_path, monkeypatch):
    from torchvision.datasets import Flowers102

    root = tmp_path / "flowers"
    base = root / "flowers-102"
    labels = [1, 77, 102, 5, 77, 51]  # image_00001 .. image_00006, 1-based as in imagelabels.mat
    for i in range(1, len(labels) + 1):
        _img(base / "jpg" / f"image_{i:05d}.jpg", i)
    sio.savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    sio.savemat(base / "setid.mat", {"trnid": np.array([[1, 4]], dtype=np.uint16),
                                     "valid": np.array([[5]], dtype=np.uint16),
                                     "tstid": np.array([[6, 2, 3]], dtype=np.uint16)})
    # torchvision checks the real files' md5: accept this fixture's files instead
    md5 = {n: hashlib.md5((base / n).read_bytes()).hexdigest() for n in ("imagelabels.mat", "setid.mat")}
    file_dict = dict(Flowers102._file_dict)
    file_dict["label"] = ("imagelabels.mat", md5["imagelabels.mat"])
    file_dict["setid"] = ("setid.mat", md5["setid.mat"])
    monkeypatch.setattr(Flowers102, "_file_dict", file_dict)
    return root


def test_flowers(flowers_root):
    ds = datasets.flowers(str(flowers_root))
    names = PROMPTS["classnames"]["flowers"]
    assert len(names) == 102 and ds.classnames == names
    assert ds.classnames[0] == "pink primrose"
    jpg = flowers_root / "flowers-102" / "jpg"
    assert ds.samples == [(str(jpg / "image_00006.jpg"), 50), (str(jpg / "image_00002.jpg"), 76),
                          (str(jpg / "image_00003.jpg"), 101)]
    assert all(Path(p).is_file() for p, _ in ds.samples)
    assert ds.templates == PROMPTS["templates"]["flowers"]


def test_flowers_other_split(flowers_root):
    ds = datasets.flowers(str(flowers_root), split="train")
    assert [(Path(p).name, y) for p, y in ds.samples] == [("image_00001.jpg", 0), ("image_00004.jpg", 4)]


def test_flowers_bad_layout(flowers_root, tmp_path):
    (flowers_root / "flowers-102" / "setid.mat").unlink()
    with pytest.raises(RecoError, match="flowers"):
        datasets.flowers(str(flowers_root))
    with pytest.raises(RecoError, match="not found"):
        datasets.flowers(str(tmp_path / "nope"))


# --------------------------------------------------------------------------------------------- FGVC-Aircraft

@pytest.fixture
def aircraft_root(tmp_path):
    root = tmp_path / "aircraft"
    data = root / "fgvc-aircraft-2013b" / "data"
    _lines(data / "variants.txt", ["707-320", "A300B4", "Cessna 172", "F-16A/B"])
    _lines(data / "images_variant_test.txt", ["1025794 A300B4", "0056978 F-16A/B", "1514522 Cessna 172"])
    _lines(data / "images_variant_train.txt", ["0034309 707-320"])
    for i, name in enumerate(["1025794", "0056978", "1514522", "0034309"]):
        _img(data / "images" / f"{name}.jpg", i)
    return root


def test_aircraft(aircraft_root):
    ds = datasets.aircraft(str(aircraft_root))
    assert ds.name == "aircraft"
    assert ds.classnames == ["707-320", "A300B4", "Cessna 172", "F-16A/B"]
    images = aircraft_root / "fgvc-aircraft-2013b" / "data" / "images"
    assert ds.samples == [(str(images / "1025794.jpg"), 1), (str(images / "0056978.jpg"), 3),
                          (str(images / "1514522.jpg"), 2)]
    assert ds.templates == PROMPTS["templates"]["aircraft"]
    assert [y for _, y in datasets.aircraft(str(aircraft_root), split="train").samples] == [0]


def test_aircraft_missing_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecoError, match="download is off"):
        datasets.aircraft(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------- Stanford Dogs

@pytest.fixture
def dogs_root(tmp_path):
    root = tmp_path / "dogs"
    files = ["n02085620-Chihuahua/n02085620_2650.jpg", "n02085620-Chihuahua/n02085620_10074.jpg",
             "n02089078-black-and-tan_coonhound/n02089078_19.jpg", "n02096294-Australian_terrier/n02096294_1.jpg"]
    for i, f in enumerate(files):
        _img(root / "Images" / f, i)
    return root


DOG_NAMES = ["Chihuahua", "black-and-tan coonhound", "Australian terrier"]


def test_dogs_without_list(dogs_root):
    ds = datasets.dogs(str(dogs_root))
    assert ds.name == "dogs"
    assert ds.classnames == DOG_NAMES
    img = dogs_root / "Images"
    assert ds.samples == [
        (str(img / "n02085620-Chihuahua" / "n02085620_10074.jpg"), 0),
        (str(img / "n02085620-Chihuahua" / "n02085620_2650.jpg"), 0),
        (str(img / "n02089078-black-and-tan_coonhound" / "n02089078_19.jpg"), 1),
        (str(img / "n02096294-Australian_terrier" / "n02096294_1.jpg"), 2),
    ]
    assert ds.templates == PROMPTS["templates"]["dogs"]


def test_dogs_with_test_list(dogs_root):
    listed = ["n02096294-Australian_terrier/n02096294_1.jpg", "n02085620-Chihuahua/n02085620_2650.jpg"]
    file_list = np.empty((len(listed), 1), dtype=object)  # a cell column, as in the real test_list.mat
    for i, f in enumerate(listed):
        file_list[i, 0] = np.array([f])
    sio.savemat(dogs_root / "test_list.mat", {"file_list": file_list,
                                              "labels": np.array([[3], [1]], dtype=np.uint8)})
    ds = datasets.dogs(str(dogs_root))
    assert ds.classnames == DOG_NAMES
    img = dogs_root / "Images"
    assert ds.samples == [(str(img / listed[0]), 2), (str(img / listed[1]), 0)]
    assert all(Path(p).is_file() for p, _ in ds.samples)


def test_dogs_no_images_folder(tmp_path):
    (tmp_path / "dogs").mkdir()
    with pytest.raises(RecoError, match="Images"):
        datasets.dogs(str(tmp_path / "dogs"))


# --------------------------------------------------------------------------------------------- Places365

@pytest.fixture
def places_root(tmp_path):
    root = tmp_path / "places"
    _lines(root / "categories_places365.txt", ["/a/airfield 0", "/b/bakery/shop 1", "/a/apartment_building/outdoor 2",
                                               "/b/baseball_field 3"])
    _lines(root / "places365_val.txt", ["Places365_val_00000001.jpg 3", "Places365_val_00000002.jpg 1",
                                        "Places365_val_00000003.jpg 0"])
    for i in range(1, 4):
        _img(root / "val_256" / f"Places365_val_{i:08d}.jpg", i)
    return root


def test_places365(places_root):
    ds = datasets.places365(str(places_root))
    assert ds.name == "places365"
    assert ds.classnames == ["airfield", "bakery shop", "apartment building outdoor", "baseball field"]
    val = places_root / "val_256"
    assert ds.samples == [(str(val / "Places365_val_00000001.jpg"), 3), (str(val / "Places365_val_00000002.jpg"), 1),
                          (str(val / "Places365_val_00000003.jpg"), 0)]
    assert all(Path(p).is_file() for p, _ in ds.samples)
    assert ds.templates == PROMPTS["templates"]["places365"]


def test_places365_val_large(places_root):
    (places_root / "val_256").rename(places_root / "val_large")
    ds = datasets.places365(str(places_root))
    assert all(Path(p).parent == places_root / "val_large" and Path(p).is_file() for p, _ in ds.samples)


def test_places365_missing_listing(places_root):
    (places_root / "places365_val.txt").unlink()
    with pytest.raises(RecoError, match="places365_val.txt not found"):
        datasets.places365(str(places_root))


# --------------------------------------------------------------------------------------------- ImageNet

def test_imagenet(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    root = tmp_path / "val"
    png = synthetic.png_bytes(synthetic.render("red", "square", size=8))
    wnids = [f"n{i:08d}" for i in range(1000)]
    for w in wnids:
        (root / w).mkdir(parents=True)
        (root / w / f"ILSVRC2012_val_{w}.JPEG").write_bytes(png)
    ds = datasets.imagenet(str(root))
    assert ds.classnames == list(IMAGENET_CLASSNAMES)
    assert len(ds.classnames) == 1000 and ds.classnames[:2] == ["tench", "goldfish"]
    assert len(ds.samples) == 1000
    assert ds.samples[0] == (str(root / wnids[0] / f"ILSVRC2012_val_{wnids[0]}.JPEG"), 0)
    assert ds.samples[-1][1] == 999
    assert [y for _, y in ds.samples] == list(range(1000))
    assert ds.templates == PROMPTS["templates"]["imagenet"]

    import shutil

    shutil.rmtree(root / wnids[-1])
    with pytest.raises(RecoError, match="999 class folders"):
        datasets.imagenet(str(root))


# --------------------------------------------------------------------------------------------- Karpathy

def _karpathy(tmp_path: Path) -> Path:
    data = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test",
         "sentences": [{"raw": "A red square."}, {"raw": "A square, red."}]},
        {"filepath": "train2014", "filename": "b.jpg", "split": "train", "sentences": [{"raw": "A blue circle."}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "restval", "sentences": [{"raw": "Restval."}]},
        {"filepath": "val2014", "filename": "d.jpg", "split": "test",
         "sentences": [{"raw": "One"}, {"raw": "Two"}, {"raw": "Three"}]},
        {"filepath": "val2014", "filename": "e.jpg", "split": "val", "sentences": [{"raw": "Val."}]},
    ]}
    path = tmp_path / "coco" / "dataset_coco.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    for i, (fp, fn) in enumerate([("val2014", "a.jpg"), ("train2014", "b.jpg"), ("val2014", "d.jpg")]):
        _img(path.parent / fp / fn, i)
    return path


def test_karpathy_test_split(tmp_path):
    path = _karpathy(tmp_path)
    rs = karpathy(str(path))
    assert rs.name == "karpathy:dataset_coco"
    assert rs.images == [str(path.parent / "val2014" / "a.jpg"), str(path.parent / "val2014" / "d.jpg")]
    assert rs.captions == [["A red square.", "A square, red."], ["One", "Two", "Three"]]
    assert all(Path(p).is_file() for p in rs.images)


def test_karpathy_other_split_and_images_root(tmp_path):
    path = _karpathy(tmp_path)
    rs = karpathy(str(path), images_root=str(tmp_path / "elsewhere"), split="train")
    assert rs.images == [str(tmp_path / "elsewhere" / "train2014" / "b.jpg")]
    assert rs.captions == [["A blue circle."]]


def test_karpathy_without_filepath(tmp_path):
    # Flickr30k's Karpathy JSON has no 'filepath': images sit directly under the images root
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": "x"}]}]}))
    rs = karpathy(str(path), images_root=str(tmp_path / "flickr30k-images"))
    assert rs.images == [str(tmp_path / "flickr30k-images" / "1.jpg")]


def test_karpathy_errors(tmp_path):
    path = _karpathy(tmp_path)
    with pytest.raises(RecoError, match="no images in split 'nope'"):
        karpathy(str(path), split="nope")
    bad = tmp_path / "bad.json"
    bad.write_text("this is not json {")
    with pytest.raises(RecoError, match="not JSON"):
        karpathy(str(bad))
    with pytest.raises(RecoError, match="not found"):
        karpathy(str(tmp_path / "missing.json"))


def test_karpathy_content_hash(tmp_path):
    path = _karpathy(tmp_path)
    h = karpathy(str(path)).content_hash()
    assert h == karpathy(str(path)).content_hash()
    with open(path.parent / "val2014" / "a.jpg", "ab") as f:
        f.write(b"\0")
    assert karpathy(str(path)).content_hash() != h


# --------------------------------------------------------------------------------------------- load_classification

@pytest.mark.parametrize("spec", ["nope:/x", "cub", "cub:", "", "/just/a/path"])
def test_load_classification_bad_spec(spec):
    with pytest.raises(RecoError) as e:
        load_classification(spec)
    msg = str(e.value)
    assert "KIND:PATH" in msg
    for kind in ("imagefolder", "cub", "cars", "flowers", "aircraft", "dogs", "places365", "imagenet"):
        assert kind in msg


def test_load_classification_dispatch(folder, cub_root, places_root):
    ds = load_classification(f"imagefolder:{folder}")
    assert ds.classnames == ["blue circle", "green cross", "red square"] and len(ds.samples) == 5
    ds = load_classification(f"cub:{cub_root}")
    assert ds.name == "cub" and len(ds.samples) == 3
    ds = load_classification(f"places365:{places_root}")
    assert ds.name == "places365" and len(ds.samples) == 3


def test_load_classification_classnames_only_for_imagefolder(folder, cub_root, tmp_path):
    names = _lines(tmp_path / "names.tsv", ["blue_circle\ta", "green_cross\tb", "red_square\tc"])
    assert load_classification(f"imagefolder:{folder}", classnames=str(names)).classnames == ["a", "b", "c"]
    with pytest.raises(RecoError, match="--classnames applies to imagefolder"):
        load_classification(f"cub:{cub_root}", classnames=str(names))


def test_load_classification_templates_override(folder, cub_root, places_root, tmp_path):
    tmpl = _lines(tmp_path / "tmpl.txt", ["itap of a {c}.", "{c}"])
    for spec in (f"imagefolder:{folder}", f"cub:{cub_root}", f"places365:{places_root}"):
        assert load_classification(spec, templates=str(tmpl)).templates == ["itap of a {c}.", "{c}"]


def test_load_classification_templates_override_checked(cub_root, tmp_path):
    bad = _lines(tmp_path / "bad.txt", ["a photo of a {c}.", "a photo."])
    with pytest.raises(RecoError, match=r"\{c\}"):
        load_classification(f"cub:{cub_root}", templates=str(bad))
    with pytest.raises(RecoError, match="not found"):
        load_classification(f"cub:{cub_root}", templates=str(tmp_path / "missing.txt"))


def test_load_classification_empty_split(cub_root):
    split = cub_root / "train_test_split.txt"
    split.write_text(split.read_text().replace(" 0", " 1"))
    with pytest.raises(RecoError, match="no images"):
        load_classification(f"cub:{cub_root}")


def test_content_hash_tracks_bytes_and_labels(cub_root):
    h = load_classification(f"cub:{cub_root}").content_hash()
    assert load_classification(f"cub:{cub_root}").content_hash() == h  # deterministic
    # a file's bytes change size
    target = cub_root / "images" / "002.Laysan_Albatross" / "Laysan_Albatross_0002_1027.jpg"
    original = target.read_bytes()
    target.write_bytes(original + b"\0\0")
    h_size = load_classification(f"cub:{cub_root}").content_hash()
    assert h_size != h
    target.write_bytes(original)
    assert load_classification(f"cub:{cub_root}").content_hash() == h
    # a label changes (image 3 moves from class 2 to class 3)
    labels = cub_root / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("3 2\n", "3 3\n"))
    ds = load_classification(f"cub:{cub_root}")
    assert [y for _, y in ds.samples] == [0, 2, 2]
    assert ds.content_hash() not in (h, h_size)


def test_content_hash_tracks_names_templates_and_missing_files(folder, tmp_path):
    ds = load_classification(f"imagefolder:{folder}")
    h = ds.content_hash()
    names = _lines(tmp_path / "names.tsv", ["blue_circle\ta", "green_cross\tb", "red_square\tc"])
    assert load_classification(f"imagefolder:{folder}", classnames=str(names)).content_hash() != h
    tmpl = _lines(tmp_path / "tmpl.txt", ["{c}"])
    assert load_classification(f"imagefolder:{folder}", templates=str(tmpl)).content_hash() != h
    Path(ds.samples[0][0]).unlink()
    assert ds.content_hash() != h  # same sample list, file now missing


def test_builtin_prompts_have_placeholder():
    for kind in ("cars", "aircraft", "flowers", "imagenet", "places365", "cub", "dogs", "default", "imagefolder"):
        templates = datasets.templates_for(kind)
        assert templates and all("{c}" in t for t in templates), kind
    assert datasets.templates_for("imagefolder") == PROMPTS["templates"]["default"]
