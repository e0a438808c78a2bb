"""In every worker, a thread that once per half lease period writes the worker's heartbeat and runs the sweeper
(app/sweeper.py), so lost shards come back as long as any worker lives. The worker imports this module through the
Celery app's `include` (workers/celery_app.py), before it signals `worker_ready`."""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown

from app.settings import scrub

from .tasks import runtime

log = logging.getLogger("reco.housekeeper")


class Housekeeper:
    def __init__(self, name: str, queues: str):
        self.name, self.queues = name, queues
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="reco-housekeeper", daemon=True)

    def run(self) -> None:
        from app.leases import beat_worker
        from app.sweeper import sweep_queued

        rt = runtime()
        period = max(0.5, rt.settings.lease_s / 2)
        while True:
            try:
                beat_worker(rt, self.name, self.queues)
                sweep_queued(rt)
            except Exception as exc:  # noqa: BLE001 - a database or broker outage: try again next period
                log.warning("housekeeping failed: %s",
                            scrub(str(exc), rt.settings.database_url, rt.settings.broker_url))
            if self.stop.wait(period):
                return


_housekeeper: Housekeeper | None = None


@worker_ready.connect
def _start_housekeeping(sender=None, **_):
    global _housekeeper
    import open_clip  # noqa: F401 - imported once now, not inside the first task (seconds on a loaded machine)

    try:
        queues = ",".join(sorted(sender.app.amqp.queues.consume_from or ())) or "ingest,train"
    except Exception:  # noqa: BLE001 - only shown by `reco status`
        queues = "ingest,train"
    _housekeeper = Housekeeper(sender.hostname, queues)
    _housekeeper.thread.start()


@worker_shutdown.connect
def _stop_housekeeping(**_):
    if _housekeeper is None:
        return
    _housekeeper.stop.set()
    try:
        from app.leases import forget_worker

        forget_worker(runtime(), _housekeeper.name)
    except Exception:  # noqa: BLE001 - its heartbeat ages out anyway
        pass
