"""`reco serve`: start the HTTP service."""

from __future__ import annotations

import dataclasses
import os
import socket

import click

from ..errors import RecoError


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--model", "models", multiple=True, help="A trained model to serve (repeat; default: every ready one).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Server processes (more than 1 needs a Qdrant server: the embedded engine is one process's).")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=None,
              help="Items per backbone batch [RECO_SERVE_MAX_BATCH, 32]; 1 turns batching off.")
@click.option("--max-wait-ms", type=click.FloatRange(0, 1000), default=None,
              help="How long a batch waits for more requests [RECO_SERVE_MAX_WAIT_MS, 5].")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.pass_obj
def serve(rt, host, port, models, workers, max_batch, max_wait_ms, log_level) -> None:
    """Serve trained models over HTTP: /v1/embed, /v1/classify, /v1/search, /metrics and a search page at /.

    A `reco memory activate` anywhere is picked up by the next request; RECO_API_TOKEN turns on bearer auth.
    """
    from .api import create_app
    from .settings import ServeSettings

    settings = ServeSettings.from_env()
    changes = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "models": tuple(models) or None}
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    settings = dataclasses.replace(settings, models=tuple(_check_models(rt, settings.models)))
    if workers > 1 and rt.settings.embedded_store:
        raise RecoError("--workers above 1 needs a Qdrant server (RECO_QDRANT_URL): the embedded engine opens a "
                        "memory in one process at a time. Run one worker, or scale with several `reco serve` "
                        "processes on a Qdrant server")
    _check_port(host, port)
    import uvicorn

    click.echo(f"serving {', '.join(settings.models)} on http://{host}:{port}/ (API docs at /docs)", err=True)
    if workers == 1:
        uvicorn.run(create_app(settings, rt), host=host, port=port, log_level=log_level,
                    timeout_keep_alive=settings.keep_alive_s)
    else:
        os.environ.update(settings.to_env())
        uvicorn.run("app.serve.api:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, timeout_keep_alive=settings.keep_alive_s)


def _check_models(rt, names: tuple[str, ...]) -> list[str]:
    from ..db.models import FusionModel, ModelStatus

    with rt.db.session() as s:
        rows = {m.name: m.status for m in s.query(FusionModel)}
    ready = sorted(n for n, st in rows.items() if st == ModelStatus.READY)
    for name in names:
        if name not in rows:
            raise RecoError(f"no model named {name!r}: ready ones are {', '.join(ready) or 'none'} (`reco model list`)")
        if rows[name] != ModelStatus.READY:
            raise RecoError(f"model {name} is {rows[name]}, not ready: only trained models can be served")
    if not names and not ready:
        raise RecoError("no ready model to serve: train one first (`reco train NAME --pairs MEMORY --memory MEMORY`)")
    return list(names) or ready


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RecoError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port or --host") from exc
