"""`reco`: the admin CLI. One click group per noun; every command gets the shared Runtime as ctx.obj."""

from __future__ import annotations

import contextlib
import json
import sys

import click

from .commands.output import echo_json as _echo_json
from .commands.output import table as _table
from .errors import RecoError


@contextlib.contextmanager
def _usage_as_error():
    """A usage error as every other error: one `Error:` line, exit 1, and where to read the usage (a command given
    no arguments still shows its help)."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "reco"
        raise click.ClickException(f"{exc.format_message()} (see `{where} --help`)") from exc


class RecoGroup(click.Group):
    """Turns RecoError, service outages and usage errors into one `Error: ...` line and exit code 1, for every
    subcommand."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _usage_as_error():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _usage_as_error():
            return self._invoke(ctx)

    def _invoke(self, ctx):
        from sqlalchemy.exc import DatabaseError

        from .settings import Settings

        try:
            try:
                return super().invoke(ctx)
            except DatabaseError as exc:  # e.g. a damaged SQLite file found mid-command
                from .db.session import database_error

                raise database_error(Settings.from_env().database_url, exc) from exc
        except RecoError as exc:
            from .settings import scrub

            try:
                st = Settings.from_env()
                urls = (st.database_url, st.broker_url, st.result_backend, st.qdrant_url)
            except RecoError:
                urls = ()
            raise click.ClickException(scrub(str(exc), *urls)) from exc


@click.group(cls=RecoGroup)
@click.version_option(package_name="reco")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """RECO admin: memory versions, workers, the metadata DB.

    Zero config runs embedded under ./.reco (SQLite + Qdrant's in-process engine + in-process tasks);
    RECO_DATABASE_URL, RECO_QDRANT_URL and RECO_BROKER_URL switch to PostgreSQL, a Qdrant server and Celery.
    """
    from .runtime import Runtime

    ctx.obj = Runtime()
    ctx.call_on_close(ctx.obj.close)


@cli.command()
@click.pass_obj
def info(rt) -> None:
    """Show the effective settings (secrets masked)."""
    _echo_json(rt.settings.describe())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to wait for workers to answer a ping.")
@click.pass_obj
def status(rt, as_json, timeout) -> None:
    """Workers alive, queue depths, running and failed jobs, memory versions building."""
    from .status import status as collect

    st = collect(rt, timeout)
    if as_json:
        _echo_json(st)
        return
    click.echo(f"profile: {st['profile']} (broker {st['broker']})")
    if st["profile"] == "distributed":
        click.echo(f"workers: {', '.join(st['workers']) or 'none answered'}")
        if "error" in st:
            click.echo(f"broker: {st['error']}")
        click.echo("queues: " + ", ".join(f"{q} {n}" for q, n in st["queues"].items()))
    click.echo("building:" + ("" if st["building_versions"] else " none"))
    for b in st["building_versions"]:
        sh = b["shards"]
        click.echo(f"  {b['memory']} v{b['version']} {b['status']}: {sh['done']}/{sum(sh.values())} shards done, "
                   f"{sh['running']} running, {sh['stale']} stale, {sh['pending']} pending, {sh['failed']} failed, "
                   f"{b['items_stored']} items")
    click.echo("running:" + ("" if st["running_jobs"] else " none"))
    for j in st["running_jobs"]:
        if j["kind"] == "ingest":
            lease = f"stale since {j['stale_since'][:19]} (lease of {j['worker']} not renewed; the sweeper re-queues " \
                    f"it)" if j["state"] == "stale" else f"on {j['worker']} (heartbeat {j['heartbeat_age_s']:.0f} s ago)"
            click.echo(f"  ingest {j['memory']} v{j['version']} shard {j['shard']} {lease}")
        else:
            click.echo(f"  train {j['model']} step {j['step']}")
    click.echo("failed:" + ("" if st["failed_jobs"] else " none"))
    for j in st["failed_jobs"]:
        what = f"{j['memory']} v{j['version']}" if j["kind"] == "ingest" else j["model"]
        click.echo(f"  {j['kind']} {what}: {j['error']}")


# -- db -------------------------------------------------------------------------------------------------
@cli.group()
def db() -> None:
    """The metadata database schema."""


@db.command("upgrade")
@click.pass_obj
def db_upgrade(rt) -> None:
    """Apply every pending migration (idempotent)."""
    from .db import Database

    before, after = Database(rt.settings.database_url, check=False).upgrade()
    click.echo(f"schema {before or 'empty'} -> {after}" if before != after else f"schema already at {after}")


@db.command("current")
@click.pass_obj
def db_current(rt) -> None:
    """Print the schema revision of the database and the one this code needs."""
    from .db import Database
    from .db.session import head_revision

    current = Database(rt.settings.database_url, check=False).current_revision()
    click.echo(f"database: {current or 'empty'}  code: {head_revision()}")


# -- memory ---------------------------------------------------------------------------------------------
@cli.group()
def memory() -> None:
    """Image-text memories and their versions."""


@memory.command("build")
@click.argument("name")
@click.argument("source")
@click.option("--format", "fmt", type=click.Choice(["wds", "manifest", "embeddings"]), default=None,
              help="Corpus layout (default: detected from SOURCE).")
@click.option("--backbone", required=True, help="MODEL:TAG, MODEL:/path/weights, MODEL, or /path/config.json[:/path/weights].")
@click.option("--activate", is_flag=True, help="Make the version active as soon as it is ready.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the version is ready (distributed profile).")
@click.option("--image-column", default="image", show_default=True, help="Manifest column with image paths.")
@click.option("--caption-column", default="caption", show_default=True, help="Manifest column with captions.")
@click.option("--key-column", default=None, help="Manifest column with item keys (default: the row number).")
@click.option("--shard-size", default=10_000, show_default=True, help="Manifest rows per shard (one task each).")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many seconds.")
@click.option("--quantization", type=click.Choice(["auto", "none", "int8", "binary"]), default="auto",
              show_default=True, help="Quantized vectors, searched with rescoring from the originals; auto: int8 "
                                      "once the version is big enough for an HNSW graph.")
@click.option("--on-disk", is_flag=True, help="Keep the original vectors memory-mapped on disk (RAM: only the "
                                              "quantized vectors and the graph).")
@click.pass_obj
def memory_build(rt, name, source, fmt, backbone, activate, wait, image_column, caption_column, key_column,
                 shard_size, timeout, quantization, on_disk) -> None:
    """Create the next version of NAME from SOURCE: one ingest task per shard."""
    from .build import start_build
    from .store.base import Storage

    v = start_build(rt, name, source, backbone=backbone, fmt=fmt, activate=activate, image_column=image_column,
                    caption_column=caption_column, key_column=key_column, shard_size=shard_size,
                    storage=Storage(quantization, on_disk))
    click.echo(f"{name} v{v.version}: building from {source}", err=True)
    _run_build(rt, name, v, wait, timeout)


def _run_build(rt, name: str, v, wait: bool, timeout: float | None) -> str | None:
    """Ingest a registered version: in this process (embedded), or on the workers, waiting unless --no-wait."""
    from .build import enqueue, wait_for

    if rt.settings.in_process_tasks:
        _ingest_here(rt, name, v)
        status = _status(rt, v.id)
    else:
        ids = enqueue(rt, v.id)
        click.echo(f"queued {len(ids)} shard task(s) on 'ingest'", err=True)
        _warn_without_workers(rt, "ingest")
        if not wait:
            click.echo(f"{name} v{v.version} building")
            return None
        status = wait_for(rt, v.id, timeout=timeout, sweep_every=rt.settings.lease_s)
    _report_build(rt, name, v.version, status)
    return status


def _ingest_here(rt, name: str, v) -> None:
    """The embedded build. An error outside a shard's own work (the engine cannot create the collection, the seal
    runs out of disk) would leave the version `building` for ever: it ends failed with the reason, its
    half-written collection removed. An interrupt or a DB hiccup leaves it to `reco memory resume`."""
    from .build import run_in_process
    from .errors import TransientError
    from .memory import fail_version

    try:
        run_in_process(rt, v.id)
    except TransientError:
        raise
    except Exception as exc:
        reason = str(exc) if isinstance(exc, RecoError) else f"{type(exc).__name__}: {exc}"
        fail_version(rt, v.id, reason, drop=True)
        if not isinstance(exc, RecoError):
            raise  # a bug: its traceback is worth more than one line
        raise RecoError(f"{name} v{v.version} failed: {reason}") from exc


def _warn_without_workers(rt, queue: str) -> None:
    """Warn when no worker is alive: no heartbeat younger than two lease periods, and no answer to a broker ping
    (a solo worker busy with a task cannot answer one, but its heartbeat thread writes on)."""
    from workers.celery_app import workers_alive

    from .leases import live_workers

    if not live_workers(rt) and not workers_alive():
        click.echo(f"warning: no worker is alive; start one with `reco worker --queues {queue}`", err=True)


def _status(rt, version_id: int) -> str:
    from .db.models import MemoryVersion

    with rt.db.session() as s:
        return s.get(MemoryVersion, version_id).status


def _report_build(rt, name: str, version: int, status: str) -> None:
    from .memory import get_memory, get_version, summary

    with rt.db.session() as s:
        mem = get_memory(s, name)
        d = summary(s, get_version(s, name, version), mem.active_version_id)
    skipped = ", ".join(f"{k}={n}" for k, n in sorted(d["skip_reasons"].items())) or "none"
    click.echo(f"{name} v{version} {status}{' (active)' if d['active'] else ''}: "
               f"{d['items_stored']} items stored, {d['items_skipped']} skipped ({skipped})")
    if status != "ready":
        why = d["error"] or f"{d['shards_done']}/{d['shards_total']} shards done; a shard may be held by another " \
            f"process's lease (`reco memory show {name} --version {version}`)"
        raise RecoError(f"{name} v{version} {status}: {why}")


@memory.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def memory_list(rt, as_json) -> None:
    """Every memory with its versions."""
    from .memory import list_memories

    out = list_memories(rt)
    if as_json:
        _echo_json(out)
        return
    rows = [[m["name"], v["version"], v["status"] + (" *" if v["active"] else ""), v["items_stored"],
             v["items_skipped"], f"{v['shards_done']}/{v['shards_total']}", v["backbone"], v["created_at"][:19]]
            for m in out for v in m["versions"]]
    _table(rows, ["NAME", "VERSION", "STATUS", "ITEMS", "SKIPPED", "SHARDS", "BACKBONE", "CREATED"])
    if rows:
        click.echo("(* = active)")


@memory.command("show")
@click.argument("name")
@click.option("--version", "version", type=int, default=None, help="Default: the active version, else the newest.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def memory_show(rt, name, version, as_json) -> None:
    """Status, counts, skip reasons and per-shard progress of one version."""
    from .leases import lease_info
    from .memory import get_memory, get_version, summary

    with rt.db.session() as s:
        mem = get_memory(s, name)
        v = get_version(s, name, version)
        d = summary(s, v, mem.active_version_id)
        d["name"] = name
        d["shards"] = [{"id": sh.id, "index": sh.index, "name": sh.spec.get("name"), "status": sh.status,
                        **lease_info(sh, rt.settings.lease_s),
                        "items_stored": sh.items_stored, "items_skipped": sh.items_skipped,
                        "skip_reasons": sh.skip_reasons, "attempts": sh.attempts, "error": sh.error}
                       for sh in v.shards]
    d["storage"] = _applied_storage(rt, d)
    d["search_runs"] = None
    if d["status"] in ("ready", "retired"):  # where a model on this machine would search it (settings, device, size)
        from .device_search import where

        d["search_runs"] = where(rt.settings, None, rt.store, d["collection"], d["items_stored"], d["dim"])
    if as_json:
        _echo_json(d)
        return
    for k in ("name", "version", "status", "active", "backbone", "dim", "source", "format", "collection",
              "items_stored", "items_skipped", "created_at", "ready_at", "activated_at", "error", "search_runs"):
        if d.get(k) is not None:
            click.echo(f"{k:14} {d[k]}")
    applied = d["storage"] or {"quantization": "-", "on_disk": d["on_disk"]}
    click.echo(f"{'storage':14} {applied['quantization']} vectors (asked: {d['quantization']}), originals "
               f"{'on disk (memory-mapped)' if applied['on_disk'] else 'in RAM'}")
    for r, n in sorted(d["skip_reasons"].items()):
        click.echo(f"  skipped {r}: {n}")
    _table([[sh["index"], sh["name"], sh["state"], sh["worker"] or "", sh["items_stored"], sh["items_skipped"],
             sh["attempts"], sh["error"] or (f"lease expired {sh['stale_since'][:19]}" if sh["stale_since"] else "")]
            for sh in d["shards"]],
           ["SHARD", "NAME", "STATE", "WORKER", "STORED", "SKIPPED", "ATTEMPTS", "ERROR"])


@memory.command("export")
@click.argument("ref", metavar="NAME[@VERSION]")
@click.argument("directory")
@click.option("--part-rows", default=100_000, show_default=True, help="Items per part file.")
@click.pass_obj
def memory_export(rt, ref, directory, part_rows) -> None:
    """Write a version (default: the active one) to DIRECTORY in clip-retrieval's layout with a manifest."""
    from .transfer.memory import export_version

    m = export_version(rt, ref, directory, part_rows=part_rows, progress=True)
    size = sum(f["bytes"] for f in m["files"].values())
    click.echo(f"{m['memory']} v{m['version']}: {m['count']} items in {len(m['parts'])} part(s), "
               f"{size / 1024 ** 2:.1f} MB -> {directory}")


@memory.command("import")
@click.argument("directory")
@click.option("--as", "name", default=None, help="Memory name (default: the exported one).")
@click.option("--backbone", default=None, help="This machine's spec of the same weights (default: the exported "
                                                "spec); its fingerprint must match the export's.")
@click.option("--activate", is_flag=True, help="Make the version active once it is ready and verified.")
@click.option("--quantization", type=click.Choice(["auto", "none", "int8", "binary"]), default=None,
              help="Storage options of the new version (default: the exported ones).")
@click.option("--on-disk/--in-ram", default=None)
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=float, default=None)
@click.pass_obj
def memory_import(rt, directory, name, backbone, activate, quantization, on_disk, wait, timeout) -> None:
    """Build a version from an export (either profile): hashes and backbone checked before anything is stored,
    verified at the end."""
    from .memory import verify
    from .store.base import Storage
    from .transfer.memory import read_export, start_import

    manifest = read_export(directory)
    exported = manifest.get("storage", {})
    storage = Storage(quantization or exported.get("quantization", "auto"),
                      bool(exported.get("on_disk", False)) if on_disk is None else on_disk)
    name = name or manifest["memory"]
    v = start_import(rt, directory, manifest, name=name, backbone=backbone, activate=activate, storage=storage)
    click.echo(f"{name} v{v.version}: importing from {directory}", err=True)
    status = _run_build(rt, name, v, wait, timeout)
    if status == "ready":
        report = verify(rt, name, v.version)
        if not report.ok:
            raise RecoError(f"{name} v{v.version} was imported but does not verify: {report.problems}")
        click.echo(f"{name} v{v.version} verified: {report.store_count} points")


def _applied_storage(rt, d: dict) -> dict | None:
    """What the store applied to a sealed version (quantization is decided at the seal for `auto`)."""
    if d["status"] not in ("ready", "retired"):
        return None
    try:
        return rt.store.storage(d["collection"])
    except RecoError:
        return None


@memory.command("activate")
@click.argument("name")
@click.argument("version", type=int)
@click.pass_obj
def memory_activate(rt, name, version) -> None:
    """Make VERSION the one queries read (atomic: a query sees the old or the new version, never a mix)."""
    from .memory import activate

    activate(rt, name, version)
    click.echo(f"{name} v{version} is active")


@memory.command("verify")
@click.argument("name")
@click.option("--version", "version", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def memory_verify(rt, name, version, as_json) -> None:
    """Reconcile the metadata with the vector store; exit 1 on any mismatch."""
    from dataclasses import asdict

    from .memory import verify

    r = verify(rt, name, version)
    if as_json:
        _echo_json({**asdict(r), "ok": r.ok})
    else:
        click.echo(f"{name} v{r.version} ({r.status}): metadata {r.shard_sum}, store {r.store_count}, "
                   f"shards {r.shards_done}/{r.shards_total} done")
        for p in r.problems:
            click.echo(f"  MISMATCH: {p}")
        click.echo("OK" if r.ok else "FAILED")
    if not r.ok:
        sys.exit(1)


@memory.command("resume")
@click.argument("name")
@click.argument("version", type=int, required=False)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the version is ready.")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many seconds.")
@click.pass_obj
def memory_resume(rt, name, version, wait, timeout) -> None:
    """Put a building version's lost shards (pending with no message, stale lease) back to work now, or retry a
    failed version's unfinished shards. Workers do the same on their own once per lease period."""
    from .build import resume, wait_for

    r = resume(rt, name, version)
    number = r["version"]
    if r.get("ran_in_process"):
        status = _status(rt, r["version_id"])
    else:
        click.echo(f"{name} v{number}: {r['requeued']} shard(s) re-queued, {r['failed']} failed", err=True)
        _warn_without_workers(rt, "ingest")
        if not wait:
            return
        status = wait_for(rt, r["version_id"], timeout=timeout, sweep_every=rt.settings.lease_s)
    _report_build(rt, name, number, status)


@memory.command("finalize")
@click.argument("name")
@click.argument("version", type=int)
@click.pass_obj
def memory_finalize(rt, name, version) -> None:
    """Seal a version left `finalizing` by a finaliser that died (every shard done); then it is ready."""
    from .memory import finalize

    status = finalize(rt, name, version)
    click.echo(f"{name} v{version} {status}")
    if status != "ready":
        sys.exit(1)


@memory.command("delete")
@click.argument("name")
@click.argument("version", type=int)
@click.option("--force", is_flag=True, help="Also delete the active version (the memory is then inactive).")
@click.pass_obj
def memory_delete(rt, name, version, force) -> None:
    """Delete one version: its metadata and its vector collection."""
    from .memory import delete

    delete(rt, name, version, force=force)
    click.echo(f"deleted {name} v{version}")


@memory.command("query")
@click.argument("name")
@click.option("--text", "text", default=None, help="Find memory items whose caption is near this text.")
@click.option("--image", "image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Find memory items whose image is near this image.")
@click.option("-k", "k", default=10, show_default=True)
@click.option("--version", "version", type=int, default=None, help="Default: the active version.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def memory_query(rt, name, text, image, k, version, as_json) -> None:
    """Nearest memory items to a text or an image (uni-modal search, as RECO retrieves): a sanity check."""
    from .query import query_memory

    hits = query_memory(rt, name, text=text, image=image, k=k, version=version)
    if as_json:
        _echo_json([{"rank": i + 1, "score": h.score, "key": h.payload.get("key"), "caption": h.payload.get("caption"),
                     "id": h.id} for i, h in enumerate(hits)])
        return
    _table([[i + 1, f"{h.score:.4f}", h.payload.get("key"), h.payload.get("caption")] for i, h in enumerate(hits)],
           ["RANK", "SCORE", "KEY", "CAPTION"])


# -- train & model --------------------------------------------------------------------------------------
@cli.command()
@click.argument("model_name")
@click.option("--pairs", required=True, help="Memory whose pairs train the fusion (NAME or NAME@VERSION).")
@click.option("--memory", required=True, help="Memory to retrieve from (NAME or NAME@VERSION); may equal --pairs.")
@click.option("-k", "k", default=10, show_default=True, help="Neighbours per query.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=256, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--weight-decay", default=0.05, show_default=True)
@click.option("--warmup-steps", default=50, show_default=True)
@click.option("--search", type=click.Choice(["uni", "cross"]), default="uni", show_default=True,
              help="uni: image->image, text->text; cross: image->text, text->image.")
@click.option("--fusion", type=click.Choice(["cross", "uni"]), default="cross", show_default=True,
              help="cross: fuse the other modality of the hits; uni: the same modality.")
@click.option("--val-fraction", default=0.1, show_default=True, help="Share of the pairs held out for validation.")
@click.option("--val-by", type=click.Choice(["concept", "item"]), default="concept", show_default=True,
              help="Hold out whole concepts (pairs sharing a caption) or single items.")
@click.option("--val-pairs", default=None, help="Validate on this memory's pairs (NAME or NAME@VERSION) instead "
              "of held-out training pairs, e.g. concepts the backbone never saw; trains on all of --pairs.")
@click.option("--seed", default=0, show_default=True)
@click.option("--checkpoint-every", default=200, show_default=True, help="Steps between checkpoints.")
@click.option("--select", type=click.Choice(["best", "1se"]), default="best", show_default=True,
              help="Checkpoint inference uses: the best validation accuracy, or the earliest within one standard "
              "error of it (with --val-pairs on concepts the backbone never saw).")
@click.option("--heads", type=int, default=None, help="Attention heads (default dim/64).")
@click.option("--dropout", default=0.0, show_default=True)
@click.option("--neighbour-dropout", default=0.1, show_default=True)
@click.option("--rank/--no-rank", "use_rank", default=True, show_default=True, help="Learned rank embedding.")
@click.option("--score/--no-score", "use_score", default=True, show_default=True,
              help="Retrieval score added to the attention logits (off: the paper's plain form).")
@click.option("--init", type=click.Choice(["retrieval", "identity"]), default="retrieval", show_default=True,
              help="Start as score-weighted retrieval fusion (generalises to unseen concepts) or as the identity.")
@click.option("--score-scale", default=100.0, show_default=True, help="Initial 1/temperature of the score softmax.")
@click.option("--query-noise", default=0.0, show_default=True,
              help="Training only: noise of this norm on each frozen query the layers refine, so the base is unsure "
              "of every pair and the memory pays (try 0.5-1 when the pairs are concepts the backbone knows well).")
@click.option("--tune", type=click.Choice(["all", "attention", "scalars"]), default="all", show_default=True,
              help="attention: only where each side looks learns; values, output projection and MLP keep their start. "
              "scalars: only the memory's weight against the query and the score scale learn.")
@click.option("--batching", type=click.Choice(["random", "similar"]), default="random", show_default=True,
              help="similar: each batch is a group of pairs with near captions, so in-batch negatives are hard.")
@click.option("--retrieval/--no-retrieval", default=True, show_default=True,
              help="--no-retrieval masks every neighbour: the control that trains the same layers without memory.")
@click.option("--dedup-threshold", type=float, default=0.98, show_default=True,
              help="Drop neighbours whose search score is above this (near-duplicates of the pair); 1 disables.")
@click.option("--score-threshold", type=float, default=None, help="Drop neighbours scoring below this.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default RECO_DEVICE, else cuda when present).")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16"]), default="fp32", show_default=True,
              help="fp32: exact float32 steps. tf32: float32 matmuls in TF32 on CUDA for this run only (faster on "
              "Ampere and later). bf16: forward and loss under bfloat16 autocast (CUDA or CPU); weights, optimizer "
              "state and validation stay float32.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for a queued job (distributed).")
@click.option("--timeout", type=float, default=None)
@click.pass_obj
def train(rt, model_name, pairs, memory, wait, timeout, **options) -> None:
    """Train RECO's fusion transformers: queue `train` (in-process with a progress bar when embedded).

    Rerunning an interrupted job with the same settings resumes it from its last checkpoint."""
    from .train import TrainConfig, create_job, run_training

    cfg = TrainConfig(**options)
    create_job(rt, model_name, pairs, memory, cfg)
    if rt.settings.in_process_tasks:
        metrics = run_training(rt, model_name)
    else:
        from workers.celery_app import check_broker
        from workers.tasks import train_model

        check_broker()
        train_model.apply_async(args=(model_name,), queue="train")
        _warn_without_workers(rt, "train")
        if not wait:
            click.echo(f"{model_name}: training queued")
            return
        metrics = _wait_model(rt, model_name, timeout)
    best = metrics.get("best") or {}
    rule = f" ({best['rule']}: the highest was at step {best['top']})" if best.get("rule") == "1se" else ""
    click.echo(f"{model_name} ready: {metrics['steps']} steps, checkpoint of step {best.get('step')}{rule}")
    line = _val_line(metrics)
    if line:
        click.echo(line)


def _val_line(metrics: dict | None) -> str:
    """Validation of the pick beside its untrained start and the frozen backbone: did training help?"""
    val = ((metrics or {}).get("best") or {}).get("val") or {}
    if not val:
        return ""
    start = (metrics or {}).get("start")
    if not start:
        return f"val in-batch acc {val['acc']:.3f} (frozen {val['baseline_acc']:.3f})"
    gain = val["acc"] - start["acc"]
    verdict = "training helped" if gain > 0 else "training did not beat the untrained start"
    return (f"val in-batch acc {val['acc']:.3f}, untrained start {start['acc']:.3f} ({gain:+.3f}: {verdict}), "
            f"frozen {val['baseline_acc']:.3f}")


def _wait_model(rt, name: str, timeout: float | None) -> dict:
    import time

    from .db.models import FusionModel

    start = time.monotonic()
    while True:
        with rt.db.session() as s:
            row = s.query(FusionModel).filter_by(name=name).one()
            status, metrics, error = row.status, row.metrics, row.error
        if status == "ready":
            return metrics
        if status == "failed":
            raise RecoError(f"training {name} failed: {error}")
        if timeout is not None and time.monotonic() - start > timeout:
            raise RecoError(f"model {name} still {status} after {timeout:.0f}s")
        time.sleep(1)


@cli.group()
def model() -> None:
    """Trained RECO models."""


def _model_dict(row) -> dict:
    job = row.config.get("job", {})
    return {"name": row.name, "status": row.status, "backbone": row.backbone, "dim": row.dim,
            "memory": row.memory_name, "trained_with_memory_version": row.memory_version,
            "pairs": f"{row.pairs_name}@{row.pairs_version}", "step": row.step, "train": job.get("train"),
            "metrics": row.metrics, "error": row.error, "checkpoint_dir": row.checkpoint_dir,
            "created_at": row.created_at.isoformat() if row.created_at else None,
            "updated_at": row.updated_at.isoformat() if row.updated_at else None}


def _get_model(s, name):
    from .db.models import FusionModel

    row = s.query(FusionModel).filter_by(name=name).one_or_none()
    if row is None:
        raise RecoError(f"no model named {name!r} (see `reco model list`)")
    return row


@model.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def model_list(rt, as_json) -> None:
    """Every model with its memory and validation result."""
    from .db.models import FusionModel

    with rt.db.session() as s:
        out = [_model_dict(r) for r in s.query(FusionModel).order_by(FusionModel.name)]
    if as_json:
        _echo_json(out)
        return

    def val(m):
        v = ((m["metrics"] or {}).get("best") or {}).get("val") or {}
        if not v:
            return ""
        start = (m["metrics"] or {}).get("start")
        return f"{v['acc']:.3f} ({start['acc']:.3f} / {v['baseline_acc']:.3f})" if start else \
            f"{v['acc']:.3f} (- / {v['baseline_acc']:.3f})"

    _table([[m["name"], m["status"], m["memory"], m["pairs"], m["step"], val(m), m["backbone"]] for m in out],
           ["NAME", "STATUS", "MEMORY", "PAIRS", "STEP", "VAL ACC (START / FROZEN)", "BACKBONE"])


@model.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def model_show(rt, name, as_json) -> None:
    """Config, provenance and training metrics of one model."""
    with rt.db.session() as s:
        d = _model_dict(_get_model(s, name))
    if as_json:
        _echo_json(d)
        return
    for key in ("name", "status", "backbone", "dim", "memory", "trained_with_memory_version", "pairs", "step",
                "checkpoint_dir", "created_at", "updated_at", "error"):
        if d.get(key) is not None:
            click.echo(f"{key:28} {d[key]}")
    click.echo("train " + json.dumps(d["train"]))
    line = _val_line(d["metrics"])
    if line:
        click.echo(line)
    final = (d["metrics"] or {}).get("final")
    if final:
        click.echo("final " + json.dumps(final))


@model.command("export")
@click.argument("name")
@click.argument("directory")
@click.pass_obj
def model_export(rt, name, directory) -> None:
    """Write a trained model to DIRECTORY: fusion weights (safetensors), config, model card, SHA256SUMS."""
    from .transfer.model import export_model

    c = export_model(rt, name, directory)
    click.echo(f"model {c['name']} ({c['backbone']}, k={c['k']}, trained with {c['memory']['name']}"
               f"@{c['memory']['version']}) -> {directory}")


@model.command("import")
@click.argument("directory")
@click.option("--as", "name", default=None, help="Model name (default: the exported one).")
@click.option("--memory", default=None, help="Memory it retrieves from (default: the one it was trained with); "
                                             "it must hold vectors of the model's backbone.")
@click.pass_obj
def model_import(rt, directory, name, memory) -> None:
    """Register a model bundle: every file's sum and the memory's backbone checked first."""
    from .transfer.model import import_model

    c = import_model(rt, directory, name=name, memory=memory)
    click.echo(f"model {c['name']} imported, retrieving from memory {c['memory']['name']}")


@model.command("delete")
@click.argument("name")
@click.pass_obj
def model_delete(rt, name) -> None:
    """Delete a model's row and checkpoints."""
    import shutil

    with rt.db.session() as s:
        row = _get_model(s, name)
        ckdir = row.checkpoint_dir
        s.delete(row)
    shutil.rmtree(ckdir, ignore_errors=True)
    click.echo(f"deleted model {name}")


# -- eval -----------------------------------------------------------------------------------------------
@cli.group("eval")
def eval_group() -> None:
    """Zero-shot evaluations: frozen baseline and RECO side by side."""


def _ks(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise RecoError(f"-k takes a comma-separated list of integers, got {text!r}") from exc


_eval_options = [
    click.option("--model", required=True, help="A trained RECO model (`reco model list`)."),
    click.option("--memory", default=None, help="NAME or NAME@VERSION (default: the model's memory, active version)."),
    click.option("-k", "ks", default=None, help="Neighbours, one or a list: -k 1,5,10 (default: the model's k)."),
    click.option("--guard/--no-guard", default=True, show_default=True,
                 help="Keep copies of the evaluation images out of retrieval."),
    click.option("--checkpoint", type=click.Choice(["best", "start"]), default="best", show_default=True,
                 help="The trained checkpoint, or the same layers untrained (what training must beat)."),
    click.option("--seed", default=0, show_default=True),
    click.option("--batch-size", default=64, show_default=True),
    click.option("--json", "as_json", is_flag=True, help="Print the whole result JSON."),
]


def _with_eval_options(fn):
    for opt in reversed(_eval_options):
        fn = opt(fn)
    return fn


def _print_run(run: dict, as_json: bool) -> None:
    from .report import compare_rows

    if as_json:
        _echo_json({k: v for k, v in run.items() if k != "details"})
        return
    headers, rows = compare_rows([run])
    _table(rows, headers)
    g = run["leakage_guard"]
    click.echo(f"run {run['run']}: {run['n_images']} images"
               + (f", skipped {run['skipped']}" if run.get("skipped") else "")
               + f"; leakage guard {'on' if g['enabled'] else 'off'}: {g['excluded_items']} memory items excluded"
               + (" (not from the class set's text side, refined when it was built)"
                  if g.get("class_text_side") and g["excluded_items"] else ""))
    if run.get("classes"):
        c = run["classes"]
        click.echo(f"classes: {c['name']} v{c['version']}, {c['count']} classes, ranked by "
                   f"{'a top-k search of the store' if c['ranking'] == 'search' else 'the dense matrix'}")


@eval_group.command("classification")
@click.option("--dataset", required=True, help="KIND:PATH, e.g. cub:/data/CUB_200_2011, imagefolder:/data/x or "
              "oven:/data/oven.")
@click.option("--classnames", default=None, help="imagefolder: class names: `folder<TAB>name` lines or a JSON "
              "object {folder: name}; a plain list (one name per line) only for folders named like the classes "
              "in the same sorted order, or numbered 0..n-1 / 1..n.")
@click.option("--templates", default=None, help="A file of prompt templates, one per line, with {c}.")
@click.option("--retrieval", type=click.Choice(["both", "image", "text", "none"]), default="both", show_default=True)
@click.option("--classes", default=None, help="Rank against a stored class set (NAME or NAME@VERSION, `reco "
              "classes build`) instead of the dataset's class names: its ids must cover the dataset's classes.")
@click.option("--ranking", type=click.Choice(["auto", "dense", "search"]), default="auto", show_default=True,
              help="With --classes: the class matrix in RAM (dense) or a top-k search of the store; auto picks "
                   "by the set's size.")
@click.option("--ef", type=click.IntRange(1, 100_000), default=None,
              help="With --ranking search: the graph search's width (default 512; wider is slower and closer to "
                   "the exact ranking).")
@_with_eval_options
@click.pass_obj
def eval_classification(rt, dataset, classnames, templates, retrieval, classes, ranking, ef, model, memory, ks,
                        guard, checkpoint, seed, batch_size, as_json) -> None:
    """Zero-shot classification: acc1, acc5, mean per-class recall (OVEN: seen, unseen, harmonic mean)."""
    from .evaluate import evaluate_classification

    if (ranking != "auto" or ef) and not classes:
        raise RecoError("--ranking and --ef apply to a stored class set: give --classes NAME")
    run = evaluate_classification(rt, model, dataset, memory=memory, ks=_ks(ks) if ks else None,
                                  retrieval=retrieval, guard=guard, seed=seed, batch_size=batch_size,
                                  classnames=classnames, templates=templates, checkpoint=checkpoint,
                                  classes=classes, ranking=ranking, ef=ef)
    _print_run(run, as_json)


@eval_group.command("retrieval")
@click.option("--dataset", required=True, help="karpathy:/path/dataset_coco.json (or dataset_flickr30k.json).")
@click.option("--images-root", default=None, help="Folder the JSON's filepath/filename are relative to.")
@click.option("--retrieval", type=click.Choice(["both", "image", "text", "none"]), default="text", show_default=True,
              help="Which side retrieves (the paper's best for retrieval tasks: text).")
@_with_eval_options
@click.pass_obj
def eval_retrieval(rt, dataset, images_root, retrieval, model, memory, ks, guard, checkpoint, seed, batch_size,
                   as_json) -> None:
    """Zero-shot image-text retrieval: recall@1/5/10 both ways (every caption of an image is a positive)."""
    from .evaluate import evaluate_retrieval

    run = evaluate_retrieval(rt, model, dataset, memory=memory, ks=_ks(ks) if ks else None, retrieval=retrieval,
                             guard=guard, seed=seed, batch_size=batch_size, images_root=images_root,
                             checkpoint=checkpoint)
    _print_run(run, as_json)


@eval_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def eval_list(rt, as_json) -> None:
    """Every stored evaluation run."""
    from .db.models import Evaluation

    with rt.db.session() as s:
        runs = [{"run": e.id, "task": e.task, "model": e.model_name, "memory": f"{e.memory_name}@{e.memory_version}",
                 "dataset": e.dataset, "k": e.ks, "retrieval": e.retrieval, "guard": bool(e.leakage_guard),
                 "metrics": e.metrics, "timing": e.timing, "result": e.result_path,
                 "created_at": e.created_at.isoformat()} for e in s.query(Evaluation).order_by(Evaluation.id)]
    if as_json:
        _echo_json(runs)
        return
    from .report import HEADLINE

    def head(r, which):
        key = HEADLINE[r["task"]][0]
        vals = r["metrics"]["baseline"] if which == "base" else r["metrics"]["reco"][str(max(r["k"]))]
        return f"{100 * vals[key]:.2f}"

    _table([[r["run"], r["task"].replace("zeroshot_", ""), r["model"], r["memory"], r["dataset"],
             ",".join(map(str, r["k"])), head(r, "base"), head(r, "reco"), r["created_at"][:19]] for r in runs],
           ["RUN", "TASK", "MODEL", "MEMORY", "DATASET", "K", "BASELINE", "RECO(max k)", "CREATED"])


@eval_group.command("compare")
@click.argument("runs", nargs=-1, type=int, required=True)
@click.pass_obj
def eval_compare(rt, runs) -> None:
    """Side-by-side table of runs: baseline and RECO at every k, every metric."""
    from .evaluate import load_run
    from .report import compare_rows

    headers, rows = compare_rows([load_run(rt, r) for r in runs])
    _table(rows, headers)


@eval_group.command("plot")
@click.argument("runs", nargs=-1, type=int, required=True)
@click.option("--out", "out_dir", default=None, help="Folder for the PNGs (default $RECO_HOME/plots).")
@click.pass_obj
def eval_plot(rt, runs, out_dir) -> None:
    """PNGs: accuracy vs k, and baseline vs RECO per dataset."""
    from pathlib import Path

    from .evaluate import load_run
    from .report import plot_runs

    for p in plot_runs([load_run(rt, r) for r in runs], Path(out_dir) if out_dir else rt.settings.home / "plots"):
        click.echo(str(p))


@eval_group.command("gallery")
@click.argument("run", type=int)
@click.option("--out", default=None, help="HTML file (default $RECO_HOME/galleries/run-N.html).")
@click.option("--limit", default=100, show_default=True, help="Queries on the page.")
@click.pass_obj
def eval_gallery(rt, run, out, limit) -> None:
    """A self-contained HTML page: queries, their retrieved images and captions, right and wrong predictions."""
    from pathlib import Path

    from .evaluate import load_run
    from .report import gallery

    path = Path(out) if out else rt.settings.home / "galleries" / f"run-{run}.html"
    click.echo(str(gallery(load_run(rt, run), path, limit)))


# -- worker ---------------------------------------------------------------------------------------------
@cli.command()
@click.option("--queues", "-Q", default="ingest,train", show_default=True, help="Comma-separated queues to consume.")
@click.option("--concurrency", "-c", default=1, show_default=True, help="Task processes (solo pool when 1).")
@click.option("--loglevel", "-l", default="info", show_default=True)
@click.option("--hostname", "-n", default=None, help="Worker node name (Celery's -n), e.g. ingest1@%h.")
@click.pass_obj
def worker(rt, queues, concurrency, loglevel, hostname) -> None:
    """Start a Celery worker (distributed profile; needs RECO_BROKER_URL)."""
    if rt.settings.in_process_tasks:
        raise RecoError("RECO_BROKER_URL is not set: the embedded profile runs tasks in-process and needs no worker")
    from workers.celery_app import app, check_broker

    check_broker()
    pool = "solo" if concurrency == 1 else "prefork"
    argv = ["worker", "-Q", queues, "-c", str(concurrency), "--pool", pool, "-l", loglevel]
    if hostname:
        argv += ["-n", hostname]
    app.worker_main(argv)


from .commands.classes import classes  # noqa: E402
from .serve.cli import serve  # noqa: E402  (the command only; the service loads when it starts)

cli.add_command(classes)
cli.add_command(serve)


def main() -> None:
    cli(prog_name="reco")
