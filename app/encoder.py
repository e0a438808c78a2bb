"""Inference: `RecoEncoder` refines frozen CLIP embeddings with knowledge retrieved from a memory.

By default the memory is the model's training memory *name*, resolved on every call: activating another version
of it changes what the model retrieves from on its next call, with no retraining and no reload.

The collection last read stays open in the store between calls (opening an embedded shard costs far more than a
query) and is let go after KEEP_OPEN_S seconds without a call, when another version becomes the one to read, and
on `close()` (or the end of a `with` block), so that other processes on the machine get their turn at it. A
memory that is slow to open (a large embedded shard) is kept ten times as long as opening it took, so calls that
are themselves slow (a batch of 64 images on a CPU) do not reopen it every time.

Where RECO_DEVICE_SEARCH allows (app/device_search.py), searches run exactly on the model's device over a copy of
the version read once; the copy is dropped when another version becomes the one read, and on `close()`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import checkpoint as checkpoint_files
from .db.models import FusionModel, ModelStatus
from .errors import NotFound, RecoError
from .retrieval import retrieve
from .runtime import Runtime

KEEP_OPEN_S = 10.0  # seconds an encoder keeps its memory open after its last call (at least)
KEEP_OPEN_COST_FACTOR = 10  # ... and at least this many times what opening it cost (a 1M-item shard: ~6 s)
CHECKPOINTS = ("best", "start")  # the trained pick, or the same layers at step 0

log = logging.getLogger(__name__)


@dataclass
class Timing:
    encode: float = 0.0
    search: float = 0.0
    fuse: float = 0.0


class _KeepOpen:
    """One collection of the store held open between calls (`store.hold`), let go after `idle` seconds unused.

    An embedded shard is loaded, then flushed and closed, by every call that finds it closed: about 0.5 s at 100k
    items against ~10 ms for the query itself (benchmarks/inference.py). A server store's hold is a no-op.
    """

    def __init__(self, rt: Runtime, idle: float):
        self.rt, self.idle, self.base_idle = rt, idle, idle
        self._lock = threading.Lock()
        self._collection: str | None = None
        self._stack: contextlib.ExitStack | None = None
        self._last = 0.0
        self._watcher: threading.Thread | None = None

    def use(self, collection: str) -> None:
        with self._lock:
            self._last = time.monotonic()
            if collection == self._collection:
                return
            self._release()
            stack = contextlib.ExitStack()
            t0 = time.monotonic()
            stack.enter_context(self.rt.store.hold(collection))
            self.idle = max(self.base_idle, KEEP_OPEN_COST_FACTOR * (time.monotonic() - t0))
            self._last = time.monotonic()
            self._collection, self._stack = collection, stack
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="reco-keep-open", daemon=True)
                self._watcher.start()

    def close(self) -> None:
        with self._lock:
            self._release()

    def _release(self) -> None:
        stack, self._stack, self._collection = self._stack, None, None
        if stack is not None:
            stack.close()

    def _watch(self) -> None:
        while True:
            with self._lock:
                left = self._last + self.idle - time.monotonic()
                if self._stack is None or left <= 0:
                    self._watcher = None
                    try:
                        self._release()
                    except Exception as exc:  # nobody to raise to: the next call opens the collection again
                        log.warning("closing memory collection after %.0fs idle failed: %s", self.idle, exc)
                    return
            time.sleep(left)


class RecoEncoder:
    def __init__(self, rt: Runtime, model_row: dict, fusion, backbone, memory: str, memory_version: int | None,
                 device: str, image_retrieval: bool = True, text_retrieval: bool = True, checkpoint: str = "best"):
        self.rt = rt
        self.info = model_row
        self.fusion = fusion
        self.backbone = backbone
        self.memory = memory
        self.memory_version = memory_version
        self.device = device
        self.image_retrieval = image_retrieval
        self.text_retrieval = text_retrieval
        self.timing = Timing()
        self.checkpoint = checkpoint
        self._keep = _KeepOpen(rt, KEEP_OPEN_S)
        self._complete: set[str] = set()  # collections whose point count was checked
        self._searched: str | None = None  # the collection last searched (its device copy, if any, is ours)
        weakref.finalize(self, self._keep.close)
        cfg = model_row["config"]["job"]["train"]
        self.k, self.search, self.fusion_mode = cfg["k"], cfg["search"], cfg["fusion"]

    @classmethod
    def load(cls, model_name: str, memory: str | None = None, runtime: Runtime | None = None,
             device: str | None = None, image_retrieval: bool = True, text_retrieval: bool = True,
             load_backbone: bool = True, checkpoint: str = "best") -> "RecoEncoder":
        """memory: NAME (follows its active version) or NAME@VERSION (pinned); default the training memory.
        checkpoint: "best" (the one training picked) or "start" (the same layers untrained: what training must
        beat)."""
        from .backbone import get_backbone, pick_device
        from .fusion import FusionConfig, build
        from .train import parse_memory_ref

        rt = runtime or Runtime()
        with rt.db.session() as s:
            row = s.query(FusionModel).filter_by(name=model_name).one_or_none()
            if row is None:
                raise NotFound(f"no model named {model_name!r} (see `reco model list`)")
            if row.status != ModelStatus.READY:
                raise RecoError(f"model {model_name} is {row.status}, not ready")
            info = {c: getattr(row, c) for c in ("name", "backbone", "backbone_hash", "dim", "memory_name",
                                                 "memory_version", "config", "checkpoint_dir", "metrics")}
        if checkpoint not in CHECKPOINTS:
            raise RecoError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, not {checkpoint!r}")
        tensors, meta = checkpoint_files.load(Path(info["checkpoint_dir"]), "best")
        device = pick_device(device or rt.settings.device)
        fusion = build(FusionConfig(**meta["fusion"]), meta["job"]["train"]["seed"])
        if checkpoint == "best":
            try:
                fusion.load_state_dict(tensors)
            except RuntimeError as exc:
                raise RecoError(f"checkpoint of {model_name} does not fit its config: {exc}") from exc
        fusion.to(device).eval()
        for p in fusion.parameters():
            p.requires_grad_(False)
        name, version = parse_memory_ref(memory) if memory else (info["memory_name"], None)
        bb = get_backbone(info["backbone"], device, rt.settings.offline) if load_backbone else None
        return cls(rt, info, fusion, bb, name, version, device, image_retrieval, text_retrieval, checkpoint)

    # -- memory ----------------------------------------------------------------------------------------------
    def resolve(self):
        """(collection, version row) the next call reads: one DB read, refused if the backbone differs."""
        from .memory import check_complete, resolve_collection

        collection, v = resolve_collection(self.rt, self.memory, self.memory_version)
        if v.backbone_hash != self.info["backbone_hash"]:
            raise RecoError(f"memory {self.memory} v{v.version} was embedded with {v.backbone}, model "
                            f"{self.info['name']} uses {self.info['backbone']}: they must share the backbone")
        if collection not in self._complete:  # once per collection: counting opens an embedded shard
            self._keep.use(collection)
            check_complete(self.rt, self.memory, collection, v)
            self._complete.add(collection)
        return collection, v

    def _collection(self) -> str:
        return self.resolve()[0]

    def close(self) -> None:
        """Let go of the memory now instead of KEEP_OPEN_S after the last call (the encoder stays usable), and of
        its device copy."""
        self._keep.close()
        self._drop_device_copy()

    def _drop_device_copy(self) -> None:
        searched, self._searched = self._searched, None
        if searched is not None:
            from . import device_search

            device_search.drop(self.rt.store, searched)

    def search_runs(self) -> str:
        """Where this encoder's searches of the version now active run, in words (GET /v1/models)."""
        from .device_search import where
        from .memory import resolve_collection

        collection, v = resolve_collection(self.rt, self.memory, self.memory_version)
        return where(self.rt.settings, self.device, self.rt.store, collection, v.items_stored, v.dim)

    def __enter__(self) -> "RecoEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- refinement --------------------------------------------------------------------------------------------
    def refine(self, embeddings: np.ndarray, side: str, collection: str | None = None) -> np.ndarray:
        """Refine frozen embeddings of one modality (side = image or text) with the memory."""
        import time

        import torch

        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.info["dim"]:
            raise RecoError(f"expected embeddings of shape (n, {self.info['dim']}), got {emb.shape}")
        t0 = time.perf_counter()
        collection = collection or self._collection()
        self._keep.use(collection)
        if collection != self._searched:  # a swap: the old version's device copy goes
            self._drop_device_copy()
            self._searched = collection
        nb = retrieve(self.rt.store, collection, emb, side, self.k, dim=self.info["dim"],
                      search=self.search, fusion=self.fusion_mode, device=self.device, settings=self.rt.settings)
        t1 = time.perf_counter()
        layer = self.fusion.image if side == "image" else self.fusion.text
        with torch.no_grad():
            out = layer(torch.from_numpy(emb).to(self.device), torch.from_numpy(nb.vectors).to(self.device),
                        torch.from_numpy(nb.scores).to(self.device), torch.from_numpy(nb.mask).to(self.device))
        res = out.float().cpu().numpy()
        self.timing.search += t1 - t0
        self.timing.fuse += time.perf_counter() - t1
        return res

    def encode_image(self, images: Sequence, refine: bool = True) -> np.ndarray:
        """Image embeddings: refined with the memory (when image retrieval is on), or the frozen baseline."""
        import time

        t0 = time.perf_counter()
        v = self.backbone.encode_images(images)
        self.timing.encode += time.perf_counter() - t0
        return self.refine(v, "image") if refine and self.image_retrieval else v

    def encode_text(self, texts: Sequence[str], refine: bool = True) -> np.ndarray:
        import time

        t0 = time.perf_counter()
        t = self.backbone.encode_texts(texts)
        self.timing.encode += time.perf_counter() - t0
        return self.refine(t, "text") if refine and self.text_retrieval else t
