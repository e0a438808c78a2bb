"""Corpus readers: sharding and item streaming for WebDataset tars, manifests and precomputed embeddings."""

import csv
import io
import json
import math
import os
import tarfile

import numpy as np
import pytest

from app import synthetic
from app.corpus import SkipReason, detect_format, plan_shards, read_shard
from app.errors import RecoError


def _read_all(fmt, shards):
    return [it for spec in shards for it in read_shard(fmt, spec)]


def _add(tar, name, data=b"", type_=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    info.size = len(data) if type_ == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)


def _write_tar(path, members):
    """members: (name, bytes) pairs, or (name, None, type, linkname) for non-regular members."""
    with tarfile.open(path, "w") as tar:
        for m in members:
            if m[1] is None:
                _add(tar, m[0], type_=m[2], linkname=m[3])
            else:
                _add(tar, m[0], m[1])
    return path


PNG = synthetic.png_bytes(synthetic.render("red", "square", seed=1))
PNG2 = synthetic.png_bytes(synthetic.render("blue", "circle", seed=2))


# -- wds ---------------------------------------------------------------------------------------------------------
def test_wds_dir_glob_and_brace_pattern_give_the_same_shards(wds_corpus):
    fmt, by_dir = plan_shards(str(wds_corpus))
    assert fmt == "wds"
    assert [s["name"] for s in by_dir] == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(os.path.isabs(s["path"]) for s in by_dir)
    _, by_glob = plan_shards(f"{wds_corpus}/*.tar")
    _, by_brace = plan_shards(f"{wds_corpus}/{{00000..00002}}.tar")
    assert by_dir == by_glob == by_brace
    _, one = plan_shards(f"{wds_corpus}/00001.tar")  # a single tar file is one shard
    assert one == [by_dir[1]]


def test_wds_brace_pattern_with_a_missing_member_names_it(wds_corpus):
    with pytest.raises(RecoError, match=r"00003\.tar"):
        plan_shards(f"{wds_corpus}/{{00000..00003}}.tar")


def test_wds_missing_source_and_empty_dir_are_errors(tmp_path):
    with pytest.raises(RecoError, match="not found"):
        plan_shards(str(tmp_path / "nope"), fmt="wds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecoError, match="no shards"):
        plan_shards(str(tmp_path / "empty"))


def test_wds_items_carry_key_caption_and_image_bytes(wds_corpus):
    fmt, shards = plan_shards(str(wds_corpus))
    items = _read_all(fmt, shards)
    expected = synthetic.items(24)  # write_wds(n_shards=3, per_shard=8) writes exactly these, in order
    assert [it.key for it in items] == [k for k, _, _ in expected]
    assert [it.caption for it in items] == [c for _, _, c in expected]
    assert [it.image_bytes for it in items] == [png for _, png, _ in expected]
    assert all(it.skip is None for it in items)
    assert items[0].extra == {"key": expected[0][0], "caption": expected[0][2]}
    # one shard yields only its own items
    assert [it.key for it in read_shard(fmt, shards[1])] == [k for k, _, _ in expected[8:16]]


def test_wds_caption_from_txt_falls_back_to_json(tmp_path):
    p = _write_tar(tmp_path / "s.tar", [
        ("a.png", PNG), ("a.txt", b"  from txt \n"), ("a.json", json.dumps({"caption": "from json"}).encode()),
        ("b.jpg", PNG2), ("b.json", json.dumps({"caption": "only json", "url": "http://x"}).encode()),
        ("c.png", PNG), ("c.txt", b"   "), ("c.json", json.dumps({"caption": "json after blank txt"}).encode()),
        ("sub/d.webp", PNG2), ("sub/d.txt", b"nested key"),
    ])
    items = list(read_shard("wds", {"path": str(p)}))
    got = {it.key: (it.caption, it.image_bytes, it.skip) for it in items}
    assert got == {
        "a": ("from txt", PNG, None),
        "b": ("only json", PNG2, None),
        "c": ("json after blank txt", PNG, None),
        "sub/d": ("nested key", PNG2, None),
    }
    assert items[1].extra == {"caption": "only json", "url": "http://x"}


def test_wds_missing_image_and_empty_caption_are_skipped(tmp_path):
    p = _write_tar(tmp_path / "s.tar", [
        ("ok.png", PNG), ("ok.txt", b"fine"),
        ("noimg.txt", b"a caption without an image"), ("noimg.json", b'{"caption": "x"}'),
        ("blank.png", PNG), ("blank.txt", b" \n\t "),
        ("nocap.png", PNG),
        ("badjson.png", PNG), ("badjson.json", b"{not json"),
        ("last.png", PNG2), ("last.txt", b"still read"),
    ])
    items = list(read_shard("wds", {"path": str(p)}))
    assert [(it.key, it.skip) for it in items] == [
        ("ok", None),
        ("noimg", SkipReason.MISSING_IMAGE),
        ("blank", SkipReason.EMPTY_CAPTION),
        ("nocap", SkipReason.EMPTY_CAPTION),
        ("badjson", SkipReason.EMPTY_CAPTION),
        ("last", None),
    ]
    assert items[-1].caption == "still read" and items[-1].image_bytes == PNG2


def test_wds_unsafe_member_paths_are_skipped_and_the_rest_is_read(tmp_path):
    p = _write_tar(tmp_path / "s.tar", [
        ("good1.png", PNG), ("good1.txt", b"first"),
        ("../evil.png", PNG), ("../evil.txt", b"escape"),
        ("/abs.png", PNG), ("/abs.txt", b"absolute"),
        ("dir/../../up.png", PNG), ("dir/../../up.txt", b"escape via a dir"),
        ("link.png", None, tarfile.SYMTYPE, "/etc/passwd"), ("link.txt", b"a symlink"),
        ("good2.png", PNG2), ("good2.txt", b"second"),
    ])
    with tarfile.open(p) as tar:  # the archive really holds the hostile names
        assert {"../evil.png", "/abs.png", "dir/../../up.png"} <= set(tar.getnames())
    items = list(read_shard("wds", {"path": str(p)}))
    unsafe = [it for it in items if it.skip == SkipReason.UNSAFE_PATH]
    assert len(unsafe) == 4
    assert all(it.image_bytes is None and it.caption is None for it in unsafe)
    good = [(it.key, it.caption, it.image_bytes) for it in items if it.skip is None]
    assert good == [("good1", "first", PNG), ("good2", "second", PNG2)]
    assert len(items) == 6


def test_wds_file_that_is_not_a_tar_is_an_error(tmp_path):
    p = tmp_path / "00000.tar"
    p.write_bytes(b"this is not a tar archive\n" * 50)
    with pytest.raises(RecoError, match="not a readable tar"):  # while planning, before any version (issue 28)
        plan_shards(str(p))
    with pytest.raises(RecoError, match="not a readable tar"):
        list(read_shard("wds", {"path": str(p)}))
    with pytest.raises(RecoError, match="not found"):
        list(read_shard("wds", {"path": str(tmp_path / "gone.tar")}))


def test_wds_truncated_tar_is_an_error(tmp_path):
    good = synthetic.write_wds(tmp_path / "w", n_shards=1, per_shard=4)[0]
    data = good.read_bytes()
    p = tmp_path / "trunc.tar"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(RecoError, match="not a readable tar"):
        list(read_shard("wds", {"path": str(p)}))


_TAR_MEMBERS = [("a.png", b"x" * 1000), ("d" * 120 + "/long-name.txt", b"hello"), ("\u00fc/n\u00efce.txt", b"u"),
                ("p/" * 60 + "deep.json", b"{}"), ("empty.txt", b"")]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_reader_reads_what_tarfile_reads(tmp_path, fmt, mode):
    """Long names (GNU `L`, pax `path`, ustar prefix), unicode, empty files, dirs, links, compressed archives."""
    from app.corpus import tar

    members = _TAR_MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in _TAR_MEMBERS if len(m[0]) < 100
                                                                 or m[0].startswith("p/")]
    p = tmp_path / "t.tar"
    with tarfile.open(p, mode, format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        _add(t, "dir", type_=tarfile.DIRTYPE)
        _add(t, "lnk", type_=tarfile.SYMTYPE, linkname="a.png")
        _add(t, "hard", type_=tarfile.LNKTYPE, linkname="a.png")
    with tarfile.open(p) as t:
        expected = [(m.name, t.extractfile(m).read() if m.isfile() else b"") for m in t]
    got = list(tar.members(str(p)))
    assert [(m.name, m.data) for m in got] == expected
    assert [m.type for m in got][-3:] == [tar.DIRECTORY, tar.SYMLINK, tar.LINK]


def test_tar_reader_refuses_a_damaged_header(tmp_path):
    from app.corpus import tar

    good = synthetic.write_wds(tmp_path / "w", n_shards=1, per_shard=4)[0]
    with tarfile.open(good) as t:
        second = t.getmembers()[1].offset  # where the second member's header starts
    data = bytearray(good.read_bytes())
    data[second + 3] ^= 0x20  # one flipped bit in its name: the checksum no longer matches
    p = tmp_path / "bad.tar"
    p.write_bytes(bytes(data))
    got = []
    with pytest.raises(tar.TarError, match="invalid header"):
        for m in tar.members(str(p)):
            got.append(m.name)
    assert len(got) == 1  # the first member was read before the damage
    with pytest.raises(RecoError, match="not a readable tar"):
        list(read_shard("wds", {"path": str(p)}))


# -- manifest ----------------------------------------------------------------------------------------------------
def _pairs(items):
    return [(it.key, it.caption) for it in items]


@pytest.fixture(scope="module")
def expected10():
    return synthetic.items(10)


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_manifest_formats_read_the_same_rows(tmp_path, kind, expected10):
    path = synthetic.write_manifest(tmp_path / kind, 10, kind=kind)
    assert detect_format(str(path)) == "manifest"
    fmt, shards = plan_shards(str(path), key_column="key")
    assert fmt == "manifest" and len(shards) == 1
    items = _read_all(fmt, shards)
    assert _pairs(items) == [(k, c) for k, _, c in expected10]
    assert [it.image_bytes for it in items] == [png for _, png, _ in expected10]
    assert [it.extra["path"] for it in items] == [f"images/{k}.png" for k, _, _ in expected10]
    assert all(it.skip is None for it in items)
    # without key_column the key is the row number
    _, shards = plan_shards(str(path))
    assert [it.key for it in _read_all(fmt, shards)] == [str(i) for i in range(10)]


def _rewrite_parquet_small_groups(path, group_rows=4):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=group_rows)
    pf = pq.ParquetFile(path)
    assert [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)] == [4, 4, 2]


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_manifest_shard_size_cuts_rows_exactly_once(tmp_path, kind, expected10):
    path = synthetic.write_manifest(tmp_path / kind, 10, kind=kind)
    if kind == "parquet":
        _rewrite_parquet_small_groups(path)  # shards [3:6] and [6:9] cross row-group boundaries
    fmt, shards = plan_shards(str(path), key_column="key", shard_size=3)
    assert len(shards) == math.ceil(10 / 3)
    assert [(s["row"], s["rows"]) for s in shards] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert [s["name"] for s in shards] == [f"manifest.{kind}[{a}:{b}]" for a, b in ((0, 3), (3, 6), (6, 9), (9, 10))]
    per_shard = [_pairs(read_shard(fmt, s)) for s in shards]
    assert [len(p) for p in per_shard] == [3, 3, 3, 1]
    assert [pair for p in per_shard for pair in p] == [(k, c) for k, _, c in expected10]
    # shards are JSON-able task specs
    assert json.loads(json.dumps(shards)) == shards


def test_manifest_csv_quoted_newlines_commas_and_unicode_keep_offsets_aligned(tmp_path):
    (tmp_path / "img.png").write_bytes(PNG)
    captions = [
        f"row {i}: " + ("line one\nline two, with, commas" if i % 3 == 0 else
                        'say "hi", café 東京' if i % 3 == 1 else "plain")
        for i in range(10)
    ]
    path = tmp_path / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "id"])
        for i, c in enumerate(captions):
            w.writerow(["img.png", c, f"k{i}"])
    assert path.read_bytes().count(b"\n") > 11  # the quoted newlines are really in the file
    fmt, shards = plan_shards(str(path), key_column="id", shard_size=3)
    assert len(shards) == 4
    got = [pair for s in shards for pair in _pairs(read_shard(fmt, s))]
    assert got == [(f"k{i}", c.strip()) for i, c in enumerate(captions)]
    # the same through a single shard
    _, whole = plan_shards(str(path), key_column="id")
    assert _pairs(_read_all(fmt, whole)) == got


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_manifest_missing_column_names_it_and_the_option(tmp_path, kind):
    path = synthetic.write_manifest(tmp_path / kind, 3, kind=kind)
    with pytest.raises(RecoError) as e:
        plan_shards(str(path), image_column="img")
    assert "'img'" in str(e.value) and "--image-column" in str(e.value)
    assert "image, caption, key" in str(e.value)  # the columns it does have
    with pytest.raises(RecoError) as e:
        plan_shards(str(path), caption_column="text")
    assert "'text'" in str(e.value) and "--caption-column" in str(e.value)
    with pytest.raises(RecoError, match="--key-column"):
        plan_shards(str(path), key_column="id")


def test_manifest_missing_image_and_empty_caption_are_skipped(tmp_path):
    path = synthetic.write_manifest(tmp_path, 6, kind="csv")
    keys = [k for k, _, _ in synthetic.items(6)]
    (tmp_path / "images" / f"{keys[1]}.png").unlink()
    rows = list(csv.DictReader(open(path, newline="")))
    rows[3]["caption"] = "   "
    rows[4]["image"] = ""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "key"])
        w.writeheader()
        w.writerows(rows)
    fmt, shards = plan_shards(str(path), key_column="key")
    items = _read_all(fmt, shards)
    assert [(it.key, it.skip) for it in items] == [
        (keys[0], None),
        (keys[1], SkipReason.MISSING_IMAGE),
        (keys[2], None),
        (keys[3], SkipReason.EMPTY_CAPTION),
        (keys[4], SkipReason.MISSING_IMAGE),
        (keys[5], None),
    ]
    assert items[1].image_bytes is None and items[1].caption == rows[1]["caption"]


def test_manifest_jsonl_blank_lines_and_missing_file(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    lines = [json.dumps({"image": "a.png", "caption": f"c{i}"}) for i in range(5)]
    path = tmp_path / "m.jsonl"
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n\n")
    fmt, shards = plan_shards(str(path), shard_size=2)
    assert [s["rows"] for s in shards] == [2, 2, 1]
    assert [it.caption for it in _read_all(fmt, shards)] == [f"c{i}" for i in range(5)]
    with pytest.raises(RecoError, match="not found"):
        plan_shards(str(tmp_path / "nope.csv"))


# -- embeddings --------------------------------------------------------------------------------------------------
def test_embeddings_one_shard_per_part_with_unit_float32_vectors(tmp_path):
    root = synthetic.write_embeddings(tmp_path / "emb", parts=11, per_part=3, dim=16)
    assert detect_format(str(root)) == "embeddings"
    fmt, shards = plan_shards(str(root), dim=16)
    assert fmt == "embeddings"
    assert [s["part"] for s in shards] == list(range(11))  # numeric order: part 10 after part 9
    assert all(s["rows"] == 3 for s in shards)
    for s in (shards[0], shards[10]):
        items = list(read_shard(fmt, s))
        n = s["part"]
        saved_img = np.load(root / "img_emb" / f"img_emb_{n}.npy").astype(np.float32)
        saved_txt = np.load(root / "text_emb" / f"text_emb_{n}.npy").astype(np.float32)
        assert [it.key for it in items] == [f"{n:04d}{i:05d}" for i in range(3)]
        assert [it.caption for it in items] == [f"a {' '.join(synthetic.concept(n * 3 + i))}" for i in range(3)]
        img = np.stack([it.image_emb for it in items])
        txt = np.stack([it.text_emb for it in items])
        for got, saved in ((img, saved_img), (txt, saved_txt)):
            assert got.dtype == np.float32 and got.shape == (3, 16)
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
            np.testing.assert_allclose(got, saved, atol=1e-2)
        assert all(it.skip is None and it.image_bytes is None for it in items)


def test_embeddings_dimension_mismatch_names_both_dimensions(tmp_path):
    root = synthetic.write_embeddings(tmp_path / "emb", parts=1, per_part=2, dim=16)
    with pytest.raises(RecoError) as e:
        plan_shards(str(root), dim=512)
    assert "16" in str(e.value) and "512" in str(e.value) and "--backbone" in str(e.value)


def test_embeddings_zero_or_nonfinite_vector_is_bad_embedding(tmp_path):
    root = synthetic.write_embeddings(tmp_path / "emb", parts=1, per_part=4, dim=8)
    img = np.load(root / "img_emb" / "img_emb_0.npy")
    img[1] = 0
    np.save(root / "img_emb" / "img_emb_0.npy", img)
    txt = np.load(root / "text_emb" / "text_emb_0.npy")
    txt[2, 3] = np.nan
    np.save(root / "text_emb" / "text_emb_0.npy", txt)
    fmt, shards = plan_shards(str(root), dim=8)
    items = list(read_shard(fmt, shards[0]))
    assert [it.skip for it in items] == [None, SkipReason.BAD_EMBEDDING, SkipReason.BAD_EMBEDDING, None]
    assert items[1].image_emb is None and items[1].caption is not None


def test_embeddings_missing_or_mismatched_files_are_errors(tmp_path):
    root = synthetic.write_embeddings(tmp_path / "emb", parts=2, per_part=2, dim=8)
    (root / "text_emb" / "text_emb_1.npy").unlink()
    with pytest.raises(RecoError, match="text_emb_1.npy"):
        plan_shards(str(root))
    root2 = synthetic.write_embeddings(tmp_path / "emb2", parts=1, per_part=2, dim=8)
    np.save(root2 / "text_emb" / "text_emb_0.npy", np.ones((3, 8), np.float16))
    with pytest.raises(RecoError, match="same shape"):
        plan_shards(str(root2))
    root3 = synthetic.write_embeddings(tmp_path / "emb3", parts=1, per_part=2, dim=8)
    (root3 / "text_emb" / "text_emb_0.npy").write_bytes(b"not numpy")
    with pytest.raises(RecoError, match="cannot read"):
        plan_shards(str(root3))


# -- image decoding (done at ingest time) -------------------------------------------------------------------------
def test_decode_valid_truncated_and_garbage_images():
    from app.decode import decode_image

    im = decode_image(PNG)
    assert im is not None and im.mode == "RGB" and im.size == (64, 64)
    rgba = synthetic.png_bytes(synthetic.render("green", "cross", seed=3).convert("RGBA"))
    assert decode_image(rgba).mode == "RGB"
    assert decode_image(PNG[: len(PNG) // 2]) is None
    rng = np.random.default_rng(0)
    assert decode_image(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()) is None
    assert decode_image(b"") is None and decode_image(None) is None
