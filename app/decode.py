"""Decode, preprocess and tokenize ingestion batches: inline, or in a pool of worker processes.

A single Python thread decodes and preprocesses about 160 JPEGs/s; a GPU's image tower takes thousands, so on an
accelerator the CPU work runs in worker processes. Workers only decode, run the backbone's CPU `preprocess`
and tokenize captions: they never touch CUDA (the parent moves each batch to the device). Results come back in
submission order, so ingestion's order and skip accounting are the same with or without a pool.
"""

from __future__ import annotations

import atexit
import io
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from .errors import TransientError

MAX_AUTO_WORKERS = 16
LOOKAHEAD = 2  # batches a pool decodes ahead of the one being encoded


def decode_image(data: bytes | None):
    """The RGB image in `data`, or None when it is not a readable image (truncated, garbage, empty)."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # force the full decode: truncated files fail here, not later
        return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def decode_workers(setting: int | None, device: str, cpus: int | None = None) -> int:
    """Worker processes for decoding (RECO_DECODE_WORKERS; None = auto, 0 = inline in the calling thread).

    Auto: 0 when the CPU encodes. torch's intra-op threads already occupy every core, and a worker process only
    contends with them: measured on 2 cores, inline was faster than a thread or a worker process
    (benchmarks/ingest.py, `_overlap` in app/ingest.py). On an accelerator the cores are otherwise idle while
    one thread decodes ~160 items/s against an image tower taking 7,000-18,000/s (H200): one worker per core,
    less one for the parent that feeds the device, at most 16.
    """
    if setting is not None:
        return setting
    if str(device).startswith("cpu"):
        return 0
    return max(0, min(MAX_AUTO_WORKERS, (cpus or os.cpu_count() or 1) - 1))


@dataclass
class Prepared:
    """One batch made ready: ok[i] says whether image i decoded; pixels hold the ok rows only (in order),
    tokens every row."""

    ok: list[bool]
    pixels: "torch.Tensor | None"  # noqa: F821
    tokens: "torch.Tensor | None"  # noqa: F821


def prepare(preprocess, tokenizer, blobs: list, captions: list) -> Prepared:
    """Decode and preprocess images, tokenize captions: the work of one chunk, in a worker or inline."""
    import torch

    ims = [decode_image(b) for b in blobs]
    good = [preprocess(im) for im in ims if im is not None]
    return Prepared(ok=[im is not None for im in ims], pixels=torch.stack(good) if good else None,
                    tokens=tokenizer(list(captions)) if captions else None)


_worker: dict = {}  # a worker process's preprocess and tokenizer, set once when it starts


def _init_worker(preprocess, tokenizer) -> None:
    import torch

    torch.set_num_threads(1)  # N workers x all-core intra-op pools would oversubscribe the machine
    _worker.update(preprocess=preprocess, tokenizer=tokenizer)


def _prepare_in_worker(blobs: list, captions: list) -> Prepared:
    return prepare(_worker["preprocess"], _worker["tokenizer"], blobs, captions)


class DecodePool:
    """Prepares batches (decode + preprocess + tokenize) in `workers` processes, or inline when workers is 0.

    `submit` returns a future at once; its result is the batch's `Prepared`, rows in submission order. A pool
    splits a batch into one chunk per worker. pin: assemble pooled batches in page-locked memory, for the
    asynchronous copy to a CUDA device. Processes start with 'spawn': forking a parent that runs torch's thread
    pools can deadlock the child.
    """

    def __init__(self, preprocess, tokenizer, workers: int = 0, pin: bool = False):
        self.preprocess, self.tokenizer, self.workers, self.pin = preprocess, tokenizer, workers, pin
        self.lookahead = LOOKAHEAD if workers else 0
        self._executor = None
        if workers:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(preprocess, tokenizer))

    def submit(self, blobs: list, captions: list) -> "Future | _Joined":
        if self._executor is None:
            done: Future = Future()
            p = prepare(self.preprocess, self.tokenizer, blobs, captions)
            if self.pin and p.pixels is not None:
                p.pixels = p.pixels.pin_memory()
            done.set_result(p)
            return done
        size = max(1, -(-len(blobs) // self.workers))
        return _Joined([self._executor.submit(_prepare_in_worker, blobs[a:a + size], captions[a:a + size])
                        for a in range(0, len(blobs), size)], self.pin)

    @property
    def broken(self) -> bool:
        return bool(self._executor is not None and getattr(self._executor, "_broken", False))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


class _Joined:
    """The chunks of one pooled batch, joined in order when asked for."""

    def __init__(self, futures: list, pin: bool):
        self.futures, self.pin = futures, pin

    def result(self) -> Prepared:
        from concurrent.futures.process import BrokenProcessPool

        try:
            parts = [f.result() for f in self.futures]
        except BrokenProcessPool as exc:
            raise TransientError(f"a decode worker process died ({exc}); lower RECO_DECODE_WORKERS if memory "
                                 "ran out") from exc
        return Prepared(ok=[o for p in parts for o in p.ok],
                        pixels=_join([p.pixels for p in parts if p.pixels is not None], self.pin),
                        tokens=_join([p.tokens for p in parts if p.tokens is not None], False))


def _join(tensors: list, pin: bool):
    """Concatenate in order, into page-locked memory when pin (one copy either way)."""
    import torch

    if not tensors:
        return None
    if len(tensors) == 1 and not pin:
        return tensors[0]
    shape = (sum(len(t) for t in tensors), *tensors[0].shape[1:])
    out = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=pin)
    return torch.cat(tensors, out=out)


_pools: dict[tuple, tuple] = {}  # (id(backbone), workers) -> (backbone, pool): the reference keeps the id unique
_pools_lock = threading.Lock()


def decode_pool(backbone, workers: int) -> DecodePool:
    """The process's pool for a backbone: worker processes start once and serve every shard it ingests."""
    pin = str(backbone.device).startswith("cuda")
    if not workers:
        return DecodePool(backbone.preprocess, backbone.tokenizer, 0, pin)
    key = (id(backbone), workers)
    with _pools_lock:
        owner, pool = _pools.get(key, (None, None))
        if owner is not backbone or pool.broken:
            if pool is not None:
                pool.close()
            pool = DecodePool(backbone.preprocess, backbone.tokenizer, workers, pin)
            _pools[key] = (backbone, pool)
        return pool


@atexit.register
def _close_pools() -> None:
    """Stop the workers while the interpreter is whole (a pool collected during shutdown logs a traceback)."""
    with _pools_lock:
        for _, pool in _pools.values():
            pool.close()
        _pools.clear()
