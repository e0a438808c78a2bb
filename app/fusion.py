"""The only trained part of RECO: one light transformer layer per side that fuses retrieved knowledge into a
frozen embedding, and the RECO loss.

Input tokens are the query embedding plus its k retrieved vectors (each with a learned type embedding, and a
rank embedding for the retrieved ones). Only the query token's output is used, so the layer computes attention
for that token alone: the result equals a full pre-LN encoder layer's query output, at 1/(k+1) of the cost.
Each neighbour's retrieval score, times a learned scale, is added to the query's attention logit over it, so a
sure neighbour can dominate and weak ones are ignored (see shared/research/emoji-feasibility.md).
Two starting points (`init`): "identity" zeroes the embeddings and output projections, so an untrained model
returns the frozen embedding unchanged; "retrieval" starts as score-weighted retrieval fusion,
q + α·Σ softmax(score/τ)·neighbour (query projection zero, value and output projections scaled identities), the
prior that generalised to unseen concepts in shared/research/emoji-feasibility.md; training moves on from there.

The per-query gate (`gate=True`) decides, for each query, how far to trust the memory: y = 2(1−g)·q + 2g·m, where
m is the layer's fused memory term and g ∈ [0, 1] a logistic function of the signals `FusionConfig.gate_features`
names (how sure and how consistent the retrieval is for this query, and how near its top-1's rival is: app/gate.py).
With `gate_temperature` a second linear read of the same signals, z, also sets how sharply this query's memory
term follows its top-1: the score softmax's scale is multiplied by e^z (a near tie can average its look-alikes'
votes, a clear match keep only its own). With `gate_hidden` = H > 0 the gate reads the signals through one hidden
layer of H tanh units instead of linearly, so it can weigh one signal by another (a high top-1 score means less
when every neighbour scores as high). Its output weights start at zero, so g = 0.5, e^z = 1 and the gated layer at
step 0 is exactly the ungated one (its untrained start). Trained, g rises where the neighbours agree with each other
and with the query (the memory is then likely right) and falls where they scatter (tests/test_fusion_gate.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .gate import GATE_FEATURES, gate_names


@dataclass
class FusionConfig:
    dim: int
    k: int = 10
    heads: int | None = None  # default dim // 64 (at least 1)
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    neighbour_dropout: float = 0.0  # training only: hide each retrieved token with this probability
    use_rank: bool = True
    use_score: bool = True
    score_scale_init: float = 10.0  # 1/τ of the score softmax
    init: str = "identity"  # or "retrieval": start as score-weighted retrieval fusion
    alpha_init: float = 1.0  # "retrieval": weight of the fused neighbours against the query
    # False: every retrieved token is masked, in training and at inference. The paper's Figure 3-left control:
    # the same layers trained the same way, so "more training" is told apart from "retrieval"
    retrieval: bool = True
    gate: bool = False  # a per-query weight between the query and the memory term (app/gate.py)
    # what the gate sees: app/gate.py's names, or a set's name (resolved to its names); empty: GATE_FEATURES
    gate_features: tuple[str, ...] | str = ()
    # the gate also scales, per query, the score softmax's sharpness (needs `gate`; False in models saved before it)
    gate_temperature: bool = False
    # 0: the gate is linear in its signals (every model saved before the field); H: one hidden layer of H tanh units
    gate_hidden: int = 0

    def __post_init__(self):
        self.gate_features = gate_names(self.gate_features or GATE_FEATURES)
        if self.heads is None:
            self.heads = max(1, self.dim // 64)
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.gate_temperature and not self.gate:
            raise ValueError("gate_temperature is an output of the per-query gate: it needs gate=True")
        if self.gate_hidden < 0 or (self.gate_hidden and not self.gate):
            raise ValueError("gate_hidden is the per-query gate's hidden width: >= 0, and > 0 only with gate=True")
        if self.init not in ("identity", "retrieval"):
            raise ValueError(f"fusion init must be identity or retrieval, not {self.init!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def gate_features(query, retrieved, scores, mask, names=GATE_FEATURES) -> torch.Tensor:
    """[B, len(names)] (`GATE_SIGNALS`, in the order asked); zeros where a query has no neighbour."""
    b, k, _ = retrieved.shape
    m = mask.to(retrieved.dtype)
    n = m.sum(1)
    safe = n.clamp(min=1)
    s = scores.to(retrieved.dtype) if scores is not None else torch.zeros(b, k, dtype=retrieved.dtype,
                                                                            device=retrieved.device)
    low, high = torch.finfo(s.dtype).min, torch.finfo(s.dtype).max
    ranked = s.masked_fill(~mask, low)
    top1 = torch.where(n > 0, ranked.amax(1), torch.zeros_like(n))
    last = torch.where(n > 0, s.masked_fill(~mask, high).amin(1), torch.zeros_like(n))
    mean = (s * m).sum(1) / safe
    std = (((s - mean[:, None]) ** 2 * m).sum(1) / safe).sqrt()
    r = F.normalize(retrieved, dim=-1) * m[..., None]
    total = r.sum(1)  # [B, D]
    pairs = (n * (n - 1)).clamp(min=1)
    rows = torch.arange(b, device=r.device)
    i1 = ranked.argmax(1)
    first = r[rows, i1]  # the top-1's vector
    second_ranked = ranked.clone()
    second_ranked[rows, i1] = low
    i2 = second_ranked.argmax(1)
    two = (n > 1).to(r.dtype)  # the runner-up's signals are 0 without one
    unit_query = F.normalize(query, dim=-1)
    signals = {
        "top1_score": top1, "margin": top1 - last, "score_std": std,
        "agreement": ((total * total).sum(1) - n) / pairs,
        "top1_agreement": ((first * total).sum(1) - (n > 0).to(r.dtype)) / (n - 1).clamp(min=1),
        "query_to_mean": (unit_query * F.normalize(total, dim=-1)).sum(1), "present": n / k,
        "runner_up_gap": (top1 - s[rows, i2]) * two, "runner_up_agreement": (first * r[rows, i2]).sum(1) * two,
        "query_to_top1": (unit_query * first).sum(1),
    }
    feats = torch.stack([signals[x] for x in names], dim=1)
    return feats * (n > 0).to(feats.dtype)[:, None]


class FusionLayer(nn.Module):
    """φ: (query [B, D], retrieved [B, k, D], scores [B, k], mask [B, k] True=present) -> refined [B, D]."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.dim, cfg.heads
        self.type_emb = nn.Parameter(torch.zeros(2, d))
        self.rank_emb = nn.Parameter(torch.zeros(cfg.k, d)) if cfg.use_rank else None
        self.score_scale = nn.Parameter(torch.tensor(float(cfg.score_scale_init))) if cfg.use_score else None
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, d))
        self.drop = nn.Dropout(cfg.dropout)
        for lin in (self.out, self.mlp[-1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if cfg.init == "retrieval":
            with torch.no_grad():
                # attention from the scores alone; the value of a token is its layer-normed self (a unit vector
                # times about sqrt(d)), which the output projection scales back to alpha times the neighbour
                self.q.weight.zero_()
                self.q.bias.zero_()
                self.kv.weight[d:].copy_(torch.eye(d))
                self.kv.bias[d:].zero_()
                self.out.weight.copy_(torch.eye(d) * cfg.alpha_init / math.sqrt(d))
        self.gate = None
        if cfg.gate:  # drawn outside the global generator: every other parameter starts as without the gate
            with torch.random.fork_rng(devices=[]):  # outputs: the memory's share, then the sharpness's log-scale
                self.gate = _gate(len(cfg.gate_features), cfg.gate_hidden, 1 + cfg.gate_temperature)

    def gate_value(self, query, retrieved, scores=None, mask=None) -> torch.Tensor:
        """g ∈ [0, 1] per query [B]: the memory term's share (0.5 at step 0)."""
        return torch.sigmoid(self._gate_logits(query, retrieved, scores, mask)[:, 0])

    def sharpness(self, query, retrieved, scores=None, mask=None) -> torch.Tensor:
        """e^z per query [B]: what the gate multiplies the score softmax's scale by (1 at step 0, or without
        `gate_temperature`)."""
        z = self._gate_logits(query, retrieved, scores, mask)
        return _sharpness(z) if self.cfg.gate_temperature else torch.ones_like(z[:, 0])

    def _gate_logits(self, query, retrieved, scores, mask) -> torch.Tensor:
        """The gate's outputs [B, 1 or 2] (the memory's share, then the sharpness), before their squashing."""
        if self.gate is None:
            raise ValueError("this layer has no gate (FusionConfig.gate is False)")
        if mask is None:
            mask = torch.ones(retrieved.shape[:2], dtype=torch.bool, device=retrieved.device)
        if not self.cfg.retrieval:
            mask = torch.zeros_like(mask)
        return self.gate(gate_features(query, retrieved, scores, mask, self.cfg.gate_features))

    def forward(self, query, retrieved, scores=None, mask=None):
        b, k, d = retrieved.shape
        h = self.cfg.heads
        if k > self.cfg.k:
            raise ValueError(f"got {k} neighbours, the model was built for at most {self.cfg.k}")
        if mask is None:
            mask = torch.ones(b, k, dtype=torch.bool, device=query.device)
        if not self.cfg.retrieval:
            mask = torch.zeros_like(mask)
        if self.training and self.cfg.neighbour_dropout > 0:
            mask = mask & (torch.rand(b, k, device=query.device) >= self.cfg.neighbour_dropout)
        q_tok = query + self.type_emb[0]
        r_tok = retrieved + self.type_emb[1]
        if self.rank_emb is not None:
            r_tok = r_tok + self.rank_emb[:k]
        z = None if self.gate is None else self._gate_logits(query, retrieved, scores, mask)  # [B, 1 or 2]
        tokens = torch.cat([q_tok[:, None], r_tok], dim=1)  # [B, 1+k, D]
        x = self.ln1(tokens)
        qh = self.q(x[:, :1]).view(b, 1, h, d // h).transpose(1, 2)  # [B, h, 1, dh]
        kh, vh = self.kv(x).view(b, 1 + k, 2, h, d // h).permute(2, 0, 3, 1, 4)  # [B, h, 1+k, dh] each
        logits = (qh @ kh.transpose(-1, -2)) / math.sqrt(d // h)  # [B, h, 1, 1+k]
        score_bias = torch.zeros(b, k, device=query.device, dtype=logits.dtype)
        if self.score_scale is not None and scores is not None:
            scale = self.score_scale
            if self.cfg.gate_temperature:
                scale = scale * _sharpness(z).to(logits.dtype)[:, None]
            score_bias = scale * scores.to(logits.dtype)
        bias = torch.cat([score_bias.new_zeros(b, 1), score_bias.masked_fill(~mask, float("-inf"))], dim=1)
        attn = torch.softmax(logits + bias[:, None, None, :], dim=-1)
        ctx = (self.drop(attn) @ vh).transpose(1, 2).reshape(b, d)
        memory = self.drop(self.out(ctx))
        if self.gate is None:
            y = q_tok + memory
        else:  # at g = 0.5 both factors are exactly 1: the ungated sum
            g = torch.sigmoid(z[:, :1])
            y = 2 * (1 - g) * q_tok + 2 * g * memory
        y = y + self.drop(self.mlp(self.ln2(y)))
        return F.normalize(y, dim=-1)


def _gate(signals: int, hidden: int, outputs: int) -> nn.Module:
    """The gate's map from its signals to its outputs, its output layer at zero (every output 0 at step 0): linear
    (hidden 0: its parameters keep the names `gate.weight` and `gate.bias` of every model saved before
    `gate_hidden`), or through one hidden layer of tanh units."""
    layers = [nn.Linear(signals, hidden), nn.Tanh(), nn.Linear(hidden, outputs)] if hidden else \
        [nn.Linear(signals, outputs)]
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers) if hidden else layers[0]


def _sharpness(z: torch.Tensor) -> torch.Tensor:
    """The gate's second output as a factor on the score scale, bounded at e^±4 (55 times sharper is already a hard
    top-1, 55 times softer a flat average), so that an outlier query cannot overflow the softmax."""
    return z[:, 1].clamp(-4.0, 4.0).exp()


class RecoFusion(nn.Module):
    """φ_img and φ_txt, and the learnable temperature of the loss."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.image = FusionLayer(cfg)
        self.text = FusionLayer(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature


def build(cfg: FusionConfig, seed: int) -> RecoFusion:
    """The layers at step 0. Training starts from this and `RecoEncoder.load(checkpoint="start")` rebuilds it, so
    the untrained start of any model can be evaluated beside its trained checkpoint without storing it."""
    torch.manual_seed(seed)
    return RecoFusion(cfg)


def param_groups(model: RecoFusion, tune: str, weight_decay: float) -> list[dict]:
    """What the optimizer updates. "all": every parameter. "attention": only where each side looks (query and key
    projections, type and rank embeddings, the score scale) and the loss temperature; the value and output
    projections, the layer norms and the MLP keep their start (for init=retrieval: what a neighbour adds stays the
    neighbour itself). Those large maps, fitted to the training concepts, are what eroded the retrieval prior on
    held-out concepts (README, quality)."""
    if tune == "all":
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    if tune == "scalars":
        return _scalar_groups(model)
    if tune == "gate":
        return _gate_groups(model)
    if tune != "attention":
        raise ValueError(f"tune must be all, attention, scalars or gate, not {tune!r}")
    decay, keep = [], [model.logit_scale]
    for layer in (model.image, model.text):
        for p in (*layer.out.parameters(), *layer.mlp.parameters(), *layer.ln1.parameters(), *layer.ln2.parameters()):
            p.requires_grad_(False)
        d = layer.cfg.dim
        for p in layer.kv.parameters():  # keys learn, values (the second half of the rows) do not
            p.register_hook(lambda g, d=d: torch.cat([g[:d], torch.zeros_like(g[d:])]))
        decay += [layer.q.weight]
        keep += [layer.q.bias, *layer.kv.parameters(), layer.type_emb] + \
            [p for p in (layer.rank_emb, layer.score_scale) if p is not None]
    # no weight decay where it would move a frozen value row or a scale away from its start
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching rows."""
    logits = logit_scale.exp().clamp(max=100) * a @ b.t()
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def reco_loss(v_ref, t_ref, v, t, logit_scale) -> torch.Tensor:
    """InfoNCE(v̄, t̄) + InfoNCE(v̄, t) + InfoNCE(v, t̄)."""
    return info_nce(v_ref, t_ref, logit_scale) + info_nce(v_ref, t, logit_scale) + info_nce(v, t_ref, logit_scale)


def fused_loss(v_ref, t_ref, v, t, logit_scale) -> torch.Tensor:
    """InfoNCE(v̄, t̄) alone: the comparison zero-shot classification and retrieval make when both sides retrieve.
    The frozen v and t are taken and unused, so that every loss has one signature."""
    return info_nce(v_ref, t_ref, logit_scale)


# `reco train --loss`: the paper's three terms, or the fused pair alone (app/train.py LOSSES names them torch-free)
LOSSES = {"reco": reco_loss, "fused": fused_loss}


def _scalar_groups(model: RecoFusion) -> list[dict]:
    """tune="scalars": per side, only how much the memory weighs against the query (the output projection's scale
    along the identity: its gradient is projected onto the identity, so the map stays alpha times the identity)
    and the score scale; plus the loss temperature. Nothing that could fit a concept learns, only the balance of
    the retrieval prior."""
    keep = [model.logit_scale]
    for layer in (model.image, model.text):
        for p in layer.parameters():
            p.requires_grad_(False)
        layer.out.weight.requires_grad_(True)
        eye = torch.eye(layer.cfg.dim)
        layer.out.weight.register_hook(lambda g, eye=eye: eye.to(g) * torch.diagonal(g).mean())
        keep.append(layer.out.weight)
        if layer.score_scale is not None:
            layer.score_scale.requires_grad_(True)
            keep.append(layer.score_scale)
    return [{"params": keep, "weight_decay": 0.0}]


def _gate_groups(model: RecoFusion) -> list[dict]:
    """tune="gate": only each side's per-query gate (and the loss temperature) learns; the retrieval prior itself
    stays as it started, so training can only choose, query by query, how far to trust it."""
    if model.image.gate is None:
        raise ValueError("--tune gate needs the gated fusion (--gate)")
    for p in model.parameters():
        p.requires_grad_(False)
    keep = [model.logit_scale, *model.image.gate.parameters(), *model.text.gate.parameters()]
    for p in keep:
        p.requires_grad_(True)
    return [{"params": keep, "weight_decay": 0.0}]
