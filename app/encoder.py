"""Inference: `RecoEncoder` refines frozen CLIP embeddings with knowledge retrieved from a memory.

By default the memory is the model's training memory *name*, resolved on every call: activating another version
of it changes what the model retrieves from on its next call, with no retraining and no reload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import checkpoint
from .db.models import FusionModel, ModelStatus
from .errors import NotFound, RecoError
from .retrieval import retrieve
from .runtime import Runtime


@dataclass
class Timing:
    encode: float = 0.0
    search: float = 0.0
    fuse: float = 0.0


class RecoEncoder:
    def __init__(self, rt: Runtime, model_row: dict, fusion, backbone, memory: str, memory_version: int | None,
                 device: str, image_retrieval: bool = True, text_retrieval: bool = True):
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
        cfg = model_row["config"]["job"]["train"]
        self.k, self.search, self.fusion_mode = cfg["k"], cfg["search"], cfg["fusion"]

    @classmethod
    def load(cls, model_name: str, memory: str | None = None, runtime: Runtime | None = None,
             device: str | None = None, image_retrieval: bool = True, text_retrieval: bool = True,
             load_backbone: bool = True) -> "RecoEncoder":
        """memory: NAME (follows its active version) or NAME@VERSION (pinned); default the training memory."""
        from .backbone import get_backbone, pick_device
        from .fusion import FusionConfig, RecoFusion
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
        tensors, meta = checkpoint.load(__import__("pathlib").Path(info["checkpoint_dir"]), "best")
        device = pick_device(device or rt.settings.device)
        fusion = RecoFusion(FusionConfig(**meta["fusion"]))
        try:
            fusion.load_state_dict(tensors)
        except RuntimeError as exc:
            raise RecoError(f"checkpoint of {model_name} does not fit its config: {exc}") from exc
        fusion.to(device).eval()
        for p in fusion.parameters():
            p.requires_grad_(False)
        name, version = parse_memory_ref(memory) if memory else (info["memory_name"], None)
        bb = get_backbone(info["backbone"], device, rt.settings.offline) if load_backbone else None
        return cls(rt, info, fusion, bb, name, version, device, image_retrieval, text_retrieval)

    # -- memory ----------------------------------------------------------------------------------------------
    def resolve(self):
        """(collection, version row) the next call reads: one DB read, refused if the backbone differs."""
        from .memory import resolve_collection

        collection, v = resolve_collection(self.rt, self.memory, self.memory_version)
        if v.backbone_hash != self.info["backbone_hash"]:
            raise RecoError(f"memory {self.memory} v{v.version} was embedded with {v.backbone}, model "
                            f"{self.info['name']} uses {self.info['backbone']}: they must share the backbone")
        return collection, v

    def _collection(self) -> str:
        return self.resolve()[0]

    # -- refinement --------------------------------------------------------------------------------------------
    def refine(self, embeddings: np.ndarray, side: str, collection: str | None = None) -> np.ndarray:
        """Refine frozen embeddings of one modality (side = image or text) with the memory."""
        import time

        import torch

        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.info["dim"]:
            raise RecoError(f"expected embeddings of shape (n, {self.info['dim']}), got {emb.shape}")
        t0 = time.perf_counter()
        nb = retrieve(self.rt.store, collection or self._collection(), emb, side, self.k, dim=self.info["dim"],
                      search=self.search, fusion=self.fusion_mode)
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
