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
