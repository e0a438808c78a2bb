"""`reco`: the admin CLI. One click group per noun, each in its own module under app/commands/; every command
gets the shared Runtime as ctx.obj. This module keeps the top-level group, the Runtime, the shared error handling
and the registration of the nouns."""

from __future__ import annotations

import contextlib

import click

# The nouns' modules import only click and light helpers: the library loads inside each command, so
# `reco --help` and argument errors never import torch.
from .commands.classes import classes
from .commands.db import db
from .commands.eval import eval_group
from .commands.memory import memory
from .commands.model import model
from .commands.serve import serve
from .commands.status import info, status
from .commands.train import train
from .commands.worker import worker
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


for _noun in (info, status, db, memory, train, model, eval_group, worker, classes, serve):
    cli.add_command(_noun)


def main() -> None:
    cli(prog_name="reco")
