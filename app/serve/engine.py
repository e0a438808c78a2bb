"""One served model: its `RecoEncoder`, a batcher per modality, and the work behind each route.

All model and store work of a model runs on one thread of its own (torch uses its own threads within a call),
so batches never race each other for the encoder's open collection; decoding and preprocessing images run
beside it on the event loop's thread pool. Each batch reads the active memory version once (one DB read), so a
`reco memory activate` anywhere is picked up by the next batch, and every answer comes from one version.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..encoder import KEEP_OPEN_S, RecoEncoder, _KeepOpen
from ..errors import NotFound, RecoError
from .batching import Batcher
from .metrics import ServeMetrics
from .settings import ServeSettings

PROMPT_CACHE = 64  # class-prompt sets kept encoded (the search page asks the same classes again and again)


@dataclass
class Job:
    items: object  # a [n, 3, H, W] pixel tensor, or a list of texts
    n: int
    refine: bool


@dataclass
class Encoded:
    frozen: np.ndarray
    refined: np.ndarray | None
    memory: str
    version: int
    collection: str


def _items(job: Job) -> int:
    return job.n


class ServedModel:
    def __init__(self, name: str, rt, settings: ServeSettings, metrics: ServeMetrics):
        self.name, self.rt, self.metrics = name, rt, metrics
        self.encoder = RecoEncoder.load(name, runtime=rt)
        self.backbone = self.encoder.backbone
        self.logit_scale = float(self.backbone.model.logit_scale.exp())  # softmax temperature of its zero-shot
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"reco-model-{name}")
        wait = settings.max_wait_ms / 1000
        self.batchers = {
            side: Batcher(self._run_images if side == "image" else self._run_texts, self.executor,
                          max_batch=settings.max_batch, max_wait=wait, size=_items,
                          on_batch=lambda n, side=side: metrics.batch_size.labels(name, side).observe(n))
            for side in ("image", "text")
        }
        self._prompts: OrderedDict = OrderedDict()
        self.chunk = settings.max_batch  # prompts per batch of a classification's class weights
        # the collection /v1/search last read stays open as the encoder's does for embed: an embedded shard costs
        # far more to open than to query, and search-only traffic never calls the encoder (store holds nest)
        self._search_keep = _KeepOpen(rt, KEEP_OPEN_S)

    # -- description -----------------------------------------------------------------------------------------
    def describe(self) -> dict:
        info = self.encoder.info
        return {"name": self.name, "backbone": info["backbone"], "dim": info["dim"], "k": self.encoder.k,
                "memory": self.encoder.memory, "search": self.encoder.search, "fusion": self.encoder.fusion_mode}

    def search_runs(self) -> str | None:
        """Where the model's memory searches run: "device (cuda, exact)", "store (hnsw)", "store (exact)"; None
        while the memory has no version to read."""
        try:
            return self.encoder.search_runs()
        except RecoError:
            return None

    async def stop(self) -> None:
        for b in self.batchers.values():
            await b.stop()
        self.executor.shutdown(wait=True)
        self._search_keep.close()
        self.encoder.close()

    # -- the batched work (model thread) -------------------------------------------------------------------
    def _resolve(self) -> tuple[str, object]:
        collection, v = self.encoder.resolve()
        self.metrics.memory_version.labels(self.name, self.encoder.memory).set(v.version)
        return collection, v

    def _finish(self, jobs: list[Job], frozen: np.ndarray, side: str) -> list[Encoded]:
        collection, v = self._resolve()
        rows = np.concatenate([np.full(j.n, j.refine) for j in jobs]) if jobs else np.zeros(0, bool)
        refined = None
        if rows.any():
            before = (self.encoder.timing.search, self.encoder.timing.fuse)
            refined = self.encoder.refine(frozen[rows], side, collection=collection)
            self.metrics.stage.labels(self.name, "search").observe(self.encoder.timing.search - before[0])
            self.metrics.stage.labels(self.name, "fuse").observe(self.encoder.timing.fuse - before[1])
        out, start, start_refined = [], 0, 0
        for j in jobs:
            mine = None
            if j.refine:
                mine = refined[start_refined:start_refined + j.n]
                start_refined += j.n
            out.append(Encoded(frozen[start:start + j.n], mine, self.encoder.memory, v.version, collection))
            start += j.n
        return out

    def _run_images(self, jobs: list[Job]) -> list[Encoded]:
        import torch

        t0 = time.perf_counter()
        frozen = self.backbone.encode_image_tensor(torch.cat([j.items for j in jobs]))
        self.metrics.stage.labels(self.name, "encode").observe(time.perf_counter() - t0)
        return self._finish(jobs, frozen, "image")

    def _run_texts(self, jobs: list[Job]) -> list[Encoded]:
        t0 = time.perf_counter()
        frozen = self.backbone.encode_texts([t for j in jobs for t in j.items])
        self.metrics.stage.labels(self.name, "encode").observe(time.perf_counter() - t0)
        return self._finish(jobs, frozen, "text")

    # -- what the routes call (event loop) -----------------------------------------------------------------
    def preprocess(self, images: list) -> object:
        """PIL images -> a pixel tensor (runs on the thread pool, beside the model thread)."""
        return self.backbone.preprocess_images(images)

    def decode_and_preprocess(self, raw: list[bytes], decode) -> object:
        """Image bytes -> a pixel tensor, one image at a time (thread pool): one full-size picture in memory per
        request, never all of them."""
        import torch

        return torch.cat([self.backbone.preprocess_images([decode(blob, i)]) for i, blob in enumerate(raw)])

    async def embed(self, side: str, items, n: int, refine: bool) -> Encoded:
        return await self.batchers[side].submit(Job(items, n, refine))

    async def check(self) -> None:
        """The model's memory can be read now (the readiness probe)."""
        await self._in_model_thread(self._resolve)

    async def _in_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def class_weights(self, classes: list[str], templates: list[str], collection: str) -> tuple:
        """(frozen, refined) [C, D] zero-shot weights, the refined ones from `collection` (the images' version)."""
        from ..metrics import zero_shot_weights

        prompts = tuple(t.format(c=c) for c in classes for t in templates)
        key = (prompts, collection)
        if key not in self._prompts:
            # one batch of `chunk` prompts at a time: other requests' batches run between them, so a large class
            # set slows itself, not the server
            frozen, refined = [], []
            for i in range(0, len(prompts), self.chunk):
                part = list(prompts[i:i + self.chunk])
                frozen.append((await self.embed("text", part, len(part), refine=False)).frozen)
                refined.append(await self._in_model_thread(self.encoder.refine, frozen[-1], "text", collection))
            frozen, refined = np.concatenate(frozen), np.concatenate(refined)
            self._prompts[key] = (zero_shot_weights(frozen, len(classes), len(templates)),
                                  zero_shot_weights(refined, len(classes), len(templates)))
            while len(self._prompts) > PROMPT_CACHE:
                self._prompts.popitem(last=False)
        self._prompts.move_to_end(key)
        return self._prompts[key]

    async def search(self, side: str, query: Encoded, memory: str | None, k: int) -> tuple[list, object]:
        return await self._in_model_thread(self._search, side, query.frozen, memory, k)

    def _search(self, side: str, q: np.ndarray, memory: str | None, k: int):
        from ..memory import check_complete, resolve_collection
        from ..train import parse_memory_ref

        name, version = parse_memory_ref(memory) if memory else (self.encoder.memory, None)
        if name == self.encoder.memory and version is None:
            collection, v = self._resolve()  # the encoder's own memory: checked once
        else:
            collection, v = self._resolve_other(name, version)
            if v.backbone_hash != self.encoder.info["backbone_hash"]:
                raise BackboneMismatch(f"memory {name} v{v.version} was embedded with {v.backbone}; model "
                                       f"{self.name} uses {self.encoder.info['backbone']}: search a memory of the "
                                       "same backbone")
            self._search_keep.use(collection)  # before counting its points: one open, not two
            check_complete(self.rt, name, collection, v)
        self._search_keep.use(collection)
        t0 = time.perf_counter()
        hits = self.rt.store.search(collection, q, using=side, k=k)[0]
        self.metrics.stage.labels(self.name, "search").observe(time.perf_counter() - t0)
        return hits, (name, v.version)

    def _resolve_other(self, name: str, version: int | None):
        """A memory the request names: what the client got wrong is a 4xx (a class set's name, a version that is
        not ready), not the server's 503."""
        from ..memory import get_memory, resolve_collection

        with self.rt.db.session() as s:
            try:
                get_memory(s, name)
            except NotFound:
                raise
            except RecoError as exc:  # a class set of that name
                raise Refused(422, f"memory: {exc}") from exc
        try:
            return resolve_collection(self.rt, name, version)
        except NotFound:
            raise
        except RecoError as exc:  # e.g. a version still building
            raise Refused(409, str(exc)) from exc


class BackboneMismatch(RecoError):
    """A memory embedded with another backbone than the model's."""


class Refused(RecoError):
    """A request the server cannot answer because of what it asked for (its `status` is the HTTP answer)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
