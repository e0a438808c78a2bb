"""Zero-shot evaluation: frozen baseline and RECO in one run, reusing the backbone encodings, for a list of k.

Every run is stored: a row in the metadata DB and a JSON result shaped like CLIP_benchmark's (dataset, model,
pretrained, task, metrics) plus RECO's fields (baseline, per-k RECO metrics, memory version, leakage guard,
timings, and the per-query details the gallery shows).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import __version__
from .db.models import Evaluation, utcnow
from .errors import NotFound, RecoError
from .guard import LeakageGuard
from .metrics import classification_metrics, retrieval_metrics, zero_shot_weights
from .retrieval import Neighbours, retrieve

RETRIEVAL_CHOICES = ("both", "image", "text", "none")


def _load_images(paths, counts: Counter):
    from PIL import Image, UnidentifiedImageError

    out, keep = [], []
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im.load()
                out.append(im.convert("RGB"))
            keep.append(i)
        except (FileNotFoundError, IsADirectoryError):
            counts["missing_image"] += 1
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            counts["corrupt_image"] += 1
    return out, keep


def encode_images(backbone, paths: list[str], batch_size: int = 64):
    """(embeddings [n_ok, D], indices of the readable paths, skip counts)."""
    counts: Counter = Counter()
    embs, kept = [], []
    for start in range(0, len(paths), batch_size):
        images, keep = _load_images(paths[start : start + batch_size], counts)
        if images:
            embs.append(backbone.encode_images(images, batch_size=batch_size))
            kept += [start + i for i in keep]
    if not embs:
        raise RecoError("no evaluation image could be read")
    return np.concatenate(embs), np.array(kept), counts


def _opener(paths: list[str], kept: np.ndarray):
    from PIL import Image

    def load(i: int):
        with Image.open(paths[kept[i]]) as im:
            return im.convert("RGB")

    return load


def _fuse(layer, emb: np.ndarray, nb: Neighbours, k: int, device) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = layer(torch.from_numpy(emb).to(device), torch.from_numpy(np.ascontiguousarray(nb.vectors[:, :k])).to(device),
                    torch.from_numpy(np.ascontiguousarray(nb.scores[:, :k])).to(device),
                    torch.from_numpy(np.ascontiguousarray(nb.mask[:, :k])).to(device))
    return out.float().cpu().numpy()


class _Side:
    """Retrieval once at the largest k, then fusion for every k (neighbours are sorted, so k' < k is a slice)."""

    def __init__(self, enc, collection: str, side: str, emb: np.ndarray, k_max: int, exclude, timing: dict):
        t0 = time.perf_counter()
        ex = [exclude] * len(emb) if exclude else None
        self.nb = retrieve(enc.rt.store, collection, emb, side, k_max, dim=emb.shape[1], search=enc.search,
                           fusion=enc.fusion_mode, exclude=ex)
        timing["search"] += time.perf_counter() - t0
        self.enc, self.side, self.emb, self.timing = enc, side, emb, timing

    def refined(self, k: int) -> np.ndarray:
        t0 = time.perf_counter()
        layer = self.enc.fusion.image if self.side == "image" else self.enc.fusion.text
        out = _fuse(layer, self.emb, self.nb, k, self.enc.device)
        self.timing["fuse"] += time.perf_counter() - t0
        return out


def _check_ks(ks: list[int], model_k: int) -> list[int]:
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise RecoError("-k takes positive integers, e.g. -k 1,5,10")
    if ks[-1] > model_k:
        raise RecoError(f"k={ks[-1]} is larger than the model's k={model_k} (its rank embeddings stop there)")
    return ks


def evaluate_classification(rt, model: str, dataset: str, memory: str | None = None, ks=None,
                            retrieval: str = "both", guard: bool = True, seed: int = 0, batch_size: int = 64,
                            classnames: str | None = None, templates: str | None = None,
                            progress: bool = False, checkpoint: str = "best") -> dict:
    from .datasets import load_classification
    from .encoder import RecoEncoder

    if retrieval not in RETRIEVAL_CHOICES:
        raise RecoError(f"--retrieval must be one of {', '.join(RETRIEVAL_CHOICES)}")
    np.random.seed(seed)
    ds = load_classification(dataset, classnames, templates)
    enc = RecoEncoder.load(model, memory=memory, runtime=rt, checkpoint=checkpoint)
    ks = _check_ks(ks or [enc.k], enc.k)
    collection, version = enc.resolve()
    timing = {"encode": 0.0, "search": 0.0, "fuse": 0.0}

    t0 = time.perf_counter()
    paths = [p for p, _ in ds.samples]
    v, kept, skipped = encode_images(enc.backbone, paths, batch_size)
    labels = np.array([ds.samples[i][1] for i in kept])
    prompts = [t.format(c=c) for c in ds.classnames for t in ds.templates]
    t = enc.backbone.encode_texts(prompts)
    timing["encode"] += time.perf_counter() - t0

    lg = LeakageGuard(rt.store, collection, enabled=guard)
    excluded = lg.find(v, _opener(paths, kept))
    n_c, n_t = len(ds.classnames), len(ds.templates)
    base_logits = v @ zero_shot_weights(t, n_c, n_t).T
    results = {"baseline": classification_metrics(base_logits, labels), "reco": {}}
    img_side = _Side(enc, collection, "image", v, ks[-1], excluded, timing) if retrieval in ("both", "image") else None
    txt_side = _Side(enc, collection, "text", t, ks[-1], excluded, timing) if retrieval in ("both", "text") else None
    preds = {}
    for k in ks:
        vk = img_side.refined(k) if img_side else v
        tk = txt_side.refined(k) if txt_side else t
        logits = vk @ zero_shot_weights(tk, n_c, n_t).T
        results["reco"][str(k)] = classification_metrics(logits, labels)
        preds[k] = logits.argmax(1)
    n = len(labels)
    details = _details(rt, collection, ds, kept, labels, base_logits.argmax(1), preds[ks[-1]],
                       img_side.nb if img_side else None)
    run = _store(rt, task="zeroshot_classification", enc=enc, version=version, dataset=dataset,
                 dataset_hash=ds.content_hash(), ks=ks, retrieval=retrieval, guard=guard, seed=seed,
                 metrics=results, timing={k2: v2 / max(n, 1) for k2, v2 in timing.items()},
                 extra={"classnames": ds.classnames, "templates": ds.templates, "n_images": n,
                        "skipped": dict(skipped), "leakage_guard": lg.report(), "details": details,
                        "headline_k": ks[-1]})
    return run


def evaluate_retrieval(rt, model: str, dataset: str, memory: str | None = None, ks=None, retrieval: str = "text",
                       guard: bool = True, seed: int = 0, batch_size: int = 64, images_root: str | None = None,
                       progress: bool = False, checkpoint: str = "best") -> dict:
    from .datasets import karpathy
    from .encoder import RecoEncoder

    if retrieval not in RETRIEVAL_CHOICES:
        raise RecoError(f"--retrieval must be one of {', '.join(RETRIEVAL_CHOICES)}")
    kind, _, path = dataset.partition(":")
    if kind != "karpathy" or not path:
        raise RecoError(f"bad retrieval dataset {dataset!r}: use karpathy:/path/dataset_coco.json")
    ds = karpathy(path, images_root)
    enc = RecoEncoder.load(model, memory=memory, runtime=rt, checkpoint=checkpoint)
    ks = _check_ks(ks or [enc.k], enc.k)
    collection, version = enc.resolve()
    timing = {"encode": 0.0, "search": 0.0, "fuse": 0.0}
    t0 = time.perf_counter()
    v, kept, skipped = encode_images(enc.backbone, ds.images, batch_size)
    caps, owner = [], []
    for new_i, i in enumerate(kept):
        caps += ds.captions[i]
        owner += [new_i] * len(ds.captions[i])
    t = enc.backbone.encode_texts(caps)
    owner = np.array(owner)
    timing["encode"] += time.perf_counter() - t0
    lg = LeakageGuard(rt.store, collection, enabled=guard)
    excluded = lg.find(v, _opener(ds.images, kept))
    results = {"baseline": retrieval_metrics(v @ t.T, owner), "reco": {}}
    img_side = _Side(enc, collection, "image", v, ks[-1], excluded, timing) if retrieval in ("both", "image") else None
    txt_side = _Side(enc, collection, "text", t, ks[-1], excluded, timing) if retrieval in ("both", "text") else None
    for k in ks:
        vk = img_side.refined(k) if img_side else v
        tk = txt_side.refined(k) if txt_side else t
        results["reco"][str(k)] = retrieval_metrics(vk @ tk.T, owner)
    n = len(kept)
    return _store(rt, task="zeroshot_retrieval", enc=enc, version=version, dataset=dataset,
                  dataset_hash=ds.content_hash(), ks=ks, retrieval=retrieval, guard=guard, seed=seed, metrics=results,
                  timing={k2: v2 / max(n, 1) for k2, v2 in timing.items()},
                  extra={"n_images": n, "n_captions": len(caps), "skipped": dict(skipped),
                         "leakage_guard": lg.report(), "headline_k": ks[-1]})


def _details(rt, collection, ds, kept, labels, base_pred, reco_pred, nb: Neighbours | None, limit: int = 200):
    """Per-query records for the gallery: the image, truth, both predictions, the retrieved items."""
    out = []
    ids = [i for row in (nb.ids[:limit] if nb else []) for i in row]
    payload = {h.id: h.payload for h in rt.store.retrieve(collection, list(dict.fromkeys(ids)))} if ids else {}
    for j in range(min(limit, len(kept))):
        out.append({
            "image": ds.samples[kept[j]][0], "label": ds.classnames[labels[j]],
            "baseline": ds.classnames[base_pred[j]], "reco": ds.classnames[reco_pred[j]],
            "neighbours": [{"score": float(nb.scores[j, r]), "caption": payload.get(pid, {}).get("caption"),
                            "src": payload.get(pid, {}).get("src")}
                           for r, pid in enumerate(nb.ids[j])] if nb else [],
        })
    return out


def _store(rt, *, task, enc, version, dataset, dataset_hash, ks, retrieval, guard, seed, metrics, timing,
           extra) -> dict:
    with rt.db.session() as s:
        row = Evaluation(task=task, model_name=enc.info["name"], memory_name=enc.memory,
                         memory_version=version.version, dataset=dataset, dataset_hash=dataset_hash, ks=ks,
                         retrieval=retrieval, leakage_guard=int(guard), metrics=metrics, timing=timing, seed=seed,
                         result_path="", created_at=utcnow())
        s.add(row)
        s.flush()
        run_id = row.id
        path = rt.settings.home / "evals" / f"run-{run_id}.json"
        row.result_path = str(path)
    head = metrics["reco"][str(extra["headline_k"])]
    result = {
        "run": run_id, "dataset": dataset, "model": enc.info["name"], "checkpoint": enc.checkpoint,
        "pretrained": enc.info["backbone"],
        "task": task, "metrics": head, "language": "en",
        "baseline": metrics["baseline"], "reco": metrics["reco"], "k": ks, "retrieval": retrieval,
        "memory": {"name": enc.memory, "version": version.version, "collection": version.collection},
        "dataset_hash": dataset_hash, "seed": seed, "timing_per_item_s": timing, "code_version": __version__,
        "created_at": utcnow().isoformat(), **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    return result


def load_run(rt, run_id: int) -> dict:
    with rt.db.session() as s:
        row = s.get(Evaluation, run_id)
        if row is None:
            raise NotFound(f"no evaluation run {run_id} (see `reco eval list`)")
        path = Path(row.result_path)
    if not path.is_file():
        raise RecoError(f"the result file of run {run_id} is missing: {path}")
    return json.loads(path.read_text())
