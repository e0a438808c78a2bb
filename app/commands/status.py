"""`reco info` and `reco status`: the effective settings, and what the workers and jobs are doing."""

from __future__ import annotations

import click

from .output import echo_json


@click.command()
@click.pass_obj
def info(rt) -> None:
    """Show the effective settings (secrets masked)."""
    echo_json(rt.settings.describe())


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to wait for workers to answer a ping.")
@click.pass_obj
def status(rt, as_json, timeout) -> None:
    """Workers alive, queue depths, running and failed jobs, memory versions building."""
    from ..status import status as collect

    st = collect(rt, timeout)
    if as_json:
        echo_json(st)
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
