"""Celery tasks: thin wrappers over the library (app.ingest.run_shard, app.train.run_training), registered under
the names the library sends (app.dispatch.TASKS)."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

from app.dispatch import TASKS
from app.errors import TransientError
from app.runtime import Runtime

from .celery_app import app, settings

_runtime: Runtime | None = None


def runtime() -> Runtime:
    """One runtime per worker process (one DB engine, one store client, backbones cached)."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime()
    return _runtime


@app.task(
    name=TASKS["ingest_shard"].name,
    bind=True,
    acks_late=True,
    autoretry_for=(TransientError, OperationalError, ConnectionError),
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=settings.task_retries,
)
def ingest_shard(self, shard_id: int) -> dict:
    """Retries ride out short outages; after the last one the shard is pending or under an expiring lease, and the
    sweeper (app/sweeper.py) sends it again once the database is back."""
    from app.ingest import run_shard
    from app.leases import holder_name

    return run_shard(runtime(), shard_id, holder=holder_name(self.request.hostname))


@app.task(
    name=TASKS["train"].name,
    bind=True,
    acks_late=True,
    autoretry_for=(TransientError, OperationalError, ConnectionError),
    retry_backoff=5,
    retry_backoff_max=120,
    max_retries=5,
)
def train_model(self, model_name: str) -> dict:
    """A killed worker leaves the message unacknowledged; the next delivery resumes from the last checkpoint."""
    from app.train import run_training

    return run_training(runtime(), model_name, progress=False)
