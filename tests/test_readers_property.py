"""Property-based tests of the corpus readers through `reco memory build` (Hypothesis, fixed seed, bounded).

Generated tar shards and manifests mix good items with missing and corrupt images, empty, huge and odd-Unicode
captions, repeated keys (inside a shard and across shards) and unsafe paths. Whatever the mix, the build either
ends ready with every row accounted for (stored + skipped = rows, the store holding exactly the stored items,
`verify` clean) or fails with one `Error:` line and leaves no version that could be activated.
"""

import csv
import io
import itertools
import json
import tarfile

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from app import synthetic

PNG = synthetic.png_bytes(synthetic.render("red", "circle"))
CAPTIONS = st.one_of(
    st.sampled_from(["a red circle", "", "   ", "x" * 20_000, "赤い丸 🟥⭕", "עיגול אדום", "e\u0301\u200b\ufeff", "a\nb\tc",
                     "\x00nul"]),
    st.text(min_size=0, max_size=40),
)
KINDS = st.sampled_from(["good", "good", "good", "corrupt", "missing", "unsafe"])
ITEM = st.tuples(st.integers(0, 5), KINDS, CAPTIONS)  # (key number, what is wrong, caption)
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_names = (f"p{i}" for i in itertools.count())


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _check(cli_run, name, source, tiny_config, rows: int, *extra):
    r = cli_run("memory", "build", name, source, "--backbone", tiny_config, *extra, ok=False)
    assert "Traceback" not in r.output
    listed = {m["name"]: m["versions"] for m in json.loads(cli_run("memory", "list", "--json").output)}
    event("ready" if r.exit_code == 0 else "refused: " + r.output.strip().splitlines()[-1][:60])
    if r.exit_code == 0:
        (v,) = listed[name]
        assert v["status"] == "ready" and v["items_stored"] + v["items_skipped"] == rows, (v, rows)
        verified = json.loads(cli_run("memory", "verify", name, "--json").output)
        assert verified["ok"] and verified["store_count"] == v["items_stored"], verified
    else:
        assert r.exit_code == 1 and sum(ln.startswith("Error:") for ln in r.output.splitlines()) == 1, r.output
        assert all(v["status"] not in ("ready", "retired") for v in listed.get(name, []))


@SETTINGS
@given(shards=st.lists(st.lists(ITEM, min_size=1, max_size=8), min_size=1, max_size=3))
def test_tar_shards_are_stored_or_refused_never_lost(cli_run, tmp_path_factory, tiny_config, shards):
    for items in shards:  # the reader groups consecutive members by key: a repeat must not sit next to itself
        assume(all(a[0] != b[0] for a, b in zip(items, items[1:])))
    root = tmp_path_factory.mktemp("wds")
    for s, items in enumerate(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for n, kind, caption in items:
                key = f"k{n}"
                if kind == "unsafe":
                    _add(tar, f"../{key}.png", PNG)
                    continue
                if kind != "missing":
                    _add(tar, f"{key}.png", PNG if kind == "good" else PNG[: len(PNG) // 3])
                _add(tar, f"{key}.txt", caption.encode("utf-8", "surrogatepass"))
    _check(cli_run, next(_names), root, tiny_config, sum(len(items) for items in shards))


@SETTINGS
@given(rows=st.lists(ITEM, min_size=1, max_size=12), kind=st.sampled_from(["csv", "tsv", "jsonl"]),
       shard_size=st.integers(1, 5))
def test_manifests_are_stored_or_refused_never_lost(cli_run, tmp_path_factory, tiny_config, rows, kind, shard_size):
    root = tmp_path_factory.mktemp("manifest")
    (root / "img").mkdir()
    (root / "img" / "good.png").write_bytes(PNG)
    (root / "img" / "bad.png").write_bytes(PNG[: len(PNG) // 3])
    image = {"good": "img/good.png", "corrupt": "img/bad.png", "missing": "img/none.png", "unsafe": "../../etc/x.png"}
    records = [{"image": image[k], "caption": c, "key": f"k{n}"} for n, k, c in rows]
    path = root / f"m.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["image", "caption", "key"], delimiter="\t" if kind == "tsv" else ",")
            w.writeheader()
            w.writerows(records)
    _check(cli_run, next(_names), path, tiny_config, len(rows), "--key-column", "key", "--shard-size",
           str(shard_size))
