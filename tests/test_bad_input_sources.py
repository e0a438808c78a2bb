"""Foreign sources that broke builds (issue 28): each is refused with one `Error:` line while the build is planned,
before torch loads or a version row exists, or stored exactly with every skip counted under its reason."""

import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from app import synthetic
from app.corpus import tar as fasttar
from tests.cli_checks import build, one_error_line, versions


# -- the inputs, written by the tests ---------------------------------------------------------------------------
def _embeddings(root):
    return synthetic.write_embeddings(root, parts=2, per_part=6, dim=64)


def stray_backup(tmp_path):
    root = _embeddings(tmp_path / "e")
    shutil.copy(root / "img_emb" / "img_emb_0.npy", root / "img_emb" / "img_emb_0_old.npy")
    return root, ("img_emb_0_old.npy", "is not a part of the clip-retrieval layout", "move it out")


def missing_img_part(tmp_path):
    root = _embeddings(tmp_path / "e")
    (root / "img_emb" / "img_emb_1.npy").unlink()
    return root, ("img_emb_1.npy is missing", "metadata_1.parquet", "every part N needs")


def truncated_second_tar(tmp_path):
    paths = synthetic.write_wds(tmp_path / "w", n_shards=2, per_shard=5)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    return paths[1].parent, ("00001.tar is not a readable tar archive", "truncated", "re-create it")


def text_named_tar(tmp_path):
    paths = synthetic.write_wds(tmp_path / "w", n_shards=1, per_shard=5)
    (paths[0].parent / "00001.tar").write_text("key,caption\n" * 100)
    return paths[0].parent, ("00001.tar is not a readable tar archive", "not a tar archive", "re-create it")


def ungrouped_members(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    with tarfile.open(d / "00000.tar", "w") as t:  # every image first, then every caption: all there, not adjacent
        triples = synthetic.items(4)
        for key, png, _ in triples:
            synthetic._add(t, f"{key}.png", png)
        for key, _, cap in triples:
            synthetic._add(t, f"{key}.txt", cap.encode())
    return d, ("not sorted by key", f"members of '{triples[0][0]}' are not adjacent", "tar --sort=name")


UP_FRONT = [stray_backup, missing_img_part, truncated_second_tar, text_named_tar, ungrouped_members]


@pytest.mark.parametrize("make", UP_FRONT, ids=lambda f: f.__name__)
def test_a_bad_source_stops_while_planning_and_leaves_no_version(cli_run, tmp_path, tiny_config, make):
    source, says = make(tmp_path)
    for _ in range(2):  # and again: the first try left nothing behind that changes the answer
        one_error_line(build(cli_run, "s", source, tiny_config, ok=False), *says)
    assert versions(cli_run) == []


@pytest.mark.parametrize("make", UP_FRONT, ids=lambda f: f.__name__)
def test_a_bad_source_stops_before_torch_is_imported(tmp_path, tiny_config, make):
    """As tests/test_bad_input.py's import-time test: the header scan and the layout check need no backbone."""
    source, says = make(tmp_path)
    env = {**os.environ, "RECO_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "RECO_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "app", "memory", "build", "s", str(source),
                        "--backbone", tiny_config], env=env, capture_output=True, text=True, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert r.returncode == 1 and len(errors) == 1 and all(s in errors[0] for s in says), r.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "app.cli" in imported and not imported & {"torch", "open_clip", "torchvision"}


# -- embeddings --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gone", ["text_emb/text_emb_1.npy", "metadata/metadata_0.parquet"])
def test_every_embeddings_part_needs_all_three_files(cli_run, tmp_path, tiny_config, gone):
    root = _embeddings(tmp_path / "e")
    (root / gone).unlink()
    one_error_line(build(cli_run, "e", root, tiny_config, ok=False), f"{gone.split('/')[1]} is missing")
    assert versions(cli_run) == []


def test_two_files_of_one_part_are_refused(cli_run, tmp_path, tiny_config):
    root = _embeddings(tmp_path / "e")
    shutil.copy(root / "img_emb" / "img_emb_1.npy", root / "img_emb" / "img_emb_01.npy")
    one_error_line(build(cli_run, "e", root, tiny_config, ok=False), "img_emb_01.npy", "both part 1")


def test_hidden_files_are_left_alone_and_parts_sort_by_number(cli_run, tmp_path, tiny_config):
    root = synthetic.write_embeddings(tmp_path / "e", parts=11, per_part=2, dim=64)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub / ".DS_Store").write_bytes(b"\0\1")
    r = build(cli_run, "e", root, tiny_config)
    assert "22 items stored, 0 skipped" in r.output
    shards = json.loads(cli_run("memory", "show", "e", "--json").output)["shards"]
    assert [s["name"] for s in shards] == [f"part {n}" for n in range(11)]


# -- tars --------------------------------------------------------------------------------------------------------
def test_the_header_scan_sees_what_the_reader_reads(tmp_path):
    plain = synthetic.write_wds(tmp_path / "w", n_shards=1, per_shard=5)[0]
    with tarfile.open(plain, "a") as t:  # a long name (pax or GNU extension) and a directory
        synthetic._add(t, "d" * 120 + "/k.txt", b"long")
        info = tarfile.TarInfo("sub")
        info.type = tarfile.DIRTYPE
        t.addfile(info)
    packed = tmp_path / "w.tar.gz"
    with open(plain, "rb") as f, gzip.open(packed, "wb") as g:
        shutil.copyfileobj(f, g)
    for p in (plain, packed):
        assert [(m.name, m.type) for m in fasttar.headers(str(p))] == [
            (m.name, m.type) for m in fasttar.members(str(p))]


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.xz"])
def test_a_truncated_compressed_tar_is_refused_up_front(cli_run, tmp_path, tiny_config, suffix):
    import lzma

    plain = synthetic.write_wds(tmp_path / "w", n_shards=1, per_shard=6)[0]
    d = tmp_path / "c"
    d.mkdir()
    packed = (gzip.compress if suffix == ".tar.gz" else lzma.compress)(plain.read_bytes())
    (d / f"00000{suffix}").write_bytes(packed[: len(packed) * 2 // 3])
    one_error_line(build(cli_run, "c", d, tiny_config, ok=False), f"00000{suffix} is not a readable tar archive")
    assert versions(cli_run) == []


def test_a_sorted_tar_with_keys_in_folders_builds_and_counts_its_items(cli_run, tmp_path, tiny_config):
    d = tmp_path / "w"
    d.mkdir()
    with tarfile.open(d / "00000.tar", "w") as t:  # key = the path up to the basename's first dot
        for i, (key, png, cap) in enumerate(synthetic.items(6)):
            synthetic._add(t, f"part{i % 2}/{key}.png", png)
            synthetic._add(t, f"part{i % 2}/{key}.txt", cap.encode())
    r = build(cli_run, "f", d, tiny_config)
    assert "6 items stored, 0 skipped" in r.output
    shards = json.loads(cli_run("memory", "show", "f", "--json").output)["shards"]
    assert [(s["items_stored"], s["items_skipped"]) for s in shards] == [(6, 0)]


def test_the_reader_refuses_a_tar_unsorted_since_planning(tmp_path):
    """The planner's check, again where the shard is read: a tar replaced after planning is not misfiled."""
    from app.corpus import read_shard
    from app.errors import RecoError

    good = synthetic.write_wds(tmp_path / "a", n_shards=1, per_shard=3)[0]
    spec = {"path": str(good), "name": good.name}
    bad, _ = ungrouped_members(tmp_path)
    shutil.copy(bad / "00000.tar", good)
    with pytest.raises(RecoError, match="not sorted by key"):
        list(read_shard("wds", spec))


# -- manifests with --key-column ---------------------------------------------------------------------------------
def _keyed_manifest(root, kind):
    """Eight rows; rows 1, 4 and 6 lack a key (absent, null, blank in JSONL; empty in CSV)."""
    path = synthetic.write_manifest(root, n=8, kind="jsonl")
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    rows[1].pop("key")
    rows[4]["key"] = None
    rows[6]["key"] = "  "
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    csv_path = root / "manifest.csv"
    import csv

    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "key"])
        w.writeheader()
        w.writerows({**r, "key": r.get("key") or ""} for r in rows)
    return csv_path


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_rows_without_a_key_are_counted_as_missing_key(cli_run, tmp_path, tiny_config, kind):
    """Not stored under the key 'None' (where all but the first would be a duplicate_key)."""
    manifest = _keyed_manifest(tmp_path / "m", kind)
    r = build(cli_run, "k", manifest, tiny_config, "--key-column", "key", "--shard-size", "3", "--activate")
    assert "5 items stored, 3 skipped (missing_key=3)" in r.output
    shown = json.loads(cli_run("memory", "show", "k", "--json").output)
    assert shown["skip_reasons"] == {"missing_key": 3}
    hits = json.loads(cli_run("memory", "query", "k", "--text", "a red circle", "-k", "8", "--json").output)
    assert sorted(h["key"] for h in hits) == [f"00{i:06d}" for i in (0, 2, 3, 5, 7)]


def test_without_a_key_column_every_row_is_keyed_by_its_number(cli_run, tmp_path, tiny_config):
    manifest = _keyed_manifest(tmp_path / "m", "jsonl")
    assert "8 items stored, 0 skipped" in build(cli_run, "n", manifest, tiny_config).output

