"""OVEN (open-domain visual entity recognition): the `oven:` loader on the synthetic stand-in in OVEN's published
layout, OVEN's seen / unseen / harmonic-mean metric, and every bad layout answered with one line that says what to
fix."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from app import datasets, synthetic
from app.datasets import load_classification
from app.errors import RecoError
from app.metrics import group_accuracy


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """36 entities (4 beyond the 32 concepts), a quarter unseen, 5 distractors in the entity list."""
    return synthetic.write_oven(tmp_path_factory.mktemp("oven") / "OVEN", entities=36, per_entity=2,
                                unseen_fraction=0.25, distractors=5, seed=7)


@pytest.fixture
def small(tmp_path) -> Path:
    """A fresh stand-in a test may damage."""
    return synthetic.write_oven(tmp_path / "OVEN", entities=4, per_entity=1)


def test_the_stand_in_is_in_oven_layout(stand_in):
    lines = _jsonl(stand_in / "oven_entity_val.jsonl")
    kb = _jsonl(stand_in / "Wiki6M_ver_1_0_title_only.jsonl")
    assert len(lines) == 72 and [x["data_id"] for x in lines] == [f"oven_entity_val_{i:08d}" for i in range(72)]
    assert all(x["question"] == "what is this?" and x["image_id"].startswith("oven_") for x in lines)
    assert len({x["image_id"] for x in lines}) == 72
    by_entity = {x["entity_id"]: (x["entity_text"], x["data_split"]) for x in lines}
    assert len(by_entity) == 36
    assert sum(s == "val_unseen" for _, s in by_entity.values()) == 9  # the last quarter
    assert by_entity["Q1000000"] == ("red square", "val_seen")
    assert by_entity["Q1000035"] == ("yellow square 2", "val_unseen")  # concepts reused past 32, titled apart
    titles = {e["wikidata_id"]: e["wikipedia_title"] for e in kb}
    assert len(kb) == 41 and all(titles[q] == t for q, (t, _) in by_entity.items())
    assert sorted(t for q, t in titles.items() if q not in by_entity) == [f"distractor entity {k}" for k in range(5)]
    img = lines[0]["image_id"]
    with Image.open(stand_in / "oven_images" / img[5:7] / f"{img}.jpg") as im:
        assert (im.format, im.size) == ("JPEG", (64, 64))
    assert len({p.name for p in (stand_in / "oven_images").iterdir()}) > 1  # ids spread over the NN folders


@pytest.mark.parametrize("form", ["folder", "file"])
def test_the_stand_in_round_trips_through_the_loader(stand_in, form):
    spec = f"oven:{stand_in}" if form == "folder" else f"oven:{stand_in / 'oven_entity_val.jsonl'}"
    ds = load_classification(spec)
    lines = _jsonl(stand_in / "oven_entity_val.jsonl")
    qids = sorted({x["entity_id"] for x in lines})
    assert ds.name == "oven:oven_entity_val"
    assert ds.class_ids == ds.ids() == qids  # the split's entities only: no distractor
    titles = {x["entity_id"]: x["entity_text"] for x in lines}
    assert ds.classnames == [titles[q] for q in qids]
    assert ds.templates == ["a photo of {c}."]
    assert len(ds.samples) == len(ds.groups) == len(lines)
    for (path, label), group, x in zip(ds.samples, ds.groups, lines):  # file order kept
        assert ds.class_ids[label] == x["entity_id"]
        assert group == x["data_split"].split("_", 1)[1]
        assert Path(path) == stand_in / "oven_images" / x["image_id"][5:7] / f"{x['image_id']}.jpg"
        assert Path(path).is_file()
    assert ds.groups.count("unseen") == 18 and ds.groups.count("seen") == 54


def test_split_picks_a_file_in_the_folder(stand_in):
    assert datasets.oven(str(stand_in), split="val").samples == datasets.oven(str(stand_in)).samples
    assert datasets.oven(str(stand_in), split="entity_val").class_ids == datasets.oven(str(stand_in)).class_ids
    with pytest.raises(RecoError, match="oven_entity_test.jsonl not found"):
        datasets.oven(str(stand_in), split="test")


def test_other_image_suffixes_and_missing_images(small):
    lines = _jsonl(small / "oven_entity_val.jsonl")
    ids = [x["image_id"] for x in lines]
    jpg = [small / "oven_images" / i[5:7] / f"{i}.jpg" for i in ids]
    with Image.open(jpg[0]) as im:
        im.save(jpg[0].with_suffix(".png"))
    with Image.open(jpg[1]) as im:
        im.save(jpg[1].with_suffix(".webp"))
    for p in jpg[:3]:
        p.unlink()
    paths = [p for p, _ in load_classification(f"oven:{small}").samples]
    assert paths[:3] == [str(jpg[0].with_suffix(".png")), str(jpg[1].with_suffix(".webp")), str(jpg[2])]
    assert not Path(paths[2]).exists()  # a missing image is the evaluation's to skip, not a load error


def test_a_large_entity_list_keeps_only_the_split_titles(small):
    """The entity list is streamed: the split's ids are found among many others (a regex skips those, a JSON
    parser reads the rest), the first title wins."""
    kb = small / "Wiki6M_ver_1_0_title_only.jsonl"
    wanted = kb.read_text().replace('"Q1000001"', '"\\u00511000001"')  # an escaped id is still read
    assert "\\u0051" in wanted
    noise = "".join(json.dumps({"wikidata_id": f"Q{k}", "wikipedia_title": f"t{k}"}) + "\n" for k in range(20_000))
    kb.write_text(noise + "\n" + wanted + json.dumps({"wikidata_id": "Q1000000", "wikipedia_title": "later"}) + "\n")
    ds = load_classification(f"oven:{small}")
    assert ds.classnames == ["red square", "green square", "blue square", "yellow square"]


def test_the_full_entity_list_is_read_when_the_title_only_one_is_absent(small):
    kb = small / "Wiki6M_ver_1_0_title_only.jsonl"
    rows = [{**e, "wikipedia_content": "text"} for e in _jsonl(kb)]
    (small / "Wiki6M_ver_1_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kb.unlink()
    assert load_classification(f"oven:{small}").classnames[0] == "red square"


def _old_hash(ds) -> str:
    """ClassificationSet.content_hash before class ids and groups existed."""
    h = hashlib.sha256(json.dumps([ds.classnames, ds.templates]).encode())
    for path, label in ds.samples:
        p = Path(path)
        h.update(f"{p.parent.name}/{p.name}\0{p.stat().st_size if p.exists() else -1}\0{label}\n".encode())
    return h.hexdigest()


def test_content_hash_covers_ids_and_groups_and_keeps_old_hashes(small, tmp_path):
    ds = load_classification(f"oven:{small}")
    h = ds.content_hash()
    assert h != _old_hash(ds)
    ds.groups[0] = "unseen" if ds.groups[0] == "seen" else "seen"
    assert ds.content_hash() != h
    ds = load_classification(f"oven:{small}")
    ds.class_ids[0] = "Q1"
    assert ds.content_hash() != h
    folder = synthetic.write_imagefolder(tmp_path / "f", per_class=1) / "images"
    plain = load_classification(f"imagefolder:{folder}")
    assert plain.class_ids is None and plain.groups is None and plain.content_hash() == _old_hash(plain)


# --------------------------------------------------------------------------------------------- bad layouts

def _edit_line(root: Path, n: int, change) -> None:
    path = root / "oven_entity_val.jsonl"
    lines = path.read_text().splitlines()
    lines[n - 1] = change(lines[n - 1])
    path.write_text("\n".join(lines) + "\n")


def _drop(key):
    return lambda ln: json.dumps({k: v for k, v in json.loads(ln).items() if k != key})


def _set(key, value):
    return lambda ln: json.dumps({**json.loads(ln), key: value})


BAD = {
    "folder missing": (lambda r: shutil.rmtree(r), "", ["OVEN folder", "not found"]),
    "split file missing": (lambda r: (r / "oven_entity_val.jsonl").unlink(), "",
                           ["oven_entity_val.jsonl not found", "give a split file itself"]),
    "split file given is missing": (lambda r: None, "/oven_entity_test.jsonl",
                                    ["oven_entity_test.jsonl not found", "check the file name"]),
    "no entity list": (lambda r: (r / "Wiki6M_ver_1_0_title_only.jsonl").unlink(), "",
                       ["no OVEN entity list", "Wiki6M_ver_1_0_title_only.jsonl", "Wiki6M_ver_1_0.jsonl"]),
    "line not JSON": (lambda r: _edit_line(r, 3, lambda ln: ln[:-1]), "",
                      ["oven_entity_val.jsonl line 3 is not JSON", "one JSON object per line"]),
    "line not UTF-8": (lambda r: (r / "oven_entity_val.jsonl").write_bytes(b'{"image_id": "\xff"}\n'), "",
                       ["oven_entity_val.jsonl is not UTF-8 text (line 1, byte 14)", "iconv -f latin1"]),
    "line not an object": (lambda r: _edit_line(r, 2, lambda ln: "[1, 2]"), "", ["line 2 is not a JSON object"]),
    "no image_id": (lambda r: _edit_line(r, 2, _drop("image_id")), "", ["line 2 has no 'image_id'"]),
    "no entity_id": (lambda r: _edit_line(r, 4, _drop("entity_id")), "", ["line 4 has no 'entity_id'"]),
    "no data_split": (lambda r: _edit_line(r, 1, _drop("data_split")), "", ["line 1 has no 'data_split'"]),
    "null entity_id": (lambda r: _edit_line(r, 1, _set("entity_id", None)), "", ["line 1 has no 'entity_id'"]),
    "image_id a path": (lambda r: _edit_line(r, 2, _set("image_id", "../../secret")), "",
                        ["line 2 has image_id '../../secret', not a file name"]),
    "unknown data_split": (lambda r: _edit_line(r, 2, _set("data_split", "train")), "",
                           ["line 2 has data_split 'train'", "val_seen", "_unseen"]),
    "entity not in the list": (lambda r: _edit_line(r, 3, _set("entity_id", "Q42")), "",
                               ["line 3: entity Q42 is not in", "Wiki6M_ver_1_0_title_only.jsonl",
                                "1 of the split's 4 entities"]),
    "entity list line not JSON": (lambda r: (r / "Wiki6M_ver_1_0_title_only.jsonl").write_text("{\n"), "",
                                  ["Wiki6M_ver_1_0_title_only.jsonl line 1 is not JSON"]),
    "empty split": (lambda r: (r / "oven_entity_val.jsonl").write_text("\n\n"), "", ["has no lines"]),
    "no oven_images": (lambda r: shutil.rmtree(r / "oven_images"), "", ["no oven_images folder",
                                                                        "oven_images/<NN>/<image_id>.jpg"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_layout_says_what_is_wrong(small, case):
    damage, tail, needles = BAD[case]
    damage(small)
    with pytest.raises(RecoError) as e:
        load_classification(f"oven:{small}{tail}")
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize("case", ["folder missing", "no entity list"])
def test_the_cli_reports_a_bad_layout_as_one_error_line(reco_env, small, case):
    """The dataset is read before the model is looked up, so the layout error is the one reported."""
    from app.cli import cli

    BAD[case][0](small)
    r = CliRunner().invoke(cli, ["eval", "classification", "--model", "x", "--dataset", f"oven:{small}"],
                           prog_name="reco")
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1 and "Traceback" not in r.output, r.output
    assert BAD[case][2][0] in errors[0], errors[0]


def test_the_synthetic_cli_writes_the_stand_in(tmp_path, capsys):
    synthetic.main(["oven", str(tmp_path / "o"), "--entities", "3", "--per-entity", "2", "--distractors", "1"])
    assert "3 entities x 2 images" in capsys.readouterr().out
    ds = load_classification(f"oven:{tmp_path / 'o'}")
    assert len(ds.classnames) == 3 and len(ds.samples) == 6
    assert len(_jsonl(tmp_path / "o" / "Wiki6M_ver_1_0_title_only.jsonl")) == 4


# --------------------------------------------------------------------------------------------- the metric

def test_group_accuracy_by_hand():
    pred = ["Q1", "Q2", "Q3", "Q9", "Q5", "Q9", "Q9", "Q9"]
    true = ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6", "Q7", "Q8"]
    groups = ["seen"] * 4 + ["unseen"] * 4
    m = group_accuracy(pred, true, groups)
    assert m["seen"] == 0.75 and m["unseen"] == 0.25  # 3 of 4; 1 of 4
    assert m["harmonic_mean"] == pytest.approx(0.375)  # 2 / (4/3 + 4), not the mean 0.5
    assert set(m) == {"seen", "unseen", "harmonic_mean"}
    assert group_accuracy([0, 1, 2], [0, 1, 1], ["seen"] * 3) == {"seen": pytest.approx(2 / 3)}  # no HM: one side
    assert group_accuracy([0, 1], [0, 0], ["a", "b"]) == {"a": 1.0, "b": 0.0}  # any group names
    zero = group_accuracy([0, 1], [0, 0], ["seen", "unseen"])
    assert zero["unseen"] == 0.0 and 0 < zero["harmonic_mean"] < 1e-11  # OVEN's 1e-12 for a zero
    assert group_accuracy([], [], []) == {}
    with pytest.raises(ValueError):
        group_accuracy([0], [0, 1], ["seen", "seen"])


def _oven_eval(ref: list[dict], pred: list[dict], rounding: bool = True) -> dict:
    """OVEN's evaluate_oven and harmonic_mean (edchengg/oven_eval, oven_eval.py), re-stated: percent per data
    split by its _seen / _unseen name, then 2 / (1/seen + 1/unseen) with a zero taken as 1e-12."""
    by_id = {r["data_id"]: r for r in ref}
    split2res = defaultdict(list)
    for p in pred:
        r = by_id[p["data_id"]]
        split2res[r["data_split"]].append(int(r["entity_id"] == p["pred_entity_id"]))
    out = {}
    for split, res in split2res.items():
        acc = sum(res) / len(res) * 100
        acc = round(acc, 2) if rounding else acc
        out["seen" if "_seen" in split else "unseen"] = acc
    safe = [a if a != 0 else 1e-12 for a in (out["seen"], out["unseen"])]
    out["hm"] = len(safe) / sum(1.0 / a for a in safe)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_group_accuracy_matches_ovens_formula_on_random_data(seed):
    rng = random.Random(seed)
    n = rng.randint(50, 300)
    ref, pred = [], []
    for i in range(n):
        split = rng.choice(["val_seen", "val_unseen"])
        true = f"Q{rng.randint(1, 20)}"
        right = rng.random() < (0.7 if split == "val_seen" else 0.2)
        ref.append({"data_id": f"oven_entity_val_{i:08d}", "entity_id": true, "data_split": split})
        pred.append({"data_id": f"oven_entity_val_{i:08d}", "pred_entity_id": true if right else f"Q{100 + i}"})
    groups = [datasets._oven_group(r["data_split"], Path("x"), 0) for r in ref]
    m = group_accuracy([p["pred_entity_id"] for p in pred], [r["entity_id"] for r in ref], groups)
    exact, official = _oven_eval(ref, pred, rounding=False), _oven_eval(ref, pred)
    assert m["seen"] * 100 == pytest.approx(exact["seen"]) and m["unseen"] * 100 == pytest.approx(exact["unseen"])
    assert round(m["seen"] * 100, 2) == official["seen"] and round(m["unseen"] * 100, 2) == official["unseen"]
    assert m["harmonic_mean"] * 100 == pytest.approx(exact["hm"])
    assert abs(m["harmonic_mean"] * 100 - official["hm"]) < 0.01  # OVEN rounds before the mean
    assert m["seen"] != m["unseen"] and m["harmonic_mean"] < (m["seen"] + m["unseen"]) / 2
