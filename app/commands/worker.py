"""`reco worker`: a Celery worker (distributed profile)."""

from __future__ import annotations

import click

from ..errors import RecoError


@click.command()
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
