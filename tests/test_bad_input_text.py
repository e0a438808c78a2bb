"""Foreign text files (issue 28): every text file is UTF-8, with or without a BOM, or it stops with one `Error:`
line naming the file, the line and the conversion; a caption or class name past its limit is counted or refused
before anything is stored; a plain class list is read only where the folders say which class is which."""

import csv
import io
import json
import time

import pytest

from app import datasets, synthetic
from app.corpus.base import MAX_CAPTION_CHARS
from app.datasets import MAX_CLASS_NAME_CHARS
from app.errors import RecoError
from tests.cli_checks import one_error_line, versions

BOM = b"\xef\xbb\xbf"


def _class_sets(cli_run) -> list:
    return [v for m in json.loads(cli_run("classes", "list", "--json").output) for v in m["versions"]]


def _manifest(tmp_path, kind, captions: dict[int, str], encoding="utf-8", bom=False):
    """synthetic's 6-row manifest of `kind`, with row i's caption replaced by captions[i], written in `encoding`."""
    path = synthetic.write_manifest(tmp_path / kind, n=6, kind=kind)
    if kind == "jsonl":
        rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    else:
        rows = list(csv.DictReader(io.StringIO(path.read_text()), delimiter="\t" if kind == "tsv" else ","))
    for i, cap in captions.items():
        rows[i]["caption"] = cap
    if kind == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter="\t" if kind == "tsv" else ",", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        text = out.getvalue()
    path.write_bytes((BOM if bom else b"") + text.encode(encoding))
    return path


# ------------------------------------------------------------------------------------------ 1. encodings

@pytest.mark.parametrize("kind, line", [("csv", 4), ("tsv", 4), ("jsonl", 3)])  # row 2: after a header or not
def test_a_latin1_manifest_names_its_line_and_the_conversion(cli_run, tmp_path, tiny_config, kind, line):
    m = _manifest(tmp_path, kind, {2: "un café crème"}, encoding="latin-1")
    r = cli_run("memory", "build", "l1", m, "--backbone", tiny_config, ok=False)
    one_error_line(r, f"{m} is not UTF-8 text (line {line},", f"iconv -f latin1 -t utf-8 {m} >",
                    f"manifest.utf8.{kind}")  # the copy keeps the suffix that names the format
    assert versions(cli_run) == []


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_manifest_with_a_bom_stores_exactly(cli_run, tmp_path, tiny_config, kind):
    m = _manifest(tmp_path, kind, {0: "un café crème"}, bom=True)
    r = cli_run("memory", "build", "bom", m, "--backbone", tiny_config, "--activate")
    assert "6 items stored, 0 skipped" in r.output
    hits = json.loads(cli_run("memory", "query", "bom", "--text", "café", "-k", "6", "--json").output)
    assert "un café crème" in {h["caption"] for h in hits}


def test_a_latin1_class_names_file_names_its_line(cli_run, tmp_path, tiny_config):
    names = tmp_path / "names.txt"
    names.write_bytes("red circle\nblue square\ncrème brûlée\n".encode("latin-1"))
    r = cli_run("classes", "build", "c", "--names", names, "--backbone", tiny_config, ok=False)
    one_error_line(r, f"{names} is not UTF-8 text (line 3,", "iconv -f latin1 -t utf-8", "names.utf8.txt")
    assert _class_sets(cli_run) == []


def test_a_utf16_file_is_told_to_convert_from_utf16(cli_run, tmp_path, tiny_config):
    names = tmp_path / "names.txt"
    names.write_bytes("red circle\nblue square\n".encode("utf-16"))  # what Windows Notepad calls "Unicode"
    r = cli_run("classes", "build", "c", "--names", names, "--backbone", tiny_config, ok=False)
    one_error_line(r, "is not UTF-8 text (line 1,", "iconv -f utf-16 -t utf-8")


def test_a_latin1_templates_file_is_refused_before_a_set_exists(cli_run, tmp_path, tiny_config):
    names = tmp_path / "names.txt"
    names.write_text("red circle\nblue square\n")
    tpl = tmp_path / "tpl.txt"
    tpl.write_bytes("a photo of a {c}.\nune photo d'un {c}, très nette.\n".encode("latin-1"))
    r = cli_run("classes", "build", "c", "--names", names, "--backbone", tiny_config, "--templates", tpl, ok=False)
    one_error_line(r, f"{tpl} is not UTF-8 text (line 2,", "iconv -f latin1")
    assert _class_sets(cli_run) == []


def test_a_latin1_classnames_file_of_an_image_folder(cli_run, tmp_path):
    root = synthetic.write_imagefolder(tmp_path / "f", per_class=1)
    names = tmp_path / "names.txt"
    names.write_bytes((root / "classnames.txt").read_text().replace("red square", "carré rouge").encode("latin-1"))
    r = cli_run("eval", "classification", "--model", "nope", "--dataset", f"imagefolder:{root / 'images'}",
                "--classnames", names, ok=False)
    one_error_line(r, f"{names} is not UTF-8 text (line 1,", "iconv -f latin1")
    tpl = tmp_path / "tpl.txt"
    tpl.write_bytes("une photo d'un {c}, très nette.\n".encode("latin-1"))
    r = cli_run("eval", "classification", "--model", "nope", "--dataset", f"imagefolder:{root / 'images'}",
                "--templates", tpl, ok=False)
    one_error_line(r, f"{tpl} is not UTF-8 text (line 1,", "iconv -f latin1")


def test_bom_files_read_as_their_text(tmp_path):
    root = synthetic.write_imagefolder(tmp_path / "f", per_class=1)
    names = tmp_path / "names.txt"
    names.write_bytes(BOM + (root / "classnames.txt").read_bytes())
    tpl = tmp_path / "tpl.txt"
    tpl.write_bytes(BOM + b"a photo of a {c}.\n")
    ds = datasets.image_folder(str(root / "images"), str(names), str(tpl))
    assert ds.classnames[0] == "red square" and ds.templates == ["a photo of a {c}."]
    mapping = tmp_path / "names.json"
    folders = sorted(p.name for p in (root / "images").iterdir())
    mapping.write_bytes(BOM + json.dumps(dict(zip(folders, ds.classnames))).encode())
    assert datasets.image_folder(str(root / "images"), str(mapping)).classnames == ds.classnames


# ------------------------------------------------------------------------------------------ 2. long captions

@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_200k_character_caption_is_skipped_and_counted_and_the_limit_itself_stored(cli_run, tmp_path,
                                                                                    tiny_config, kind):
    at_limit = ("a red circle " * MAX_CAPTION_CHARS)[:MAX_CAPTION_CHARS - 1] + "."
    m = _manifest(tmp_path, kind, {1: "x" * 200_000, 3: at_limit})
    r = cli_run("memory", "build", "long", m, "--backbone", tiny_config, "--activate")
    assert "5 items stored, 1 skipped (caption_too_long=1)" in r.output, r.output
    hits = json.loads(cli_run("memory", "query", "long", "--text", "a red circle", "-k", "5", "--json").output)
    assert at_limit in {h["caption"] for h in hits}  # stored exactly, not cut
    assert json.loads(cli_run("memory", "verify", "long", "--json").output)["ok"]


# ------------------------------------------------------------------------------------------ 3, 4. class names

def test_a_jsonl_class_names_file_with_a_bom_is_read_as_jsonl(cli_run, tmp_path, tiny_config, rt):
    from app.classes import ClassIndex, read_names

    names = tmp_path / "names.jsonl"
    rows = [{"id": f"Q{i}", "name": n} for i, n in enumerate(["red circle", "blue square", "green cross"], 1)]
    names.write_bytes(BOM + "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert read_names(names) == (["Q1", "Q2", "Q3"], ["red circle", "blue square", "green cross"])
    r = cli_run("classes", "build", "c", "--names", names, "--backbone", tiny_config, "--activate")
    assert "c v1 ready (active): 3 classes" in r.output
    with ClassIndex.open(rt, "c") as index:
        assert index.names(["Q1", "Q2", "Q3"]) == {"Q1": "red circle", "Q2": "blue square", "Q3": "green cross"}
    plain = tmp_path / "plain.txt"
    plain.write_bytes(BOM + b"red circle\nblue square\n")
    assert read_names(plain) == (["red circle", "blue square"], ["red circle", "blue square"])


def test_a_names_file_of_one_10mb_line_is_refused_at_once(cli_run, tmp_path, tiny_config):
    names = tmp_path / "names.txt"
    names.write_bytes(b"word " * 2_000_000)  # 10 MB, no line end: a file read wrongly
    t0 = time.monotonic()
    r = cli_run("classes", "build", "c", "--names", names, "--backbone", tiny_config, ok=False)
    one_error_line(r, f"{names} line 1 holds a class name of 9,999,999 characters",
                    f"at most {MAX_CLASS_NAME_CHARS:,}", "one class name per line")
    assert time.monotonic() - t0 < 30
    assert _class_sets(cli_run) == []


def test_a_class_name_over_the_limit_in_jsonl_or_an_image_folder_list(cli_run, tmp_path, tiny_config):
    long = "a" * (MAX_CLASS_NAME_CHARS + 1)
    names = tmp_path / "names.jsonl"
    names.write_text(json.dumps({"id": "Q1", "name": "red circle"}) + "\n" + json.dumps({"id": "Q2", "name": long}))
    r = cli_run("classes", "build", "c", "--names", names, "--backbone", tiny_config, ok=False)
    one_error_line(r, f"{names} line 2 holds a class name of {MAX_CLASS_NAME_CHARS + 1:,} characters")
    assert _class_sets(cli_run) == []
    ok = tmp_path / "ok.txt"
    ok.write_text("b" * MAX_CLASS_NAME_CHARS + "\n")  # the limit itself is a name
    assert cli_run("classes", "build", "c", "--names", ok, "--backbone", tiny_config).exit_code == 0
    root = synthetic.write_imagefolder(tmp_path / "f", per_class=1)
    listed = tmp_path / "listed.txt"
    listed.write_text((root / "classnames.txt").read_text().replace("red square", long, 1))
    r = cli_run("eval", "classification", "--model", "nope", "--dataset", f"imagefolder:{root / 'images'}",
                "--classnames", listed, ok=False)
    one_error_line(r, f"{listed} line 1 holds a class name of")


# ------------------------------------------------------------------------------------------ 5. image folders

def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic.render("blue", "square", seed=len(str(path))).save(path)


@pytest.fixture
def wnid_folder(tmp_path):
    """Folders named unlike their classes (ImageNet-style ids), in an order unlike the classes' order."""
    root = tmp_path / "wnids"
    for wnid in ("n0300", "n0100", "n0200"):
        _image(root / wnid / "a.png")
    return root


def test_a_plain_list_for_folders_named_unlike_the_classes_asks_for_a_mapping(cli_run, tmp_path, wnid_folder):
    names = tmp_path / "names.txt"
    names.write_text("tench\ngoldfish\nshark\n")  # the user's order, which is not the folders' sorted order
    r = cli_run("eval", "classification", "--model", "nope", "--dataset", f"imagefolder:{wnid_folder}",
                "--classnames", names, ok=False)
    one_error_line(r, "is a plain list", "not named like its classes", "folder 'n0100'", "'tench'",
                    "`folder<TAB>class name`")
    tsv = tmp_path / "names.tsv"
    tsv.write_text("n0300\ttench\nn0100\tgoldfish\nn0200\tshark\n")
    assert datasets.image_folder(str(wnid_folder), str(tsv)).classnames == ["goldfish", "shark", "tench"]


def test_a_plain_list_is_read_for_matching_or_numbered_folders(tmp_path, wnid_folder):
    numbered = tmp_path / "numbered"
    for n in range(12):  # 0..11 unpadded: string order puts 10 and 11 before 2
        _image(numbered / str(n) / "a.png")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"class {n}\n" for n in range(12)))
    ds = datasets.image_folder(str(numbered), str(names))
    by_folder = {p.split("/")[-2]: ds.classnames[y] for p, y in ds.samples}
    assert by_folder == {str(n): f"class {n}" for n in range(12)}
    one_based = tmp_path / "one_based"
    for n in range(1, 4):
        _image(one_based / f"{n:03d}" / "a.png")
    names.write_text("first\nsecond\nthird\n")
    assert datasets.image_folder(str(one_based), str(names)).classnames == ["first", "second", "third"]
    root = synthetic.write_imagefolder(tmp_path / "f", per_class=1)  # 00_red_circle ... and 'red circle' ...
    assert datasets.image_folder(str(root / "images"), str(root / "classnames.txt")).classnames[:2] == [
        "red square", "green square"]
    gap = tmp_path / "gap"
    for n in (0, 1, 3):  # not 0..n-1: no rule says which line is which folder
        _image(gap / str(n) / "a.png")
    with pytest.raises(RecoError, match="folder<TAB>class name"):
        datasets.image_folder(str(gap), str(names))


@pytest.mark.parametrize("args", [("memory", "build", "x", "{m}", "--backbone", "{cfg}"),
                                  ("classes", "build", "x", "--names", "{names}", "--backbone", "{cfg}"),
                                  ("classes", "build", "x", "--names", "{long}", "--backbone", "{cfg}"),
                                  ("eval", "classification", "--model", "m", "--dataset", "imagefolder:{folder}",
                                   "--classnames", "{names}"),
                                  ("eval", "classification", "--model", "m", "--dataset", "imagefolder:{folder}",
                                   "--classnames", "{unordered}"),
                                  ("eval", "classification", "--model", "m", "--dataset", "oven:{tmp}"),
                                  ("eval", "retrieval", "--model", "m", "--dataset", "karpathy:{tmp}/none.json")],
                         ids=["manifest", "names", "long name", "eval class names", "eval unordered list",
                              "eval OVEN layout", "eval karpathy"])
def test_text_file_errors_come_before_torch_is_imported(tmp_path, tiny_config, args):
    import os
    import subprocess
    import sys

    (tmp_path / "m.csv").write_bytes("image,caption\na.png,café\n".encode("latin-1"))
    (tmp_path / "names.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "long.txt").write_bytes(b"x" * (MAX_CLASS_NAME_CHARS + 1))
    for folder in ("n01", "n02"):  # folder names unlike the class names: a plain list cannot say which is which
        _image(tmp_path / "folder" / folder / "a.png")
    (tmp_path / "unordered.txt").write_text("goldfish\ntench\n")
    args = [a.format(m=tmp_path / "m.csv", names=tmp_path / "names.txt", long=tmp_path / "long.txt",
                     cfg=tiny_config, folder=tmp_path / "folder", unordered=tmp_path / "unordered.txt",
                     tmp=tmp_path) for a in args]
    env = {**os.environ, "RECO_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "app", *args], env=env, capture_output=True,
                       text=True, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "app.cli" in imported and not imported & {"torch", "open_clip", "torchvision"}, errors
