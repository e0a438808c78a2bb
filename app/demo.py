"""`python -m app.demo compare MODEL`: zero-shot classification of held-out synthetic drawings among the
32 colour-shape concepts, frozen baseline vs RECO, on the data `make demo` generates."""

from __future__ import annotations

import argparse

import numpy as np

from . import synthetic


def compare(model: str, n: int = 96, jitter: float = 0.3, seed: int = 900_000) -> dict:
    from .encoder import RecoEncoder

    enc = RecoEncoder.load(model)
    concepts = [synthetic.concept(i) for i in range(len(synthetic.COLORS) * len(synthetic.SHAPES))]
    images = [synthetic.render(*concepts[i % len(concepts)], seed=seed + i, jitter=jitter) for i in range(n)]
    labels = np.arange(n) % len(concepts)
    v = enc.encode_image(images, refine=False)
    t = enc.encode_text([f"a picture of a {c} {s}." for c, s in concepts], refine=False)
    v_ref, t_ref = enc.refine(v, "image"), enc.refine(t, "text")
    rows = {"frozen baseline": (v, t), "RECO image side": (v_ref, t), "RECO text side": (v, t_ref),
            "RECO both sides": (v_ref, t_ref)}
    return {name: float(((a @ b.T).argmax(1) == labels).mean()) for name, (a, b) in rows.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m app.demo", description=__doc__)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compare", help="baseline vs RECO top-1 on held-out drawings")
    c.add_argument("model")
    c.add_argument("--n", type=int, default=96)
    c.add_argument("--jitter", type=float, default=0.3)
    a = ap.parse_args(argv)
    res = compare(a.model, a.n, a.jitter)
    print(f"zero-shot top-1 over 32 concepts, {a.n} held-out drawings (chance {1 / 32:.1%})")
    for name, acc in res.items():
        print(f"  {name:18} {acc:6.1%}")


if __name__ == "__main__":
    main()
