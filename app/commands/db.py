"""`reco db`: the metadata database schema."""

from __future__ import annotations

import click


@click.group()
def db() -> None:
    """The metadata database schema."""


@db.command("upgrade")
@click.pass_obj
def db_upgrade(rt) -> None:
    """Apply every pending migration (idempotent)."""
    from ..db import Database

    before, after = Database(rt.settings.database_url, check=False).upgrade()
    click.echo(f"schema {before or 'empty'} -> {after}" if before != after else f"schema already at {after}")


@db.command("current")
@click.pass_obj
def db_current(rt) -> None:
    """Print the schema revision of the database and the one this code needs."""
    from ..db import Database
    from ..db.session import head_revision

    current = Database(rt.settings.database_url, check=False).current_revision()
    click.echo(f"database: {current or 'empty'}  code: {head_revision()}")
