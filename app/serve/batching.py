"""Dynamic batching: concurrent requests gathered into one backbone batch.

A batch starts with the first waiting request and takes more until it holds `max_batch` items or `max_wait`
seconds have passed; while the model works on one batch the next one fills up, so under load batches grow by
themselves and a lone request waits at most `max_wait`. A request is never split across batches: every item of
one answer comes from one pass, hence from one memory version.
"""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import Executor
from typing import Any, Callable, Sequence


class Batcher:
    def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], executor: Executor, *, max_batch: int,
                 max_wait: float, size: Callable[[Any], int] = len, on_batch: Callable[[int], None] | None = None):
        """run(jobs) -> one result (or exception) per job, called in `executor`; size(job) counts a job's items."""
        self.run, self.executor, self.size = run, executor, size
        self.max_batch, self.max_wait = max_batch, max_wait
        self.on_batch = on_batch
        self._waiting: collections.deque = collections.deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="reco-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, job: Any) -> Any:
        self.start()
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((job, future))
        self._arrived.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            batch = [self._waiting.popleft()]
            items = self.size(batch[0][0])
            deadline = loop.time() + self.max_wait
            while items < self.max_batch:
                if not self._waiting:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except asyncio.TimeoutError:
                        break
                    continue
                n = self.size(self._waiting[0][0])
                if items + n > self.max_batch:
                    break  # the next request starts the next batch, whole
                batch.append(self._waiting.popleft())
                items += n
            batch = [(job, future) for job, future in batch if not future.cancelled()]  # clients gone
            if not batch:
                continue
            if self.on_batch:
                self.on_batch(sum(self.size(job) for job, _ in batch))
            try:
                results = await loop.run_in_executor(self.executor, self.run, [job for job, _ in batch])
            except Exception as exc:  # every request of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):  # one request's own problem
                    future.set_exception(result)
                else:
                    future.set_result(result)
