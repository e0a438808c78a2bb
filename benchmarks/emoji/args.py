"""The arguments the emoji commands share (the protocol run, balance, crossfit): one spelling, one parser each."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import data
from .protocol import Protocol

RESULTS = Path("benchmarks/results")  # where result files go, relative to the repository root


def shared(ap: argparse.ArgumentParser, seeds: str = "0,1,2") -> None:
    """--seeds, --home, --cache, --max-others and --out-dir, with the same defaults and help everywhere."""
    ap.add_argument("--seeds", default=seeds, help="seeds, comma-separated: one run each")
    ap.add_argument("--home", default=os.environ.get("RECO_BENCH_HOME", ".reco-bench"),
                    help="where the base model cache and the runs' RECO_HOME live")
    ap.add_argument("--cache", default=str(data.DEFAULT_CACHE), help="npm package cache")
    ap.add_argument("--max-others", type=int, default=None, help="keep N non-target emoji (reduced run)")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the result files go")


def listed(ap: argparse.ArgumentParser, flag: str, text: str, kind=int) -> list:
    """A comma-separated option as a list of `kind`, or one usage error naming the option (no traceback)."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ap.error(f"{flag} takes {'integers' if kind is int else 'numbers'}, comma-separated, not {text!r}")


def split(ap: argparse.ArgumentParser) -> None:
    """--unseen-val and --novel-pairs: the seeded concept shares (Protocol's), for the run and the cross-fit."""
    ap.add_argument("--unseen-val", type=float, default=Protocol.unseen_val,
                    help="share of the non-target emoji held out in whole subcategories: the gate trains on them")
    ap.add_argument("--novel-pairs", type=float, default=Protocol.novel_pairs,
                    help="share of the non-target emoji the base knows as it knows the targets (absent or rare)")
