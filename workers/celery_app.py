"""The Celery app. Broker and result backend come from RECO_BROKER_URL / RECO_RESULT_BACKEND.

acks_late + reject_on_worker_lost: a message is acknowledged only after its shard is done, so a worker that
dies mid-shard leaves the message to be delivered again (the shard task is idempotent). Prefetch 1: a long
shard never sits queued behind another on a busy worker.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from app.errors import RecoError
from app.settings import Settings, mask_url, scrub

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
            f"cannot reach the task broker at {mask_url(settings.broker_url)} ({scrub(str(exc), settings.broker_url)}); "
            "check RECO_BROKER_URL and that Redis or RabbitMQ is running"
        ) from exc


def queue_depths(queues, timeout: float = 2.0) -> dict[str, int]:
    """Messages waiting on each queue (not counting those a worker holds); a queue nobody declared yet holds
    none. Raises when the broker cannot be reached."""
    out = {}
    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
        channel = conn.default_channel
        for q in queues:
            try:
                out[q] = channel.queue_declare(queue=q, passive=True).message_count
            except Exception:  # noqa: BLE001 - an unknown queue: empty (AMQP closes the channel, so open another)
                out[q] = 0
                channel = conn.channel()
    return out


def queue_depth(queue: str, timeout: float = 2.0) -> int | None:
    """Messages waiting on `queue`, or None when the broker cannot say."""
    try:
        return queue_depths((queue,), timeout)[queue]
    except Exception:  # noqa: BLE001
        return None


def workers_alive(timeout: float = 1.0) -> list[str]:
    """Names of the workers that answer a ping within `timeout` seconds (a solo worker busy with a task cannot
    answer: `app.leases.live_workers` reads the heartbeats they write from a thread instead)."""
    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception:
        return []
    return [name for r in replies for name in r]


class _Housekeeper:
    """In every worker, a thread that once per half lease period writes the worker's heartbeat and runs the sweeper
    (app/leases.py), so lost shards come back as long as any worker lives."""

    def __init__(self, name: str, queues: str):
        import threading

        self.name, self.queues = name, queues
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="reco-housekeeper", daemon=True)

    def run(self) -> None:
        import logging

        from app.build import sweep_queued
        from app.leases import beat_worker
        from workers.tasks import runtime

        log = logging.getLogger("reco.housekeeper")
        rt = runtime()
        period = max(0.5, rt.settings.lease_s / 2)
        while True:
            try:
                beat_worker(rt, self.name, self.queues)
                sweep_queued(rt)
            except Exception as exc:  # noqa: BLE001 - a database or broker outage: try again next period
                log.warning("housekeeping failed: %s", scrub(str(exc), settings.database_url, settings.broker_url))
            if self.stop.wait(period):
                return


_housekeeper: _Housekeeper | None = None


@worker_ready.connect
def _start_housekeeping(sender=None, **_):
    global _housekeeper
    import open_clip  # noqa: F401 - imported once now, not inside the first task (seconds on a loaded machine)

    try:
        queues = ",".join(sorted(sender.app.amqp.queues.consume_from or ())) or "ingest,train"
    except Exception:  # noqa: BLE001 - only shown by `reco status`
        queues = "ingest,train"
    _housekeeper = _Housekeeper(sender.hostname, queues)
    _housekeeper.thread.start()


@worker_shutdown.connect
def _stop_housekeeping(**_):
    if _housekeeper is None:
        return
    _housekeeper.stop.set()
    try:
        from app.leases import forget_worker
        from workers.tasks import runtime

        forget_worker(runtime(), _housekeeper.name)
    except Exception:  # noqa: BLE001 - its heartbeat ages out anyway
        pass
