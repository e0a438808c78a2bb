"""The Celery app. Broker and result backend come from RECO_BROKER_URL / RECO_RESULT_BACKEND.

Its configuration, task names and queues are the library's (`app.dispatch.celery_config`, `app.dispatch.TASKS`),
so what the library sends by name is what these workers consume: acks_late + reject_on_worker_lost (a message is
acknowledged only after its shard is done, so a worker that dies mid-shard leaves the message to be delivered
again; the shard task is idempotent), prefetch 1 (a long shard never sits queued behind another on a busy worker).
The tasks are workers/tasks.py; the heartbeat and sweeper thread of every worker is workers/housekeeping.py (both
imported by the worker through `include`; this module imports neither).
"""

from __future__ import annotations

from celery import Celery

from app import dispatch
from app.settings import Settings

settings = Settings.from_env()

app = Celery("reco", include=["workers.tasks", "workers.housekeeping"])
app.conf.update(dispatch.celery_config(settings))


def check_broker(timeout: float = 3.0) -> None:
    """Fail fast with one line when the broker does not answer (app.dispatch.check_broker, on this app)."""
    dispatch.check_broker(settings, timeout, app=app)
