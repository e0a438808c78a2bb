"""Training the fusion transformers: a queued, resumable job.

The frozen embeddings of the training pairs are read from their memory (the backbone never runs, so it can never
get a gradient); neighbours are pulled from the retrieval memory with batched queries, excluding each pair's own
item and its near-duplicates, and cached on disk per (pairs version, memory version, k, modes), so later epochs
and reruns make no store queries. Checkpoints are safetensors + JSON; a rerun after a crash resumes from the
last one; the checkpoint that does best on a held-out validation slice is the one inference uses.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__, checkpoint, device_search
from .caches import cache_dir, open_dir
from .db.models import FusionModel, ModelStatus, VersionStatus, utcnow
from .errors import NotFound, RecoError
from .gate import gate_names
from .names import check_name, parse_memory_ref  # noqa: F401 (train.parse_memory_ref: used by others)
from .retrieval import modes, search_hits


SELECT_RULES = ("1se", "best", "last")
BATCHING = ("random", "similar", "shard")  # training and validation batches alike
TUNE = ("all", "attention", "scalars", "gate")
LOSSES = ("reco", "fused")  # app/fusion.py LOSSES
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class TrainConfig:
    k: int = 10
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    search: str = "uni"
    fusion: str = "cross"
    val_fraction: float = 0.1
    val_by: str = "concept"  # hold out whole concepts (pairs sharing a caption) or single items
    # validate on another memory's pairs instead of a slice of the training pairs (e.g. concepts the frozen
    # backbone never saw, which behave like the rare concepts RECO is for); val_fraction and val_by then unused
    val_pairs: str | None = None
    seed: int = 0
    checkpoint_every: int = 200
    # which checkpoint inference uses: "best" the highest validation accuracy; "1se" the earliest within one
    # standard error of it. With validation on concepts the backbone never saw (val_pairs), neighbouring
    # checkpoints differ by less than that noise while later ones drift from the retrieval start toward trusting
    # the backbone, which is what fails on such concepts (README, quality). "last": the final step, for a recipe
    # (lr, epochs) fixed beforehand, e.g. by cross-fitting on held-out groups, when every pair is for training
    select: str = "best"
    heads: int | None = None
    dropout: float = 0.0
    neighbour_dropout: float = 0.1
    use_rank: bool = True
    use_score: bool = True
    init: str = "retrieval"  # fusion start: retrieval (score-weighted fusion) or identity (see app/fusion.py)
    score_scale: float = 100.0  # initial 1/τ of the retrieval-score softmax
    # training only: Gaussian noise of this norm (relative to the unit query) on the frozen query each layer
    # refines, re-normalised. The frozen base is then unsure of every training pair, as it is of the rare concepts
    # RECO is for, so the loss rewards using the memory instead of teaching the layers to trust the base
    query_noise: float = 0.0
    retrieval: bool = True  # False: neighbours masked everywhere (the retrieval-off control)
    # "similar": each batch (training and validation) is a group of pairs whose captions are near each other, so
    # the in-batch negatives are near neighbours (flags with flags) and telling them apart takes the one right
    # neighbour; "random" batches are told apart by coarse kind, which averaging many neighbours already gives;
    # "shard": each batch is one source shard of the pairs (in chunks of at most batch_size), for pairs written
    # one fine-grained group per shard
    batching: str = "random"
    tune: str = "all"  # which parameters learn: all, attention, scalars or gate (see app/fusion.py param_groups)
    gate: bool = False  # a learned per-query weight between the query and the memory term (app/fusion.py)
    # what the gate sees: a set of app/gate.py's GATE_SETS (scores, rivals) or signal names, comma-separated
    gate_features: str = "scores"
    # the gate also sets, per query, how sharply the memory term follows the top-1 (a second output: app/fusion.py)
    gate_temperature: bool = False
    # the gate's hidden width: 0 reads its signals linearly; H > 0 through one hidden layer of H tanh units
    gate_hidden: int = 0
    # "reco": the paper's three contrastive terms (fused image vs fused text, and each fused side vs the other's
    # frozen embedding); "fused": only fused vs fused, the comparison zero-shot classification and retrieval make
    # when both sides retrieve (app/fusion.py LOSSES)
    loss: str = "reco"
    # validation batches: None as `batching`; "shard": one batch per shard of the validation pairs, so each image
    # is told apart among its own group's captions (a fine-grained set per shard, as targets are classified among
    # their own names) instead of among unrelated concepts that coarse kind already separates
    val_batching: str | None = None
    dedup_threshold: float | None = 0.98
    score_threshold: float | None = None
    device: str | None = None
    # fp32: exact float32 steps. tf32: float32 matmuls in TF32 on CUDA, for this run only (1.7x at batch 4096 on an
    # H200). bf16: forward and loss under bfloat16 autocast (CUDA or CPU); weights, optimizer state and validation
    # stay float32
    precision: str = "fp32"

    def check(self) -> None:
        modes("image", self.search, self.fusion)
        if self.k < 1 or self.epochs < 1 or self.batch_size < 2:
            raise RecoError("k and epochs must be >= 1 and batch size >= 2")
        if self.tune not in TUNE:
            raise RecoError(f"--tune must be one of {', '.join(TUNE)}, not {self.tune!r}")
        if self.loss not in LOSSES:
            raise RecoError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.batching not in BATCHING:
            raise RecoError(f"--batching must be one of {', '.join(BATCHING)}, not {self.batching!r}")
        if self.val_batching is not None and self.val_batching not in BATCHING:
            raise RecoError(f"--val-batching must be one of {', '.join(BATCHING)}, not {self.val_batching!r}")
        if self.tune == "gate" and not self.gate:
            raise RecoError("--tune gate trains only the per-query gate: add --gate")
        if self.gate_temperature and not self.gate:
            raise RecoError("--gate-temperature is an output of the per-query gate: add --gate")
        if self.gate_hidden < 0 or (self.gate_hidden and not self.gate):
            raise RecoError("--gate-hidden is the per-query gate's hidden width: >= 0, and > 0 only with --gate")
        try:
            gate_names(self.gate_features)
        except ValueError as e:
            raise RecoError(f"--gate-features: {e}") from None
        if self.precision not in PRECISIONS:
            raise RecoError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.query_noise < 0:
            raise RecoError("--query-noise must be >= 0")
        if self.select not in SELECT_RULES:
            raise RecoError(f"--select must be one of {', '.join(SELECT_RULES)}, not {self.select!r}")
        if not 0 <= self.val_fraction < 1:
            raise RecoError("--val-fraction must be in [0, 1)")
        if self.val_by not in ("concept", "item"):
            raise RecoError("--val-by must be concept or item")
        if self.dedup_threshold is not None and self.dedup_threshold >= 1.0:
            self.dedup_threshold = None  # nothing scores above 1: the filter is off


# -- job creation ------------------------------------------------------------------------------------------
def create_job(rt, name: str, pairs: str, memory: str, cfg: TrainConfig) -> FusionModel:
    """Validate everything and register the model row (status training). A failed or interrupted job of the
    same name and settings is resumed instead; anything else with that name is refused."""
    check_name(name, "model")
    cfg.check()
    (p_name, p_ver), (m_name, m_ver) = parse_memory_ref(pairs), parse_memory_ref(memory)
    with rt.db.session() as s:
        pv = _ready_version(s, p_name, p_ver, "pairs")
        mv = _ready_version(s, m_name, m_ver, "memory")
        _same_backbone("pairs", p_name, pv, m_name, mv)
        if cfg.k > mv.items_stored:
            raise RecoError(f"k={cfg.k} is larger than memory {m_name} v{mv.version} ({mv.items_stored} items)")
        job = {"pairs": _job_ref(p_name, pv), "memory": _job_ref(m_name, mv), "train": asdict(cfg)}
        if cfg.val_pairs:
            vp_name, vp_ver = parse_memory_ref(cfg.val_pairs)
            vv = _ready_version(s, vp_name, vp_ver, "validation pairs")
            _same_backbone("validation pairs", vp_name, vv, m_name, mv)
            if vv.collection == pv.collection:
                raise RecoError("--val-pairs names the training pairs themselves: validate on another memory, "
                                "or drop --val-pairs to hold out --val-fraction of the pairs")
            if vv.items_stored < 2:
                raise RecoError(f"validation pairs {vp_name} v{vv.version} hold fewer than 2 items")
            job["val_pairs"] = _job_ref(vp_name, vv)
        existing = s.query(FusionModel).filter_by(name=name).one_or_none()
        if existing is not None:
            if existing.status == ModelStatus.READY:
                raise RecoError(f"model {name} already exists: `reco model delete {name}` or choose another name")
            if existing.config.get("job") != json.loads(json.dumps(job)):
                raise RecoError(f"model {name} exists from an interrupted job with other settings: "
                                f"`reco model delete {name}` first")
            existing.status, existing.error = ModelStatus.TRAINING, None
            return existing
        row = FusionModel(
            name=name, status=ModelStatus.TRAINING, backbone=mv.backbone, backbone_hash=mv.backbone_hash,
            dim=mv.dim, memory_name=m_name, memory_version=mv.version, pairs_name=p_name,
            pairs_version=pv.version, config={"job": job}, metrics={}, step=0,
            checkpoint_dir=str(rt.settings.home / "models" / name),
        )
        s.add(row)
        s.flush()
        return row


def _job_ref(name: str, v) -> list:
    """How a job names a memory version: [name, version, collection, created] (the pairs and neighbour caches key
    on it)."""
    return [name, v.version, v.collection, v.created_at.isoformat()]


def _same_backbone(what: str, name: str, v, m_name: str, mv) -> None:
    if v.backbone_hash != mv.backbone_hash:
        raise RecoError(f"{what} {name} v{v.version} were embedded with {v.backbone}, memory {m_name} "
                        f"v{mv.version} with {mv.backbone}: both must use the same backbone")


def _ready_version(s, name, version, what):
    from .memory import get_version

    v = get_version(s, name, version)
    if v.status not in VersionStatus.ACTIVATABLE:
        raise RecoError(f"{what} memory {name} v{v.version} is {v.status}, not ready")
    if not v.items_stored:
        raise RecoError(f"{what} memory {name} v{v.version} is empty")
    return v


# -- data: pairs and cached neighbours ---------------------------------------------------------------------
@dataclass
class Pairs:
    ids: list[str]
    captions: list[str]
    image: np.ndarray  # [N, D] frozen image embeddings
    text: np.ndarray  # [N, D] frozen text embeddings
    shards: list[str] = field(default_factory=list)  # each pair's source shard (--batching, --val-batching shard)


@dataclass
class SideNeighbours:
    idx: np.ndarray  # [N, k] rows of `table`
    scores: np.ndarray  # [N, k]
    mask: np.ndarray  # [N, k]
    table: np.ndarray  # [U, D] the fused vectors of every neighbour
    ids: list[str] = field(default_factory=list)  # point id of each table row


def load_pairs(rt, collection: str, created: str) -> Pairs:
    key = {"collection": collection, "created": created}
    d = cache_dir(rt.settings.home, "pairs", key)
    meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").is_file() else {}
    if "shards" in meta:  # (a cache written before shards were kept is read again)
        return Pairs(meta["ids"], meta["captions"], np.load(d / "image.npy", allow_pickle=False),
                     np.load(d / "text.npy", allow_pickle=False), meta["shards"])
    ids, caps, shards, imgs, txts = [], [], [], [], []
    for b_ids, b_img, b_txt, b_pay in rt.store.scan(collection):
        ids += b_ids
        caps += [p.get("caption", "") for p in b_pay]
        shards += [str(p.get("shard", "")) for p in b_pay]
        imgs.append(b_img)
        txts.append(b_txt)
    order = np.argsort(ids)  # a stable order, whatever the store's scroll order
    pairs = Pairs([ids[i] for i in order], [caps[i] for i in order], np.concatenate(imgs)[order],
                  np.concatenate(txts)[order], [shards[i] for i in order])
    open_dir(d, key)
    np.save(d / "image.npy", pairs.image)
    np.save(d / "text.npy", pairs.text)
    (d / "meta.json").write_text(json.dumps({"ids": pairs.ids, "captions": pairs.captions, "shards": pairs.shards}))
    return pairs


class NeighbourCache:
    """Neighbours of every training pair on both sides, from the store once, then from disk."""

    def __init__(self, rt, job: dict, cfg: TrainConfig, dim: int, device: str | None = None):
        """device: the training device; the neighbour pull searches a copy of the memory there where
        RECO_DEVICE_SEARCH allows it (app/device_search.py), the same neighbours as the store's exact search."""
        self.rt, self.job, self.cfg, self.dim, self.device = rt, job, cfg, dim, device
        self.key = {"pairs": job["pairs"], "memory": job["memory"], "k": cfg.k, "search": cfg.search,
                    "fusion": cfg.fusion, "dedup": cfg.dedup_threshold, "score": cfg.score_threshold}
        self.dir = cache_dir(rt.settings.home, "neighbours", self.key)
        self.store_queries = 0

    def get(self, pairs: Pairs, batch: int | None = None, progress: bool = False) -> dict[str, SideNeighbours]:
        if (self.dir / "done").is_file():
            return {side: self._load(side) for side in ("image", "text")}
        from tqdm import tqdm

        # a GPU takes thousands of queries per matmul; the store's batches stay at 256
        batch = batch or (8192 if str(self.device).startswith("cuda") else 256)

        collection = self.job["memory"][2]
        same_memory = self.job["pairs"][2] == collection
        # The store is asked for ids and scores only; each distinct neighbour's vector is then taken once from the
        # pairs (when they are the memory, they hold every point's vectors) or fetched by id. Returning k vectors
        # with every hit cost about twice the kNN search itself (see benchmarks/train.py).
        row_in_pairs = {pid: i for i, pid in enumerate(pairs.ids)} if same_memory else {}
        out = {}
        for side, queries in (("image", pairs.image), ("text", pairs.text)):
            _, fused = modes(side, self.cfg.search, self.cfg.fusion)
            idx = np.zeros((len(queries), self.cfg.k), np.int32)
            scores = np.zeros((len(queries), self.cfg.k), np.float32)
            mask = np.zeros((len(queries), self.cfg.k), bool)
            row_of: dict[str, int] = {}
            with self.rt.store.hold(collection):
                for start in tqdm(range(0, len(queries), batch), desc=f"neighbours ({side})", disable=not progress,
                                  unit="batch", leave=False):
                    q = queries[start : start + batch]
                    exclude = [{pid} for pid in pairs.ids[start : start + batch]] if same_memory else None
                    rows = search_hits(self.rt.store, collection, q, side, self.cfg.k, search=self.cfg.search,
                                       fusion=self.cfg.fusion, exclude=exclude,
                                       dedup_threshold=self.cfg.dedup_threshold,
                                       score_threshold=self.cfg.score_threshold, with_vectors=False,
                                       device=self.device, settings=self.rt.settings)
                    self.store_queries += 1
                    for i, row in enumerate(rows):
                        if not row:
                            continue
                        n = len(row)
                        idx[start + i, :n] = [row_of.setdefault(h.id, len(row_of)) for h in row]
                        scores[start + i, :n] = [h.score for h in row]
                        mask[start + i, :n] = True
                ids = list(row_of)
                tab = self._vectors(collection, ids, fused, pairs if same_memory else None, row_in_pairs)
            out[side] = SideNeighbours(idx, scores, mask, tab, ids)
            self._save(side, out[side])
        (self.dir / "done").write_text("ok")
        return out

    def _vectors(self, collection: str, ids: list[str], fused: str, pairs: Pairs | None,
                 row_in_pairs: dict[str, int], chunk: int = 1024) -> np.ndarray:
        """The `fused` vector of each point in ids, in order: from the pairs where they hold it, else the store."""
        if not ids:
            return np.zeros((1, self.dim), np.float32)
        table = np.zeros((len(ids), self.dim), np.float32)
        rows = np.fromiter((row_in_pairs.get(pid, -1) for pid in ids), np.int64, len(ids))
        known = rows >= 0
        if pairs is not None and known.any():
            table[known] = (pairs.image if fused == "image" else pairs.text)[rows[known]]
        missing = np.flatnonzero(~known)
        for a in range(0, len(missing), chunk):
            at = missing[a : a + chunk]
            want = [ids[t] for t in at]
            got = {h.id: h.vector for h in self.rt.store.retrieve(collection, want, with_vector=fused)}
            if len(got) != len(want) or any(got[pid] is None for pid in want):
                raise RecoError(f"memory {collection} lost points while their neighbours were read; retry")
            table[at] = np.stack([got[pid] for pid in want])
        return table

    def _save(self, side: str, nb: SideNeighbours) -> None:
        open_dir(self.dir, self.key)
        for part in ("idx", "scores", "mask", "table"):
            np.save(self.dir / f"{side}_{part}.npy", getattr(nb, part))
        (self.dir / f"{side}_ids.json").write_text(json.dumps(nb.ids))

    def _load(self, side: str) -> SideNeighbours:
        parts = {p: np.load(self.dir / f"{side}_{p}.npy", allow_pickle=False) for p in ("idx", "scores", "mask", "table")}
        return SideNeighbours(**parts, ids=json.loads((self.dir / f"{side}_ids.json").read_text()))


def split(pairs: Pairs, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation row indices; with val_by=concept every caption is wholly on one side."""
    rng = np.random.default_rng(cfg.seed)
    n = len(pairs.ids)
    if cfg.val_fraction == 0 or n < 4:
        return np.arange(n), np.arange(0)
    if cfg.val_by == "item":
        perm = rng.permutation(n)
        n_val = max(1, int(round(n * cfg.val_fraction)))
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    concepts = sorted(set(pairs.captions))
    rng.shuffle(concepts)
    n_val = max(1, int(round(len(concepts) * cfg.val_fraction)))
    held = set(concepts[:n_val])
    is_val = np.array([c in held for c in pairs.captions])
    if is_val.all() or not is_val.any():
        raise RecoError("the validation split left no training or no validation pairs: change --val-fraction")
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# -- the loop ----------------------------------------------------------------------------------------------
def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up (at most a fifth of the run), then cosine decay to zero."""
    warmup = max(1, min(cfg.warmup_steps, total // 5))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- where the data lives, and the rows of each step -------------------------------------------------------
RESERVE_BYTES = 2 << 30  # device memory kept free for the layers, optimizer state, activations and the allocator
FIT_SHARE = 0.8  # of the free device memory left after RESERVE_BYTES: the most the data may take


@dataclass
class TrainData:
    """The pairs and both sides' neighbours as torch tensors, and the batches built from them.

    resident: the tensors are on `device` and a batch is indexed there (`table[idx[rows]]` on the device). Not
    resident: they stay in host memory; a batch is gathered on the host into pinned memory and copied over with
    non_blocking copies on a side stream, the next one while the current step computes (`prefetch`)."""

    image: Any  # [N, D] float32
    text: Any  # [N, D] float32
    sides: dict  # side -> (idx [N, k], scores [N, k], mask [N, k], table [U, D])
    device: Any  # torch.device the steps run on
    resident: bool
    _ahead: tuple | None = None  # (key, batch) copied ahead by prefetch
    _stream: Any = None

    def index(self, rows: np.ndarray):
        """Row numbers as a tensor where the gather happens (the device when resident, else the host)."""
        import torch

        ix = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        return ix.to(self.device) if self.resident else ix

    def batch(self, rows, key=None) -> tuple:
        """(v, t, (retrieved, scores, mask) of the image side, the same of the text side) on the device, ready to
        use; a batch `prefetch` copied ahead under the same key is taken as it is."""
        if key is not None and self._ahead is not None and self._ahead[0] == key:
            out, self._ahead = self._ahead[1], None
            return self._ready(out)
        return self._ready(self._gather(self._as_index(rows)))

    def prefetch(self, rows, key) -> None:
        """Start the next batch's host gather and copy while the device runs this step (host data on CUDA only:
        elsewhere a batch is a few device-side index ops, nothing to overlap)."""
        if self.resident or self.device.type != "cuda":
            return
        self._ahead = (key, self._gather(self._as_index(rows)))

    def _as_index(self, rows):
        import torch

        return rows if isinstance(rows, torch.Tensor) else self.index(rows)

    def _gather(self, ix) -> tuple:
        import torch

        pin = not self.resident and self.device.type == "cuda"

        def take(x, at):
            if x.device.type != "cpu":
                return x.index_select(0, at)
            # on the host numpy's take is about twice as fast as torch's index_select, and its result (or the
            # pinned buffer it fills) is wrapped without a copy
            if not pin:
                return torch.from_numpy(np.take(x.numpy(), at.numpy(), axis=0))
            out = torch.empty((len(at), *x.shape[1:]), dtype=x.dtype, pin_memory=True)
            np.take(x.numpy(), at.numpy(), axis=0, out=out.numpy(), mode="clip")  # rows are valid; "raise" buffers
            return out

        out = [take(self.image, ix), take(self.text, ix)]
        for side in ("image", "text"):
            idx, scores, mask, table = self.sides[side]
            at = take(idx, ix)
            out.append((take(table, at.reshape(-1)).view(*at.shape, table.shape[1]), take(scores, ix),
                        take(mask, ix)))
        if not pin:
            return tuple(out)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            return _tree(out, lambda x: x.to(self.device, non_blocking=True))

    def _ready(self, batch: tuple) -> tuple:
        """A batch copied on the side stream, made safe to use (and to free) on the current one."""
        if self._stream is None:
            return batch
        import torch

        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._stream)

        def used_here(x):  # the caching allocator must not hand x's memory to the side stream while it is in use
            x.record_stream(current)
            return x

        return _tree(batch, used_here)


def _tree(batch, fn) -> tuple:
    return tuple(_tree(x, fn) if isinstance(x, (tuple, list)) else fn(x) for x in batch)


def _host_tensors(pairs: Pairs, nbrs: dict[str, SideNeighbours]) -> tuple:
    """The arrays as CPU tensors, sharing the numpy memory wherever the dtype already fits (no copy)."""
    import torch

    def t(x, dtype):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=dtype))

    def index(x):  # int32 (the cache's) and int64 both index in torch: keep what is there
        return t(x, x.dtype if x.dtype in (np.int32, np.int64) else np.int64)

    sides = {side: (index(nb.idx), t(nb.scores, np.float32), t(nb.mask, np.bool_), t(nb.table, np.float32))
             for side, nb in nbrs.items()}
    return t(pairs.image, np.float32), t(pairs.text, np.float32), sides


def place_data(pairs: Pairs, nbrs: dict[str, SideNeighbours], device, where: str | None = None,
               reserve: int = RESERVE_BYTES) -> TrainData:
    """Decide, once per job, where the training data lives; every step and every validation reads it from there.

    CPU: the numpy arrays become tensors without copies; a batch is indexed from them. CUDA: uploaded once when
    they fit in FIT_SHARE of the device's free memory less `reserve` (the model, optimizer state and activations),
    so a step does no host work and no copy (gathering on the host and copying every step held an H200 to 40k
    pairs/s at batch 4096, against 211k resident). Larger data stays on the host, each batch gathered into pinned
    memory and prefetched (the pairs themselves are not pinned: that would copy and page-lock tens of GB, while
    only the batch crosses the bus). `where` ("device" or "host") overrides the estimate (tests, benchmarks)."""
    import torch

    device = torch.device(device)
    image, text, sides = _host_tensors(pairs, nbrs)
    if where is None:
        where = "device" if device.type != "cuda" or _fits(image, text, sides, device, reserve) else "host"
    if where not in ("device", "host"):
        raise ValueError(f"where must be device or host, not {where!r}")
    resident = where == "device"
    if resident and device.type != "cpu":
        image, text = image.to(device), text.to(device)
        sides = {side: tuple(x.to(device) for x in parts) for side, parts in sides.items()}
    return TrainData(image, text, sides, device, resident)


def _fits(image, text, sides, device, reserve: int) -> bool:
    import torch

    need = sum(x.nbytes for x in (image, text, *(x for parts in sides.values() for x in parts)))
    free, _ = torch.cuda.mem_get_info(device)
    return need <= FIT_SHARE * (free - reserve)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffle of one epoch, a function of (seed, epoch) alone: a job resumed mid-epoch continues the order the
    uninterrupted job had."""
    return np.random.default_rng(seed * 1000 + epoch).permutation(n)


class StepRows:
    """The rows of each training step: a shuffled slice of train_rows, or (batching=similar) one of the fixed
    groups in a shuffled order. The permutation is drawn once per epoch and kept (drawn per step it cost 0.46 s a
    step at 10M rows); `put` converts the epoch's order once (e.g. onto the device)."""

    def __init__(self, train_rows: np.ndarray, batch_size: int, steps_per_epoch: int, seed: int,
                 groups: list[np.ndarray] | None = None, put: Callable = lambda a: a):
        self.rows, self.bs, self.steps_per_epoch, self.seed = np.asarray(train_rows), batch_size, steps_per_epoch, seed
        self.groups = [put(g) for g in groups] if groups else None
        self.put = put
        self._epoch, self._order = None, None

    def __call__(self, step: int):
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            perm = epoch_order(self.seed, epoch, len(self.groups) if self.groups else len(self.rows))
            self._order = perm if self.groups else self.put(self.rows[perm])
            self._epoch = epoch
        if self.groups:
            return self.groups[self._order[pos]]
        return self._order[pos * self.bs : (pos + 1) * self.bs]


# -- RNG state and precision -----------------------------------------------------------------------------
def rng_state(device) -> dict:
    """The torch generator states a resumed job must continue from, as tensors for the checkpoint's safetensors:
    the CPU generator's, and every CUDA device's when the job runs on CUDA (neighbour dropout and query noise draw
    there; without it a resumed CUDA job drifted from the uninterrupted one). The numpy draws need nothing: the
    split and each epoch's order are functions of the seed."""
    import torch

    state = {"rng": torch.get_rng_state()}
    if str(device).startswith("cuda"):
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"rng.cuda.{i}"] = s
    return state


def set_rng_state(tensors: dict) -> None:
    """Restore what `rng_state` saved (other keys are ignored). The CUDA part is restored where CUDA is present,
    for as many devices as both have."""
    import torch

    if "rng" in tensors:
        torch.set_rng_state(tensors["rng"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda][: torch.cuda.device_count()])


@contextlib.contextmanager
def precision_scope(precision: str):
    """precision=tf32: CUDA float32 matmuls in TF32 while the job runs; the process's setting is restored after,
    so later work in it (inference, another job) keeps its own."""
    import torch

    if precision != "tf32":
        yield
        return
    try:
        before = torch.get_float32_matmul_precision()
    except RuntimeError:  # the process mixed torch's old and new precision APIs: only the CUDA flag is safe
        before = None
    if before is None:
        flag = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        if before is None:
            torch.backends.cuda.matmul.allow_tf32 = flag
        else:
            torch.set_float32_matmul_precision(before)


def _autocast(precision: str, device):
    """bf16: forward and loss under bfloat16 autocast, on CUDA or CPU; otherwise nothing."""
    import torch

    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _forward(model, batch, query_noise: float = 0.0):
    """(v̄, t̄, v, t). With query_noise the layers refine a noisy copy of each frozen query; the loss still compares
    with the clean v and t."""
    v, t, (ri, si, mi), (rt_, st, mt) = batch
    qv, qt = (_noisy(v, query_noise), _noisy(t, query_noise)) if query_noise else (v, t)
    return model.image(qv, ri, si, mi), model.text(qt, rt_, st, mt), v, t


def _noisy(x, norm: float):
    import torch
    import torch.nn.functional as F

    return F.normalize(x + norm * F.normalize(torch.randn_like(x), dim=-1), dim=-1)


def _in_batch_hits(a, b):
    """Whether each row of a finds its own row of b among the batch (bool tensor)."""
    import torch

    return torch.argmax(a @ b.t(), dim=1) == torch.arange(len(a), device=a.device)


def _in_batch_acc(a, b) -> float:
    return float(_in_batch_hits(a, b).float().mean())


def similar_groups(x: np.ndarray, rows: np.ndarray, size: int) -> list[np.ndarray]:
    """`rows` in groups of at most `size` (and more than size/2) whose vectors x[row] are near each other: each part
    is halved along its principal direction until it fits (a balanced PCA tree). Deterministic."""
    out, stack = [], [np.asarray(rows)]
    while stack:
        part = stack.pop()
        if len(part) <= size:
            out.append(np.sort(part))
            continue
        sub = x[part] - x[part].mean(0)
        v = sub[np.argmax(np.linalg.norm(sub, axis=1))].astype(np.float64)
        for _ in range(10):  # power iteration: the order along the direction is all that matters
            v = sub.T @ (sub @ v)
            v /= np.linalg.norm(v) or 1.0
        order = part[np.argsort(sub @ v, kind="stable")]
        stack += [order[: len(order) // 2], order[len(order) // 2 :]]
    return sorted(out, key=lambda g: int(g[0]))


def _batches(pairs: Pairs, rows: np.ndarray, batch_size: int, batching: str) -> list[np.ndarray]:
    """Fixed batches of `rows`: equal chunks, groups of similar captions (batching=similar) or each source shard
    in equal chunks (batching=shard)."""
    if batching == "similar":
        return similar_groups(pairs.text, rows, batch_size)
    if batching == "shard":
        shard = np.array(pairs.shards, dtype=object)[rows]
        return [c for name in sorted(set(shard)) for part in [rows[shard == name]]
                for c in np.array_split(part, -(-len(part) // batch_size))]
    # equal chunks: in-batch accuracy depends on the batch size, so a short last batch (259 rows at 256: a batch
    # of 3, nearly always right) would swing the mean
    return np.array_split(rows, -(-len(rows) // batch_size))


def evaluate(model, pairs: Pairs, nbrs, rows: np.ndarray, batch_size: int, device, batching: str = "random",
             data: TrainData | None = None, hits: bool = False, loss: str = "reco") -> dict:
    """Loss (`loss`: a name of app/fusion.py LOSSES) and in-batch image->text accuracy, refined and frozen, on fixed
    batches of `rows`, each weighed by its size. `data`: the pairs as `place_data` placed them (training passes its
    own, so nothing is uploaded twice). `hits`: also whether each row's image found its own caption, refined, as a
    bool array in the order of `rows` (for paired comparisons of two models on the same rows). Float32 as inference
    runs, whatever the training precision (tf32 excepted: it holds for the whole job)."""
    import torch

    from .fusion import LOSSES as LOSS_FNS

    if len(rows) < 2:
        return {}
    data = data if data is not None else place_data(pairs, nbrs, device)
    model.eval()
    losses, acc, base, right = [], [], [], {}
    chunks = [c for c in _batches(pairs, rows, batch_size, batching) if len(c) >= 2]
    with torch.no_grad():
        for chunk in chunks:
            b = data.batch(chunk)
            v_ref, t_ref, v, t = _forward(model, b)
            losses.append(float(LOSS_FNS[loss](v_ref, t_ref, v, t, model.logit_scale)))
            found = _in_batch_hits(v_ref, t_ref)
            acc.append(float(found.float().mean()))
            base.append(_in_batch_acc(v, t))
            right.update(zip(np.asarray(chunk).tolist(), found.cpu().numpy().tolist()))
    model.train()
    w = [len(c) for c in chunks]
    out = {"loss": float(np.average(losses, weights=w)), "acc": float(np.average(acc, weights=w)),
           "baseline_acc": float(np.average(base, weights=w))}
    if hits:  # a row in no batch of 2 or more (a shard of one) counts as a miss
        out["hits"] = np.array([right.get(int(r), False) for r in rows])
    return out


def select_1se(history: list[dict], n_val: int) -> tuple[dict, set[int]]:
    """(the earliest validated entry within one standard error of the best accuracy, the steps still eligible).

    The standard error is the binomial one of the best accuracy over n_val validation pairs. The threshold is kept
    monotone (the highest it has been), so an entry once below it is never picked later and its file can go."""
    validated = [h for h in history if h["val"]]
    top = threshold = -math.inf
    for h in validated:
        top = max(top, h["val"]["acc"])
        threshold = max(threshold, top - math.sqrt(top * (1 - top) / max(n_val, 1)))
    keep = [h for h in validated if h["val"]["acc"] >= threshold]
    return min(keep, key=lambda h: h["step"]), {h["step"] for h in keep}


def _opt_tensors(opt) -> tuple[dict, dict]:
    state = opt.state_dict()
    tensors = {}
    for pid, st in state["state"].items():
        for key, val in st.items():
            tensors[f"opt.{pid}.{key}"] = val if hasattr(val, "shape") else __import__("torch").tensor(val)
    return tensors, {"param_groups": state["param_groups"]}


def _restore_opt(opt, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, val in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def fusion_config(cfg: TrainConfig, dim: int):
    """The fusion layers a job with these settings trains (and starts from)."""
    from .fusion import FusionConfig

    return FusionConfig(dim=dim, k=cfg.k, heads=cfg.heads, dropout=cfg.dropout,
                        neighbour_dropout=cfg.neighbour_dropout, use_rank=cfg.use_rank, use_score=cfg.use_score,
                        init=cfg.init, score_scale_init=cfg.score_scale, retrieval=cfg.retrieval, gate=cfg.gate,
                        gate_features=cfg.gate_features, gate_temperature=cfg.gate_temperature,
                        gate_hidden=cfg.gate_hidden)


def run_training(rt, name: str, progress: bool = True,
                 on_step: Callable[[int], None] | None = None) -> dict:
    """Train (or resume) model NAME as registered by `create_job`. Returns its final metrics."""
    import torch
    from tqdm import tqdm

    from .backbone import pick_device
    from .fusion import LOSSES as LOSS_FNS
    from .fusion import build, param_groups

    with rt.db.session() as s:
        row = s.query(FusionModel).filter_by(name=name).one_or_none()
        if row is None:
            raise NotFound(f"no model named {name!r} (see `reco model list`)")
        if row.status == ModelStatus.READY:
            return row.metrics
        job, dim, ckdir = row.config["job"], row.dim, Path(row.checkpoint_dir)
        row.status, row.error = ModelStatus.TRAINING, None
    cfg = TrainConfig(**job["train"])
    device = pick_device(cfg.device or rt.settings.device)
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()

    pairs = load_pairs(rt, job["pairs"][2], job["pairs"][3])
    cache = NeighbourCache(rt, job, cfg, dim, device)
    nbrs = cache.get(pairs, progress=progress)
    if job.get("val_pairs"):
        val_cache = NeighbourCache(rt, {**job, "pairs": job["val_pairs"]}, cfg, dim, device)
        val_data = load_pairs(rt, job["val_pairs"][2], job["val_pairs"][3])
        val_nbrs = val_cache.get(val_data, progress=progress)
        train_rows, val_rows = np.arange(len(pairs.ids)), np.arange(len(val_data.ids))
    else:
        val_cache, val_data, val_nbrs = None, pairs, nbrs
        train_rows, val_rows = split(pairs, cfg)
    device_search.drop(rt.store, job["memory"][2])  # the training data needs the device memory now
    if len(train_rows) < 2:
        raise RecoError("fewer than 2 training pairs: nothing to learn from")
    bs = min(cfg.batch_size, len(train_rows))
    groups = None if cfg.batching == "random" else \
        [g for g in _batches(pairs, train_rows, bs, cfg.batching) if len(g) >= 2]  # a batch of 1 teaches nothing
    if groups == []:
        raise RecoError(f"--batching {cfg.batching} left no batch of 2 or more training pairs")
    steps_per_epoch = len(groups) if groups else max(1, len(train_rows) // bs)
    total = steps_per_epoch * cfg.epochs
    data = place_data(pairs, nbrs, device)
    val_placed = data if val_data is pairs else place_data(val_data, val_nbrs, device)
    rows_at = StepRows(train_rows, bs, steps_per_epoch, cfg.seed, groups, put=data.index)

    fcfg = fusion_config(cfg, dim)
    model = build(fcfg, cfg.seed).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.tune, cfg.weight_decay), lr=cfg.lr)
    step, best, history = 0, None, []
    base_meta = {"name": name, "backbone": None, "fusion": fcfg.to_dict(), "job": job, "code_version": __version__}
    with rt.db.session() as s:
        row = s.query(FusionModel).filter_by(name=name).one()
        base_meta["backbone"] = {"spec": row.backbone, "fingerprint": row.backbone_hash, "dim": dim}
    resumed_from = None
    if checkpoint.exists(ckdir, "last"):
        tensors, meta = checkpoint.load(ckdir, "last")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _restore_opt(opt, tensors, meta)
        step, best, history = meta["step"], meta.get("best"), meta.get("history", [])
        set_rng_state(tensors)
        resumed_from = step

    saved_step = resumed_from

    def save_last():
        nonlocal saved_step
        saved_step = step
        opt_t, opt_meta = _opt_tensors(opt)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update(opt_t)
        tensors.update(rng_state(device))
        checkpoint.save(ckdir, "last", tensors, {**base_meta, **opt_meta, "step": step, "best": best,
                                                 "history": history})

    def consider(train_loss: float | None, train_acc: float | None) -> None:
        """Validate, keep the checkpoint the selection rule picks (held-out concepts catch memorisation), save the
        last one."""
        nonlocal best
        val = evaluate(model, val_data, val_nbrs, val_rows, bs, device, cfg.val_batching or cfg.batching,
                       data=val_placed, loss=cfg.loss)
        entry = {"step": step, "epoch": step / steps_per_epoch, "train_loss": train_loss, "train_acc": train_acc,
                 "val": val, "lr": opt.param_groups[0]["lr"]}
        history.append(entry)
        if val and cfg.select == "1se":
            checkpoint.save(ckdir, f"cand-{step}", model.state_dict(), {**base_meta, "step": step, "val": val})
            pick, keep = select_1se(history, len(val_rows))
            for h in history:
                if h["val"] and h["step"] not in keep:  # below the threshold: never picked later
                    checkpoint.remove(ckdir, f"cand-{h['step']}")
            if best is None or pick["step"] != best["step"]:
                tensors, meta = checkpoint.load(ckdir, f"cand-{pick['step']}")
                checkpoint.save(ckdir, "best", tensors, meta)
            best = {"step": pick["step"], "score": pick["val"]["acc"], "val": pick["val"], "rule": "1se",
                    "top": max((h for h in history if h["val"]), key=lambda h: h["val"]["acc"])["step"]}
        else:
            score = (val or {}).get("acc", -(train_loss if train_loss is not None else float("inf")))
            if best is None or score > best["score"] or cfg.select == "last":
                best = {"step": step, "score": score, "val": val, "rule": cfg.select}
                checkpoint.save(ckdir, "best", model.state_dict(), {**base_meta, "step": step, "val": val})
        save_last()
        with rt.db.session() as s:
            s.query(FusionModel).filter_by(name=name).update({"step": step})

    bar = tqdm(total=total, initial=step, desc=f"train {name}", unit="step", disable=not progress, dynamic_ncols=True)
    scope = contextlib.ExitStack()
    scope.enter_context(precision_scope(cfg.precision))
    try:
        if step == 0 and len(val_rows) >= 2:
            consider(None, None)  # the starting point is a candidate too (with init=retrieval it may be the best)
        model.train()
        while step < total:
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg)
            batch = data.batch(rows_at(step), key=step)
            with _autocast(cfg.precision, device):
                v_ref, t_ref, v, t = _forward(model, batch, cfg.query_noise)
                loss = LOSS_FNS[cfg.loss](v_ref, t_ref, v, t, model.logit_scale)
            if step + 1 < total:
                data.prefetch(rows_at(step + 1), key=step + 1)  # host data: gathered while the device computes
            loss_value = loss.item()  # the step's one wait for the device
            if not math.isfinite(loss_value):
                kept = f"the last good checkpoint (step {saved_step}) is kept" if saved_step is not None \
                    else "no checkpoint was written yet"
                raise RecoError(f"training {name} stopped: the loss became non-finite at step {step + 1} "
                                f"(lower --lr?); {kept}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            end_of_epoch = step % steps_per_epoch == 0
            if step % cfg.checkpoint_every == 0 or end_of_epoch or step == total:
                consider(loss_value, _in_batch_acc(v_ref.detach(), t_ref.detach()))
            if on_step is not None:
                on_step(step)
    except RecoError as exc:
        with rt.db.session() as s:
            s.query(FusionModel).filter_by(name=name).update({"status": ModelStatus.FAILED, "error": str(exc)})
        raise
    finally:
        scope.close()
        bar.close()
    for cand in ckdir.glob("cand-*.json"):  # the candidates of the 1se rule: `best` holds the pick
        checkpoint.remove(ckdir, cand.stem)
    start = history[0] if history and history[0]["step"] == 0 else None
    metrics = {
        "steps": step, "epochs": cfg.epochs, "train_pairs": int(len(train_rows)), "val_pairs": int(len(val_rows)),
        # validation of the same layers untrained: the number the pick must beat for training to have helped
        "start": start["val"] if start else None, "best": best, "final": history[-1] if history else None,
        "resumed_from": resumed_from,
        "store_queries": cache.store_queries + (val_cache.store_queries if val_cache else 0),
        "seconds": round(time.monotonic() - t0, 2),
    }
    with rt.db.session() as s:
        row = s.query(FusionModel).filter_by(name=name).one()
        row.status, row.step, row.metrics, row.updated_at = ModelStatus.READY, step, metrics, utcnow()
    return metrics
