"""The Celery app. Broker and result backend come from RECO_BROKER_URL / RECO_RESULT_BACKEND.

acks_late + reject_on_worker_lost: a message is acknowledged only after its shard is done, so a worker that
dies mid-shard leaves the message to be delivered again (the shard task is idempotent). Prefetch 1: a long
shard never sits queued behind another on a busy worker.
"""

from __future__ import annotations

from celery import Celery

from app.errors import RecoError
from app.settings import Settings, mask_url

settings = Settings.from_env()

app = Celery("reco", include=["workers.tasks"])
app.conf.update(
    broker_url=settings.broker_url or "memory://",
    result_backend=settings.result_backend or None,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue="ingest",
    task_routes={"reco.ingest_shard": {"queue": "ingest"}, "reco.train": {"queue": "train"}},
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    broker_connection_retry_on_startup=True,
    # an unacknowledged message (its worker died) is delivered again after this many seconds (Redis/SQS)
    broker_transport_options={"visibility_timeout": settings.visibility_timeout},
    worker_hijack_root_logger=False,
)


def check_broker(timeout: float = 3.0) -> None:
    """Fail fast with one line when the broker does not answer (Celery would otherwise retry for minutes)."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:
        raise RecoError(
            f"cannot reach the task broker at {mask_url(settings.broker_url)} ({exc}); "
            "check RECO_BROKER_URL and that Redis or RabbitMQ is running"
        ) from exc


def workers_alive(timeout: float = 1.0) -> list[str]:
    """Names of the workers that answer a ping within `timeout` seconds."""
    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception:
        return []
    return [name for r in replies for name in r]
