"""Helpers that more than one noun's commands share: running a memory build, the no-worker warning, the
validation line of a training run."""

from __future__ import annotations

import click

from ..errors import RecoError


def run_build(rt, name: str, v, wait: bool, timeout: float | None) -> str | None:
    """Ingest a registered version: in this process (embedded), or on the workers, waiting unless --no-wait."""
    from ..build import copy_here, enqueue, wait_for

    if rt.settings.in_process_tasks:
        ingest_here(rt, name, v)
        status = version_status(rt, v.id)
    else:
        from ..memory import finalize_if_complete

        copy_here(rt, v.id)  # a delta's parent copy first, here: its shards then add to the copy
        finalize_if_complete(rt, v.id)  # a delta with nothing to add is complete now
        ids = enqueue(rt, v.id)
        click.echo(f"queued {len(ids)} shard task(s) on 'ingest'", err=True)
        warn_without_workers(rt, "ingest")
        if not wait:
            click.echo(f"{name} v{v.version} building")
            return None
        status = wait_for(rt, v.id, timeout=timeout, sweep_every=rt.settings.lease_s)
    report_build(rt, name, v.version, status)
    return status


def ingest_here(rt, name: str, v) -> None:
    """The embedded build. An error outside a shard's own work (the engine cannot create the collection, the seal
    runs out of disk) would leave the version `building` for ever: it ends failed with the reason, its
    half-written collection removed. An interrupt or a DB hiccup leaves it to `reco memory resume`."""
    from ..build import run_in_process
    from ..errors import TransientError
    from ..memory import fail_version

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


def warn_without_workers(rt, queue: str) -> None:
    """Warn when no worker is alive: no heartbeat younger than two lease periods, and no answer to a broker ping
    (a solo worker busy with a task cannot answer one, but its heartbeat thread writes on)."""
    from ..dispatch import dispatcher
    from ..leases import live_workers

    if not live_workers(rt) and not dispatcher(rt).workers_alive():
        click.echo(f"warning: no worker is alive; start one with `reco worker --queues {queue}`", err=True)


def version_status(rt, version_id: int) -> str:
    from ..db.models import MemoryVersion

    with rt.db.session() as s:
        return s.get(MemoryVersion, version_id).status


def report_build(rt, name: str, version: int, status: str) -> None:
    from ..memory import get_memory, get_version, lineage_line, summary

    with rt.db.session() as s:
        mem = get_memory(s, name)
        d = summary(s, get_version(s, name, version), mem.active_version_id)
    skipped = ", ".join(f"{k}={n}" for k, n in sorted(d["skip_reasons"].items())) or "none"
    click.echo(f"{name} v{version} {status}{' (active)' if d['active'] else ''}: "
               f"{d['items_stored']} items stored, {d['items_skipped']} skipped ({skipped})")
    if d["parent_version"] is not None and status == "ready":
        click.echo(lineage_line(d))
    if status != "ready":
        why = d["error"] or f"{d['shards_done']}/{d['shards_total']} shards done; a shard may be held by another " \
            f"process's lease (`reco memory show {name} --version {version}`)"
        raise RecoError(f"{name} v{version} {status}: {why}")


def val_line(metrics: dict | None) -> str:
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
