"""What every benchmark records and prints: the machine it ran on, package versions, timestamped log lines."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import time

PACKAGES = ("open_clip_torch", "qdrant-edge-py", "pillow")


def version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def machine(packages=PACKAGES) -> dict:
    """Cores, torch threads, load and versions: a shared machine's numbers only mean something beside these."""
    import numpy as np
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        **{dist: version(dist) for dist in packages},
    }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_result(path, result: dict):
    """benchmarks/results/NAME.json: every figure, indented, newline-terminated. Returns the path."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def build_ready(rt, name: str, source, spec: str | None, activate: bool = True, **options) -> tuple[float, dict]:
    """Build a version of NAME from `source` through the product (`start_build` + `run_in_process`, as `reco
    memory build` does), activate it unless told not to, and return (wall seconds, its row's figures); any other end
    than ready stops the benchmark. `options` go to start_build (`parent=` and `remove_keys=` make a delta)."""
    from app.build import run_in_process, start_build
    from app.db.models import MemoryVersion, VersionStatus

    t0 = time.perf_counter()
    v = start_build(rt, name, str(source) if source is not None else None, backbone=spec, activate=activate,
                    **options)
    run_in_process(rt, v.id, show_progress=False)
    wall = time.perf_counter() - t0
    with rt.db.session() as s:
        row = s.get(MemoryVersion, v.id)
        if row.status != VersionStatus.READY:
            raise SystemExit(f"memory {name} build ended {row.status}: {row.error}")
        return wall, {"items": row.items_stored, "skipped": row.items_skipped, "collection": row.collection,
                      "backbone": row.backbone, "version": row.version, "details": row.details,
                      "skip_reasons": {r: n for sh in row.shards for r, n in (sh.skip_reasons or {}).items()}}
