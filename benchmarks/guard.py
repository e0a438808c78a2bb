"""How the leakage guard's pixel test separates copies from other drawings of the same concept.

    python benchmarks/guard.py      # -> benchmarks/results/guard.json

Real artwork: for 400 emoji (seeded), facebook's drawing against twitter's drawing of the same emoji (another
picture of the concept: must stay retrievable) and against copies of itself (JPEG q75, downscaled and back, a 90 %
crop, crop + JPEG q60: must be caught), scored as the guard scores them (the best correlation of 32x32 colour
thumbnails over the light crops). And the demo's synthetic drawings: an evaluation drawing against memory drawings
of the same concept, in the memory's style (vendor 0) and in another (vendor 1).
"""

from __future__ import annotations

import inspect
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import synthetic  # noqa: E402
from app.guard import LeakageGuard, crop_thumbnails, thumbnail  # noqa: E402
from benchmarks.common import log, write_result  # noqa: E402

THRESHOLD = inspect.signature(LeakageGuard).parameters["pixel_threshold"].default


def _score(image, other) -> float:
    return float((crop_thumbnails(image) @ thumbnail(other)).max())


def _summary(values) -> dict:
    a = np.asarray(values)
    qs = (0, 0.01, 0.05, 0.5, 0.95, 0.99, 1)
    return {"n": len(a), "quantiles": dict(zip(map(str, qs), np.round(np.quantile(a, qs), 4).tolist())),
            "share_at_or_above_threshold": float(np.mean(a >= THRESHOLD))}


def emoji_pairs(n: int = 400, seed: int = 0) -> dict:
    from PIL import Image

    from benchmarks.emoji import data

    def png(e, vendor):
        return Image.open(io.BytesIO(data.rgb_png(e.images[vendor]))).convert("RGB")

    def jpeg(im, q):
        b = io.BytesIO()
        im.save(b, "JPEG", quality=q)
        return Image.open(io.BytesIO(b.getvalue())).convert("RGB")

    def crop(im, f=0.9):
        w, h = im.size
        return im.crop((int(w * (1 - f) / 2), int(h * (1 - f) / 2), int(w * (1 + f) / 2), int(h * (1 + f) / 2)))

    emojis = data.catalogue(data.DEFAULT_CACHE)
    chosen = [emojis[i] for i in np.random.default_rng(seed).permutation(len(emojis))[:n]]
    other, flags, copies = [], [], []
    for e in chosen:
        if not {"facebook", "twitter"} <= set(e.images):
            continue
        fb = png(e, "facebook")
        (flags if e.subcategory == "country-flag" else other).append(_score(fb, png(e, "twitter")))
        for c in (jpeg(fb, 75), fb.resize((48, 48)).resize(fb.size), crop(fb), jpeg(crop(fb), 60)):
            copies.append(_score(fb, c))
    return {"copies": _summary(copies), "other_vendor": _summary(other), "other_vendor_flags": _summary(flags)}


def demo_drawings() -> dict:
    memory = [synthetic.render(*synthetic.concept(i), seed=100003 + i, jitter=0.3) for i in range(256)]
    out = {}
    for vendor in (0, 1):
        evals = [synthetic.render(*synthetic.concept(i), seed=900000 + i, jitter=0.3, vendor=vendor)
                 for i in range(96)]
        out[f"eval_vendor_{vendor}"] = _summary([_score(e, m) for i, e in enumerate(evals) for j, m in
                                                 enumerate(memory) if synthetic.concept(i) == synthetic.concept(j)])
    return out


def main() -> None:
    result = {"benchmark": "leakage guard: copies vs other drawings of the same concept", "threshold": THRESHOLD,
              "emoji": emoji_pairs(), "demo_same_concept": demo_drawings()}
    out = Path("benchmarks/results/guard.json")
    write_result(out, result)
    log(f"-> {out}")
    for k, v in {**result["emoji"], **result["demo_same_concept"]}.items():
        log(f"{k}: {v}")


if __name__ == "__main__":
    main()
