"""Sending work by task name: the library's side of the task queue (the Celery app and its task wrappers are in
workers/, which the library never imports).

`dispatcher(rt)` picks the implementation from the runtime's settings: `InProcessDispatcher` when no broker is set
(the embedded profile runs a task's body here and now), `CeleryDispatcher` otherwise, which puts a message for the
task's name on the task's queue through a Celery client made from the settings (`Celery.send_task`: no task code
is imported to send one). The names and queues are in `TASKS`; workers/ registers its tasks and routes under the
same names from there, and `celery_config` is the configuration both sides share. The broker checks (`check`,
`queue_depths`, `workers_alive`) are here too, so the build, the sweeper and `reco status` ask the broker without
the worker's Celery app.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

from .errors import RecoError
from .settings import Settings, mask_url, scrub


class Task(NamedTuple):
    name: str  # the Celery task name the workers register
    queue: str  # the queue it is sent to (and the worker's route for it)


TASKS = {
    "ingest_shard": Task("reco.ingest_shard", "ingest"),  # args: (shard_id,)
    "train": Task("reco.train", "train"),  # args: (model_name,)
}
QUEUES = ("ingest", "train")


def task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def celery_config(settings: Settings) -> dict:
    """The Celery configuration of the workers' app (workers/celery_app.py) and of the library's sending client.

    acks_late + reject_on_worker_lost: a message is acknowledged only after its shard is done, so a worker that
    dies mid-shard leaves the message to be delivered again (the shard task is idempotent). Prefetch 1: a long
    shard never sits queued behind another on a busy worker."""
    return dict(
        broker_url=settings.broker_url or "memory://",
        result_backend=settings.result_backend or None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="ingest",
        task_routes={t.name: {"queue": t.queue} for t in TASKS.values()},
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        broker_connection_retry_on_startup=True,
        # an unacknowledged message (its worker died) is delivered again after this many seconds (Redis/SQS)
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        worker_hijack_root_logger=False,
    )


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def celery_client(settings: Settings):
    """A Celery app that only sends and asks (it registers no task), one per broker setting in this process."""
    key = (settings.broker_url, settings.result_backend, settings.visibility_timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            from celery import Celery

            client = Celery("reco", set_as_current=False)
            client.conf.update(celery_config(settings))
            _clients[key] = client
        return client


def check_broker(settings: Settings, timeout: float = 3.0, app=None) -> None:
    """Fail fast with one line when the broker does not answer (Celery would otherwise retry for minutes)."""
    app = app or celery_client(settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:
        raise RecoError(
            f"cannot reach the task broker at {mask_url(settings.broker_url)} ({scrub(str(exc), settings.broker_url)}); "
            "check RECO_BROKER_URL and that Redis or RabbitMQ is running"
        ) from exc


def queue_depths(settings: Settings, queues=QUEUES, timeout: float = 2.0, app=None) -> dict[str, int]:
    """Messages waiting on each queue (not counting those a worker holds); a queue nobody declared yet holds
    none. Raises when the broker cannot be reached."""
    app = app or celery_client(settings)
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


def queue_depth(settings: Settings, queue: str, timeout: float = 2.0, app=None) -> int | None:
    """Messages waiting on `queue`, or None when the broker cannot say."""
    try:
        return queue_depths(settings, (queue,), timeout, app=app)[queue]
    except Exception:  # noqa: BLE001
        return None


def workers_alive(settings: Settings, timeout: float = 1.0, app=None) -> list[str]:
    """Names of the workers that answer a ping within `timeout` seconds (a solo worker busy with a task cannot
    answer: `app.leases.live_workers` reads the heartbeats they write from a thread instead)."""
    app = app or celery_client(settings)
    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception:
        return []
    return [name for r in replies for name in r]


class Dispatcher:
    """Sends a task by name (`send("ingest_shard", shard_id)`, `send("train", model_name)`) and says what the
    queue knows."""

    in_process: bool

    def send(self, name: str, *args):
        raise NotImplementedError

    def check(self, timeout: float = 3.0) -> None:
        """Raise a RecoError when tasks cannot be sent."""

    def queue_depth(self, queue: str, timeout: float = 2.0) -> int | None:
        """Messages waiting on `queue`, or None when nobody can say."""
        return None

    def queue_depths(self, queues=QUEUES, timeout: float = 2.0) -> dict[str, int]:
        return {}

    def workers_alive(self, timeout: float = 1.0) -> list[str]:
        return []


class InProcessDispatcher(Dispatcher):
    """The embedded profile: the task's body runs in this process when sent; `send` returns what it returns."""

    in_process = True

    def __init__(self, rt):
        self.rt = rt

    def send(self, name: str, *args):
        task(name)
        if name == "ingest_shard":
            from .ingest import run_shard

            return run_shard(self.rt, *args)
        from .train import run_training

        return run_training(self.rt, *args)


class CeleryDispatcher(Dispatcher):
    """The distributed profile: a message on the task's queue, for the workers; `send` returns its task id."""

    in_process = False

    def __init__(self, settings: Settings):
        self.settings = settings

    @property
    def app(self):
        return celery_client(self.settings)

    def send(self, name: str, *args) -> str:
        t = task(name)
        return self.app.send_task(t.name, args=args, queue=t.queue).id

    def check(self, timeout: float = 3.0) -> None:
        check_broker(self.settings, timeout, app=self.app)

    def queue_depth(self, queue: str, timeout: float = 2.0) -> int | None:
        return queue_depth(self.settings, queue, timeout, app=self.app)

    def queue_depths(self, queues=QUEUES, timeout: float = 2.0) -> dict[str, int]:
        return queue_depths(self.settings, queues, timeout, app=self.app)

    def workers_alive(self, timeout: float = 1.0) -> list[str]:
        return workers_alive(self.settings, timeout, app=self.app)


def dispatcher(rt) -> Dispatcher:
    """In-process without a broker (`RECO_BROKER_URL` unset), Celery with one."""
    return InProcessDispatcher(rt) if rt.settings.in_process_tasks else CeleryDispatcher(rt.settings)
