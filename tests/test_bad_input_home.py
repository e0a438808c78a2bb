"""Bad input around RECO_HOME, the metadata DB and transfers (issue 28): an unusable home, a full disk, an emptied
database beside its vectors, a migration that fails half-way, tampered exports, and argument errors that used to
wait for torch. Each ends in one `Error:` line that says what to do, and leaves nothing half-made."""

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import types

import pytest

from app import synthetic
from tests.cli_checks import build, one_error_line, versions


# -- 1. RECO_HOME that cannot be created or written ---------------------------------------------------------
COMMANDS = [("memory", "list"), ("memory", "list", "--json"), ("status",), ("model", "list")]


def test_a_reco_home_under_a_regular_file(cli_run, tmp_path, monkeypatch, tiny_config):
    (tmp_path / "afile").write_text("not a directory")
    home = tmp_path / "afile" / "home"
    monkeypatch.setenv("RECO_HOME", str(home))
    m = synthetic.write_manifest(tmp_path / "m", n=2)
    for args in COMMANDS + [("memory", "build", "x", m, "--backbone", tiny_config, "--format", "manifest")]:
        r = cli_run(*args, ok=False)
        one_error_line(r, f"RECO_HOME {home} cannot be created or written", "set RECO_HOME to a writable")
    assert (tmp_path / "afile").read_text() == "not a directory"


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_a_reco_home_that_takes_no_write(cli_run, reco_env, monkeypatch, code):
    """A directory without write permission, or on a read-only mount. Root writes through permission bits, so
    there the probe gets the error an unprivileged user (or a read-only mount) would."""
    reco_env.mkdir()
    reco_env.chmod(0o555)
    if os.geteuid() == 0:
        def refuse(probe):
            raise OSError(code, os.strerror(code), str(probe))

        monkeypatch.setattr("app.runtime._probe_write", refuse)
    try:
        for args in COMMANDS:
            r = cli_run(*args, ok=False)
            one_error_line(r, f"RECO_HOME {reco_env} cannot be created or written", os.strerror(code))
        assert list(reco_env.iterdir()) == []
    finally:
        reco_env.chmod(0o755)


# -- 2. a full disk during `memory build` -------------------------------------------------------------------
WAL_FULL = ("Service runtime error: Can't init WAL: Os { code: 27, kind: FileTooLarge, message: \"File too "
            "large\" }")
NO_SPACE = "Service internal error: No space left on device (os error 28)"


def _engine_with(monkeypatch, create=None, update=None):
    """The embedded engine as the store sees it (`app.store.edge._edge`), with a shard's create or update failing
    as qdrant-edge fails on a full disk: a plain Exception, the half-made shard directory left behind."""
    import qdrant_edge

    from app.store import edge

    class Shard:
        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            return getattr(self._real, name)

        def update(self, op):
            if update:
                raise Exception(update)
            return self._real.update(op)

    class EdgeShard:
        load = staticmethod(qdrant_edge.EdgeShard.load)

        @staticmethod
        def create(path, config):
            if create:
                os.makedirs(os.path.join(path, "wal"))
                raise Exception(create)
            return Shard(qdrant_edge.EdgeShard.create(path, config))

    fake = types.SimpleNamespace(**{n: getattr(qdrant_edge, n) for n in dir(qdrant_edge) if not n.startswith("_")})
    fake.EdgeShard = EdgeShard
    monkeypatch.setattr(edge, "_edge", lambda: fake)


@pytest.mark.parametrize("where, message", [("create", WAL_FULL), ("update", NO_SPACE)])
def test_a_full_disk_during_build_fails_the_version_with_the_space_to_free(cli_run, reco_env, tmp_path,
                                                                          tiny_config, monkeypatch, where, message):
    src = synthetic.write_wds(tmp_path / "wds", n_shards=1, per_shard=4)[0].parent
    with monkeypatch.context() as m:
        _engine_with(m, **{where: message})
        r = build(cli_run, "full", src, tiny_config, ok=False)
    line = one_error_line(r, "full v1 failed: no space left on the disk holding", str(reco_env / "vectors"),
                           "MB free): free at least", "MB there")
    assert "FileTooLarge" not in line and "os error" not in line
    (v,) = versions(cli_run)
    assert v["status"] == "failed" and "no space left on the disk" in v["error"], v
    if where == "create":  # the half-made shard directory is gone (it frees the space)
        assert not (reco_env / "vectors" / "reco-full-v1").exists()
        (reco_env / "vectors" / "reco-full-v1" / "wal").mkdir(parents=True)  # as a crash would leave it
    r = cli_run("memory", "verify", "full", "--version", "1", ok=False)
    assert r.exit_code == 1 and "Traceback" not in r.output and "edge config" not in r.output, r.output
    assert "version failed: " in r.output and "no space left on the disk" in r.output
    assert "full v2 ready" in build(cli_run, "full", src, tiny_config).output  # with space again, it builds


def test_a_full_disk_under_the_metadata_db_is_not_an_outage(cli_run, reco_env, monkeypatch):
    """SQLite's "database or disk is full" names the file and the space to free, not an unreachable server."""
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    cli_run("memory", "list")  # creates the database

    def full(self, *a, **k):
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(Session, "scalars", full)
    r = cli_run("memory", "list", ok=False)
    one_error_line(r, f"no space left on the disk holding {reco_env / 'reco.db'}", "free at least")


# -- 3. an empty metadata DB beside collections ---------------------------------------------------------------
@pytest.mark.parametrize("how", ["zero-byte", "deleted"])
def test_an_empty_metadata_db_beside_collections_is_refused(cli_run, reco_env, tmp_path, tiny_config, how):
    src = synthetic.write_wds(tmp_path / "wds", n_shards=1, per_shard=4)[0].parent
    build(cli_run, "kept", src, tiny_config)
    db = reco_env / "reco.db"
    if how == "zero-byte":
        db.write_bytes(b"")  # a backup restored as an empty file
    else:
        db.unlink()
    for args in (("memory", "list"), ("memory", "list", "--json"), ("memory", "build", "kept", src, "--backbone",
                                                                    tiny_config)):
        r = cli_run(*args, ok=False)
        one_error_line(r, f"the metadata database {db} is empty but {reco_env / 'vectors'} holds 1 collection(s) "
                           "(reco-kept-v1)", "restore", "from a backup", "mv ", "reco memory import")
    assert (not db.exists()) or db.stat().st_size == 0  # nothing migrated over the evidence
    shutil.move(reco_env / "vectors", tmp_path / "vectors.orphaned")  # the way out that starts over
    assert versions(cli_run) == []


# -- 4. a first migration that fails half-way ----------------------------------------------------------------
def test_a_migration_failing_half_way_leaves_no_half_schema(cli_run, reco_env, monkeypatch):
    from alembic.operations import Operations
    from sqlalchemy.exc import OperationalError

    create, calls = Operations.create_table, []

    def create_then_fill_the_disk(self, *a, **k):
        calls.append(a[0])
        if len(calls) == 3:  # the first migration has made two tables (and a batch copy) by now
            raise OperationalError("CREATE TABLE", {}, sqlite3.OperationalError("database or disk is full"))
        return create(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(Operations, "create_table", create_then_fill_the_disk)
        r = cli_run("memory", "list", ok=False)
    one_error_line(r, f"no space left on the disk holding {reco_env / 'reco.db'}")
    tables = sqlite3.connect(reco_env / "reco.db").execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [], tables
    assert versions(cli_run) == []  # the next run migrates from scratch, no "table memories already exists"
    assert "database: 00" in cli_run("db", "current").output


# -- 5. transfers: exactly the manifest's files, its dim the arrays', no staging left -------------------------
@pytest.fixture
def exported(cli_run, tmp_path, tiny_config):
    src = synthetic.write_wds(tmp_path / "wds", n_shards=1, per_shard=6)[0].parent
    cli_run("memory", "build", "src", src, "--backbone", tiny_config, "--activate")
    cli_run("memory", "export", "src", tmp_path / "out", "--part-rows", "4")
    return tmp_path / "out"


def test_an_export_must_hold_exactly_the_manifests_files(cli_run, exported):
    for sub, stem, ext in (("img_emb", "img_emb", "npy"), ("text_emb", "text_emb", "npy"),
                           ("metadata", "metadata", "parquet")):
        shutil.copy(exported / sub / f"{stem}_0.{ext}", exported / sub / f"{stem}_7.{ext}")
    r = cli_run("memory", "import", exported, "--as", "extra", ok=False)
    one_error_line(r, "img_emb/img_emb_7.npy and 2 more, which its manifest does not list", "remove it")
    for sub, stem, ext in (("img_emb", "img_emb", "npy"), ("text_emb", "text_emb", "npy"),
                           ("metadata", "metadata", "parquet")):
        (exported / sub / f"{stem}_7.{ext}").unlink()
    (exported / "metadata" / "metadata_1.parquet").unlink()
    r = cli_run("memory", "import", exported, "--as", "missing", ok=False)
    one_error_line(r, "metadata/metadata_1.parquet is missing")
    assert [v["version"] for v in versions(cli_run)] == [1]  # only the source's


def test_a_manifest_edited_to_another_dimension_is_refused(cli_run, exported):
    m = json.loads((exported / "manifest.json").read_text())
    (exported / "manifest.json").write_text(json.dumps({**m, "dim": 32}))
    r = cli_run("memory", "import", exported, "--as", "dim", ok=False)
    one_error_line(r, "img_emb/img_emb_0.npy holds vectors of shape (4, 64)", "dim 32", "manifest was edited")
    assert [v["version"] for v in versions(cli_run)] == [1]


def _bundle(root, backbone, backbone_hash, weights=b"not safetensors"):
    """A model bundle whose sums agree but whose checkpoint does not (its tensors were swapped)."""
    root.mkdir()
    (root / "model.safetensors").write_bytes(weights)
    (root / "checkpoint.json").write_text(json.dumps({"sha256": "0" * 64}))
    (root / "config.json").write_text(json.dumps({
        "format": "reco-model-bundle", "format_version": 1, "name": "fused", "backbone": backbone,
        "backbone_hash": backbone_hash, "dim": 64, "memory": {"name": "src", "version": 1},
        "pairs": {"name": "src", "version": 1}, "job": {}}))
    (root / "README.md").write_text("# fused\n")
    (root / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256((root / f).read_bytes()).hexdigest()}  {f}\n"
        for f in ("model.safetensors", "checkpoint.json", "config.json", "README.md")))
    return root


def test_a_refused_model_import_leaves_no_staging(cli_run, reco_env, exported, tmp_path):
    (v,) = versions(cli_run)
    bundle = _bundle(tmp_path / "bundle", v["backbone"], v["backbone_hash"])
    r = cli_run("model", "import", bundle, ok=False)
    one_error_line(r, "checkpoint")
    assert not (reco_env / "models" / "fused.importing").exists() and not (reco_env / "models" / "fused").exists()
    assert json.loads(cli_run("model", "list", "--json").output) == []


# -- 6. argument errors before torch ----------------------------------------------------------------------------
def _without_torch(tmp_path, *args):
    """Run `reco ARGS` in a fresh interpreter: one Error line, and torch, open_clip and torchvision never imported."""
    env = {**os.environ, "RECO_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "RECO_OFFLINE": "1",
           "HOME": str(tmp_path / "user"), "HF_HOME": str(tmp_path / "user" / "hf")}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "app", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "app.cli" in imported and not imported & {"torch", "open_clip", "torchvision"}, errors
    return errors[0]


def _home_with_a_memory(tmp_path):
    """RECO_HOME with memory `m` registered (v1 building, none active), made without a backbone."""
    from app.memory import create_version
    from app.runtime import Runtime
    from app.settings import Settings

    rt = Runtime(Settings.from_env({"RECO_HOME": str(tmp_path / "home")}))
    try:
        create_version(rt, "m", source="x", fmt="manifest", backbone="b", backbone_hash="h" * 64, dim=8,
                       shard_specs=[])
    finally:
        rt.close()


@pytest.mark.parametrize("case, says", [
    ("missing", "is not a model bundle"),
    ("not-a-bundle", "is not a model bundle"),
    ("changed", "does not match its sum in SHA256SUMS"),
    ("no-memory", "no memory named 'src' here"),
    ("other-backbone", "point --memory at a memory of the model's backbone"),
])
def test_model_import_errors_come_before_torch_is_imported(tmp_path, case, says):
    _home_with_a_memory(tmp_path)
    bundle = tmp_path / "bundle"
    if case == "not-a-bundle":
        bundle.mkdir()
        (bundle / "model.safetensors").write_bytes(b"x")
    elif case != "missing":
        _bundle(bundle, "b", "other" * 12)
    if case == "changed":
        (bundle / "README.md").write_text("# edited\n")
    extra = ("--memory", "m") if case == "other-backbone" else ()
    assert says in _without_torch(tmp_path, "model", "import", bundle, *extra)
    assert not (tmp_path / "home" / "models").exists()


@pytest.mark.parametrize("ref, out, says", [
    ("m", "full", "exists and is not an empty directory"),
    ("nope", "new", "no memory named 'nope'"),
    ("m@7", "new", "memory m has no version 7"),
    ("m", "new", "memory m has no active version"),
    ("m@x", "new", "bad memory reference 'm@x'"),
])
def test_memory_export_errors_come_before_torch_is_imported(tmp_path, ref, out, says):
    _home_with_a_memory(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert says in _without_torch(tmp_path, "memory", "export", ref, tmp_path / out)
    assert not (tmp_path / "new").exists() and (tmp_path / "full" / "keep.txt").read_text() == "mine"


# -- 7. an empty query text ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   \t"])
def test_an_empty_query_text_is_refused(tmp_path, text):
    _home_with_a_memory(tmp_path)
    assert "--text is empty" in _without_torch(tmp_path, "memory", "query", "m", "--text", text)
