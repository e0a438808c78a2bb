"""Zero-shot evaluation: frozen baseline and RECO in one run, reusing the backbone encodings, for a list of k.

Every run is stored: a row in the metadata DB and a JSON result shaped like CLIP_benchmark's (dataset, model,
pretrained, task, metrics) plus RECO's fields (baseline, per-k RECO metrics, memory version, leakage guard,
timings, and the per-query details the gallery shows).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import __version__
from .db.models import Evaluation, utcnow
from .errors import NotFound, RecoError
from .guard import LeakageGuard
from .metrics import classification_metrics, group_accuracy, ranked_metrics, retrieval_metrics, zero_shot_weights
from .retrieval import Neighbours, retrieve

RETRIEVAL_CHOICES = ("both", "image", "text", "none")
DETAILS_LIMIT = 200  # queries kept per run for the gallery


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
                           fusion=enc.fusion_mode, exclude=ex, device=enc.device, settings=enc.rt.settings)
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
                            progress: bool = False, checkpoint: str = "best", classes: str | None = None,
                            ranking: str = "auto", ef: int | None = None) -> dict:
    """classes: rank against a stored class set (app/classes.py) instead of the dataset's own class names, by
    a dense matrix or a top-k search (`ranking`; auto picks by the set's size; `ef` widens the search)."""
    from .classes import ClassIndex
    from .datasets import load_classification

    if retrieval not in RETRIEVAL_CHOICES:
        raise RecoError(f"--retrieval must be one of {', '.join(RETRIEVAL_CHOICES)}")
    if classes and templates:
        raise RecoError(f"--templates applies to the dataset's own classes: class set {classes} was encoded with "
                        f"its own (`reco classes show {classes}`)")
    np.random.seed(seed)
    ds = load_classification(dataset, classnames, templates)  # before torch: a bad layout or file answers at once
    from .encoder import RecoEncoder

    enc = RecoEncoder.load(model, memory=memory, runtime=rt, checkpoint=checkpoint)
    with ClassIndex.open(rt, classes) if classes else contextlib.nullcontext() as index:
        if index is not None and ef:
            index.ef = ef
        return _classify(rt, enc, ds, index, dataset, ks, retrieval, guard, seed, batch_size, ranking)


def _classify(rt, enc, ds, index, dataset, ks, retrieval, guard, seed, batch_size, ranking) -> dict:
    text_refined = retrieval in ("both", "text")
    if index is not None:
        ranking = index.ranking(ranking)
        ks = _check_class_set(index, enc, ds, ks, text_refined)
    ks = _check_ks(ks or [enc.k], enc.k)
    collection, version = enc.resolve()
    timing = {"encode": 0.0, "search": 0.0, "fuse": 0.0, "rank": 0.0}

    t0 = time.perf_counter()
    paths = [p for p, _ in ds.samples]
    v, kept, skipped = encode_images(enc.backbone, paths, batch_size)
    labels = np.array([ds.samples[i][1] for i in kept])
    groups = np.array(ds.groups, dtype=object)[kept] if ds.groups else None
    timing["encode"] += time.perf_counter() - t0

    lg = LeakageGuard(rt.store, collection, enabled=guard)
    excluded = lg.find(v, _opener(paths, kept))
    img_side = _Side(enc, collection, "image", v, ks[-1], excluded, timing) if retrieval in ("both", "image") else None
    if index is None:
        ranked = _rank_dense(enc, collection, ds, v, labels, groups, ks, img_side, excluded, text_refined, timing)
    else:
        ranked = _rank_class_set(index, ranking, ds, v, labels, groups, ks, img_side, text_refined, timing)
    results, names_base, names_reco, extra = ranked
    n = len(labels)
    truth = [ds.classnames[i] for i in labels]
    details = _details(rt, collection, ds, kept, truth, names_base, names_reco, img_side.nb if img_side else None)
    guard_report = lg.report()
    if index is not None and text_refined:
        guard_report["class_text_side"] = "refined when the class set was built: the guard does not apply to it"
    return _store(rt, task="zeroshot_classification", enc=enc, version=version, dataset=dataset,
                  dataset_hash=ds.content_hash(), ks=ks, retrieval=retrieval, guard=guard, seed=seed,
                  metrics=results, timing={k2: v2 / max(n, 1) for k2, v2 in timing.items()},
                  extra={"classnames": ds.classnames, "n_images": n, "skipped": dict(skipped),
                         "leakage_guard": guard_report, "details": details, "headline_k": ks[-1], **extra})


def _rank_dense(enc, collection, ds, v, labels, groups, ks, img_side, excluded, text_refined, timing):
    """The dataset's own classes: every prompt encoded now, one score per image and class (a matrix in RAM)."""
    t0 = time.perf_counter()
    prompts = [t.format(c=c) for c in ds.classnames for t in ds.templates]
    t = enc.backbone.encode_texts(prompts)
    timing["encode"] += time.perf_counter() - t0
    n_c, n_t = len(ds.classnames), len(ds.templates)
    t0 = time.perf_counter()
    base_logits = v @ zero_shot_weights(t, n_c, n_t).T
    timing["rank"] += time.perf_counter() - t0
    results = {"baseline": _with_groups(classification_metrics(base_logits, labels), base_logits.argmax(1), labels,
                                        groups), "reco": {}}
    txt_side = _Side(enc, collection, "text", t, ks[-1], excluded, timing) if text_refined else None
    pred = None
    hits = {"baseline": top1_hits(base_logits.argmax(1), labels), "reco": {}}
    for k in ks:
        vk = img_side.refined(k) if img_side else v
        tk = txt_side.refined(k) if txt_side else t
        t0 = time.perf_counter()
        logits = vk @ zero_shot_weights(tk, n_c, n_t).T
        timing["rank"] += time.perf_counter() - t0
        pred = logits.argmax(1)
        results["reco"][str(k)] = _with_groups(classification_metrics(logits, labels), pred, labels, groups)
        hits["reco"][str(k)] = top1_hits(pred, labels)
    names = ds.classnames
    return (results, [names[i] for i in base_logits.argmax(1)], [names[i] for i in pred],
            {"templates": ds.templates, "top1_hits": hits})


def _rank_class_set(index, ranking, ds, v, labels, groups, ks, img_side, text_refined, timing):
    """A stored class set: each image's top 5 classes, by the dense matrix of its class embeddings or by a
    top-k search of its collection. Class ids are what is compared, so a set may hold far more classes than
    the dataset uses (OVEN: every Wikipedia entity)."""
    truth = np.array(ds.ids(), dtype=object)[labels]
    t0 = time.perf_counter()
    base, _ = index.top_k(v, "frozen", 5, ranking)
    timing["rank"] += time.perf_counter() - t0
    results = {"baseline": _with_groups(ranked_metrics(base, truth), base[:, 0], truth, groups), "reco": {}}
    hits = {"baseline": top1_hits(base[:, 0], truth), "reco": {}}
    reco = base
    for k in ks:
        vk = img_side.refined(k) if img_side else v
        t0 = time.perf_counter()
        reco, _ = index.top_k(vk, "refined" if text_refined else "frozen", 5, ranking)
        timing["rank"] += time.perf_counter() - t0
        results["reco"][str(k)] = _with_groups(ranked_metrics(reco, truth), reco[:, 0], truth, groups)
        hits["reco"][str(k)] = top1_hits(reco[:, 0], truth)
    shown = min(len(truth), DETAILS_LIMIT)
    names = index.names(list({c for c in np.concatenate([base[:shown, 0], reco[:shown, 0]])}))
    extra = {"templates": index.details.get("templates"), "top1_hits": hits,
             "classes": {"name": index.name, "version": index.version, "count": index.count, "ranking": ranking,
                         "ef": index.ef if ranking == "search" else None, "refined": index.refined}}
    return results, [names.get(c, c) for c in base[:shown, 0]], [names.get(c, c) for c in reco[:shown, 0]], extra


def _check_class_set(index, enc, ds, ks, text_refined) -> list[int] | None:
    """Refuse a class set that cannot stand in for the dataset's classes with this model; returns the ks."""
    if index.backbone_hash != enc.info["backbone_hash"]:
        raise RecoError(f"class set {index.name} v{index.version} was encoded with {index.backbone}, model "
                        f"{enc.info['name']} uses {enc.info['backbone']}: they must share the backbone")
    missing = index.missing(ds.ids())
    if missing:
        raise RecoError(f"class set {index.name} v{index.version} lacks {len(missing)} of the dataset's "
                        f"{len(ds.ids())} classes (e.g. {', '.join(map(repr, missing[:3]))}): build it from a "
                        f"names file that holds them, with the same ids (an image folder: --classnames maps its "
                        f"folders to the set's names)")
    if not text_refined:
        return ks
    refined = index.refined
    if not refined:
        raise RecoError(f"class set {index.name} v{index.version} holds frozen class embeddings only: build it "
                        f"with --model {enc.info['name']} to refine its text side, or evaluate with --retrieval image")
    if (refined["model"], refined["checkpoint"]) != (enc.info["name"], enc.checkpoint):
        raise RecoError(f"class set {index.name} v{index.version} was refined by model {refined['model']} "
                        f"({refined['checkpoint']} checkpoint), not {enc.info['name']} ({enc.checkpoint}): build "
                        f"one with --model {enc.info['name']}, or evaluate with --retrieval image")
    if ks and sorted(set(ks)) != [refined["k"]]:
        raise RecoError(f"class set {index.name} v{index.version} was refined with k={refined['k']}: RECO's "
                        f"text side cannot be evaluated at another k (-k {refined['k']}, or --retrieval image)")
    return [refined["k"]]


def top1_hits(pred, truth) -> str:
    """Each query's top-1 as "1" (right) or "0", in dataset order: the run file keeps them so that two runs on
    the same images can be compared query by query (a paired bootstrap), not only by their means."""
    return "".join("1" if a == b else "0" for a, b in zip(np.asarray(pred).tolist(), np.asarray(truth).tolist()))


def _with_groups(metrics: dict, pred, labels, groups) -> dict:
    return {**metrics, **group_accuracy(pred, labels, groups)} if groups is not None else metrics


def evaluate_retrieval(rt, model: str, dataset: str, memory: str | None = None, ks=None, retrieval: str = "text",
                       guard: bool = True, seed: int = 0, batch_size: int = 64, images_root: str | None = None,
                       progress: bool = False, checkpoint: str = "best") -> dict:
    from .datasets import karpathy

    if retrieval not in RETRIEVAL_CHOICES:
        raise RecoError(f"--retrieval must be one of {', '.join(RETRIEVAL_CHOICES)}")
    kind, _, path = dataset.partition(":")
    if kind != "karpathy" or not path:
        raise RecoError(f"bad retrieval dataset {dataset!r}: use karpathy:/path/dataset_coco.json")
    ds = karpathy(path, images_root)  # before torch: a bad layout answers at once
    from .encoder import RecoEncoder

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


def _details(rt, collection, ds, kept, truth, base_pred, reco_pred, nb: Neighbours | None,
             limit: int = DETAILS_LIMIT):
    """Per-query records for the gallery: the image, truth, both predictions (names), the retrieved items."""
    out = []
    ids = [i for row in (nb.ids[:limit] if nb else []) for i in row]
    payload = {h.id: h.payload for h in rt.store.retrieve(collection, list(dict.fromkeys(ids)))} if ids else {}
    for j in range(min(limit, len(kept))):
        out.append({
            "image": ds.samples[kept[j]][0], "label": truth[j], "baseline": base_pred[j], "reco": reco_pred[j],
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
