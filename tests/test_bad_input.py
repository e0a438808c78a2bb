"""Bad input tried as a new user would: every failure is one `Error:` line and exit 1, checked before expensive
work; no item is lost or misfiled without a word; duplicate keys follow one rule inside and across shards."""

import gzip
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner

from app import synthetic
from app.cli import cli
from tests.cli_checks import build, one_error_line, versions


@pytest.mark.parametrize("size", ["0", "-5"])
def test_shard_size_must_be_positive(cli_run, tmp_path, tiny_config, size):
    m = synthetic.write_manifest(tmp_path / "m", n=4)
    r = build(cli_run, "m", m, tiny_config, "--format", "manifest", "--shard-size", size, ok=False)
    one_error_line(r, "--shard-size must be a whole number of rows above 0")
    assert versions(cli_run) == []


def test_a_json_array_manifest_is_refused_with_how_to_convert_it(cli_run, tmp_path, tiny_config):
    for name, text in (("flat.json", json.dumps([{"image": "a.png", "caption": "x"}])),
                       ("pretty.json", json.dumps([{"image": "a.png", "caption": "x"}], indent=1))):
        (tmp_path / name).write_text(text)
        r = build(cli_run, "j", tmp_path / name, tiny_config, ok=False)
        one_error_line(r, "object per line", "jq -c")


def test_manifest_format_given_a_directory(cli_run, tmp_path, tiny_config, wds_corpus):
    r = build(cli_run, "d", wds_corpus, tiny_config, "--format", "manifest", ok=False)
    one_error_line(r, "is a directory", "give the manifest file itself")


def test_wds_format_given_a_manifest_leaves_no_version(cli_run, tmp_path, tiny_config):
    m = synthetic.write_manifest(tmp_path / "m", n=4)
    r = build(cli_run, "w", m, tiny_config, "--format", "wds", ok=False)
    one_error_line(r, "is not a tar shard", "--format manifest")
    assert versions(cli_run) == []


def test_a_backbone_that_cannot_load_leaves_no_version(cli_run, tmp_path, wds_corpus):
    bad = tmp_path / "bad.json"  # the keys are there, the tower is not buildable
    bad.write_text(json.dumps({"embed_dim": 64, "vision_cfg": {"layers": "many"}, "text_cfg": {}}))
    for _ in range(2):
        r = cli_run("memory", "build", "b", wds_corpus, "--backbone", bad, ok=False)
        assert r.exit_code == 1 and "Traceback" not in r.output
    assert versions(cli_run) == []


@pytest.fixture
def built(cli_run, tmp_path, tiny_config):
    src = tmp_path / "wds"
    paths = synthetic.write_wds(src, n_shards=1, per_shard=6)
    with tarfile.open(paths[0], "a") as tar:  # one caption over three lines, with a tab
        data = "a red\ncircle\n\tdrawn twice".encode()
        info = tarfile.TarInfo("zz000001.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        png = synthetic.png_bytes(synthetic.render("red", "circle"))
        info = tarfile.TarInfo("zz000001.png")
        info.size = len(png)
        tar.addfile(info, io.BytesIO(png))
    build(cli_run, "q", src, tiny_config, "--activate")
    return "q"


@pytest.mark.parametrize("k", ["-1", "0"])
def test_query_k_is_checked_first(cli_run, built, k):
    r = cli_run("memory", "query", built, "--text", "a red circle", "-k", k, ok=False)
    one_error_line(r, "-k must be a whole number of neighbours above 0")


def test_query_images_that_cannot_be_read(cli_run, built, tmp_path):
    good = synthetic.png_bytes(synthetic.render("red", "circle"), fmt="JPEG")
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.png").write_text("not an image")
    for f in ("cut.jpg", "notes.png"):
        r = cli_run("memory", "query", built, "--image", tmp_path / f, ok=False)
        one_error_line(r, "cannot read query image", f)


def test_multi_line_captions_keep_the_query_table_one_row_per_hit(cli_run, built):
    r = cli_run("memory", "query", built, "--text", "a red circle", "-k", "7")
    lines = r.output.splitlines()
    assert len(lines) == 1 + 7 and any("a red circle drawn twice" in ln for ln in lines), r.output
    hits = json.loads(cli_run("memory", "query", built, "--text", "a red circle", "-k", "7", "--json").output)
    assert any(h["caption"] == "a red\ncircle\n\tdrawn twice" for h in hits)  # --json keeps the caption as is


@pytest.mark.parametrize("damage", ["garbage", "overwritten"])
def test_a_damaged_metadata_db_names_the_file_and_the_way_out(cli_run, reco_env, damage):
    cli_run("memory", "list")  # creates the database
    db = reco_env / "reco.db"
    if damage == "garbage":
        db.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        with open(db, "r+b") as f:
            f.seek(4096)
            f.write(b"\xff" * 8192)
    for args in (("memory", "list"), ("status",), ("model", "list")):
        r = cli_run(*args, ok=False)
        one_error_line(r, f"the metadata database {db} is damaged", "restore it from a backup", "mv ")


def _gz(src, dst):
    with open(src, "rb") as f, gzip.open(dst, "wb") as g:
        shutil.copyfileobj(f, g)


def test_a_directory_source_reads_every_tar_form(cli_run, tmp_path, tiny_config):
    a = synthetic.write_wds(tmp_path / "a", n_shards=1, per_shard=6, seed=1)[0]
    b = synthetic.write_wds(tmp_path / "b", n_shards=1, per_shard=5, seed=2)[0]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(a, mixed / "00000.tar")
    _gz(b, mixed / "00002.tar.gz")
    (mixed / "00000_stats.json").write_text("{}")  # img2dataset's sidecars are not shards
    (mixed / "00000.parquet").write_bytes(b"PAR1")
    r = build(cli_run, "mixed", mixed, tiny_config)
    assert "11 items stored, 0 skipped" in r.output
    only = tmp_path / "only"
    only.mkdir()
    _gz(b, only / "00000.tgz")
    assert "5 items stored" in build(cli_run, "only", only, tiny_config).output


def test_a_directory_with_an_archive_it_cannot_read_stops(cli_run, tmp_path, tiny_config, wds_corpus):
    shutil.make_archive(str(wds_corpus / "extra"), "zip", wds_corpus)
    r = build(cli_run, "z", wds_corpus, tiny_config, ok=False)
    one_error_line(r, "cannot read as shards", "extra.zip")
    assert versions(cli_run) == []


def test_every_embeddings_part_needs_captions(cli_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = synthetic.write_embeddings(tmp_path / "e", parts=2, per_part=4, dim=64)
    meta = root / "metadata" / "metadata_1.parquet"
    t = pq.read_table(meta)
    pq.write_table(t.rename_columns(["text" if c == "caption" else c for c in t.column_names]), meta)
    cfg = synthetic.write_tiny_config(tmp_path / "tiny.json")
    r = cli_run("memory", "build", "e", root, "--backbone", cfg, ok=False)
    one_error_line(r, "metadata_1.parquet has no 'caption' column", "text")
    pq.write_table(pa.table({"caption": ["a", "b"]}), meta)  # 2 rows for 4 vectors
    r = cli_run("memory", "build", "e", root, "--backbone", cfg, ok=False)
    one_error_line(r, "metadata_1.parquet has 2 rows but its embeddings have 4 vectors")
    assert versions(cli_run) == []


def test_duplicate_keys_across_merged_img2dataset_runs_first_shard_wins(cli_run, tmp_path, tiny_config):
    merged = tmp_path / "merged"
    merged.mkdir()
    for run, seed in (("a", 0), ("b", 0)):  # two runs that numbered their items the same way
        for i, p in enumerate(synthetic.write_wds(tmp_path / run, n_shards=2, per_shard=4, seed=seed)):
            shutil.copy(p, merged / f"{run}-{i:05d}.tar")
    r = build(cli_run, "dup", merged, tiny_config, "--activate")
    assert "dup v1 ready (active): 8 items stored, 8 skipped (duplicate_key=8)" in r.output
    shards = json.loads(cli_run("memory", "show", "dup", "--json").output)["shards"]
    assert [(s["name"], s["items_stored"], s["items_skipped"]) for s in shards] == [
        ("a-00000.tar", 4, 0), ("a-00001.tar", 4, 0), ("b-00000.tar", 0, 4), ("b-00001.tar", 0, 4)]
    assert json.loads(cli_run("memory", "verify", "dup", "--json").output)["ok"]
    hits = json.loads(cli_run("memory", "query", "dup", "--text", "a red circle", "-k", "8", "--json").output)
    assert len({h["key"] for h in hits}) == len(hits)


def test_duplicate_keys_with_a_key_column_and_small_shards_match_the_in_shard_rule(cli_run, tmp_path, tiny_config):
    manifest = synthetic.write_manifest(tmp_path / "m", n=10)
    rows = manifest.read_text().splitlines()
    header, body = rows[0], rows[1:]
    cols = header.split(",")
    k = cols.index("key")
    # keys k0..k4 twice: rows 0-4 and 5-9; shards of 3 rows put some repeats in one shard, some across shards
    out = [header] + [",".join(f"k{i % 5}" if j == k else v for j, v in enumerate(r.split(","))) for i, r in
                      enumerate(body)]
    manifest.write_text("\n".join(out) + "\n")
    r = build(cli_run, "kc", manifest, tiny_config, "--key-column", "key", "--shard-size", "3")
    assert "5 items stored, 5 skipped (duplicate_key=5)" in r.output
    assert json.loads(cli_run("memory", "verify", "kc", "--version", "1", "--json").output)["ok"]
    shown = json.loads(cli_run("memory", "show", "kc", "--version", "1", "--json").output)
    assert [s["items_stored"] for s in shown["shards"]] == [3, 2, 0, 0]  # the first occurrence in source order


BAD_ARGS = [
    ("memory", "build"), ("memory", "build", "x"), ("memory", "build", "Bad Name", "/nope", "--backbone", "ViT-B-32"),
    ("memory", "build", "x", "/nope", "--backbone", "NoSuchModel"), ("memory", "show", "nope"),
    ("memory", "show", "nope", "--version", "x"), ("memory", "activate", "nope", "1"),
    ("memory", "activate", "nope", "-3"), ("memory", "verify", "nope"), ("memory", "finalize", "nope", "1"),
    ("memory", "delete", "nope", "1"), ("memory", "query", "nope", "--text", "x"), ("memory", "query", "nope"),
    ("memory", "resume", "nope"), ("memory", "resume", "nope", "two"),
    ("train", "m", "--pairs", "nope", "--memory", "nope"), ("train", "m", "--pairs", "a", "--memory", "b", "-k", "0"),
    ("model", "show", "nope"), ("model", "delete", "nope"), ("model", "list", "--bogus"),
    ("eval", "classification", "--model", "nope", "--dataset", "imagefolder:/nope"),
    ("eval", "classification", "--model", "nope", "--dataset", "weird"),
    ("eval", "retrieval", "--model", "nope", "--dataset", "karpathy:/nope.json"),
    ("eval", "show", "999"), ("eval", "gallery", "999"), ("eval", "plot", "999"), ("eval", "compare", "999"),
    ("eval", "list", "--model", "nope"), ("db", "current"), ("worker",), ("status", "--timeout", "x"),
    ("info", "extra"), ("nosuchcommand",),
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: " ".join(a))
def test_no_command_answers_bad_arguments_with_a_traceback(reco_env, args):
    """Usage errors too: one `Error:` line and exit 1, as every other error (click's own is exit 2 with usage)."""
    r = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in r.output and "Usage:" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in (0, 1), r.output
    if r.exit_code:
        one_error_line(r)


def test_a_usage_error_points_at_the_help(reco_env):
    r = CliRunner().invoke(cli, ["memory", "query", "x", "--image", "/no/such.png"], prog_name="reco")
    one_error_line(r, "'--image'", "does not exist", "see `reco memory query --help`")


TAG = "ViT-B-32:laion2b_s34b_b79k"


@pytest.mark.parametrize("args, backbone, says", [
    (("x", "{missing}"), TAG, "not found"),
    (("x", "{missing}", "--format", "manifest"), TAG, "not found"),
    (("Bad Name", "{missing}"), TAG, "name"),
    (("x", "{dir}", "--format", "manifest"), TAG, "is a directory"),
    (("x", "{manifest}"), "ViT-B-33", "unknown backbone 'ViT-B-33'"),
    (("x", "{manifest}"), "ViT-B-32:laion2b_nope", "known tags: openai"),
    (("x", "{manifest}"), TAG, "not in the local cache"),  # weights missing offline
])
def test_source_name_and_backbone_errors_come_before_torch_is_imported(tmp_path, args, backbone, says):
    """The cheap checks run first: a typo or absent weights cost a second, not the seconds torch takes to import,
    and leave no version behind."""
    import os
    import subprocess
    import sys

    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "caption": "red"}\n')
    args = [a.format(missing=tmp_path / "missing", dir=tmp_path, manifest=tmp_path / "m.jsonl") for a in args]
    env = {**os.environ, "RECO_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "HOME": str(tmp_path / "user"), "HF_HOME": str(tmp_path / "user" / "hf")}  # empty weight caches
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "app", "memory", "build", *args, "--backbone",
                        backbone], env=env, capture_output=True, text=True, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert r.returncode == 1 and len(errors) == 1 and says in errors[0], r.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "app.cli" in imported and not imported & {"torch", "open_clip", "torchvision"}, errors
    listed = subprocess.run([sys.executable, "-m", "app", "memory", "list", "--json"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stdout + listed.stderr
