"""benchmarks/gpu.py: every path runs at toy sizes on the CPU (--tiny), and without --tiny off CUDA it refuses to
write benchmarks/results/gpu.json. No timings are asserted: this machine says nothing about a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
HEADLINE = ("ingest_items_per_s", "train_pairs_per_s_b4096", "epoch_10m_min", "reco_encode_vs_bare_b256")


def _run(*args, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_run_measures_every_headline_figure(tmp_path):
    out = tmp_path / "gpu.json"
    r = _run("--tiny", "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    h = data["headline"]
    for key in HEADLINE:
        assert isinstance(h[key], (int, float)) and h[key] > 0, (key, h[key])
    assert h["gpu"] is None and "commit" in h and data["tiny"] is True
    assert set(data["targets"]) == set(HEADLINE) and all(t["pass"] in (True, False) for t in data["targets"].values())
    assert data["train"]["per_step_cost_vs_rows"]["how"] and data["ingest"]["measured"]["items"] > 0
    assert all("error" not in data[step] for step in ("ingest", "train", "encode", "knn"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_tiny_it_refuses_off_cuda_and_writes_nothing(tmp_path):
    results = ROOT / "benchmarks" / "results" / "gpu.json"
    before = results.read_bytes() if results.is_file() else None
    r = _run("--device", "cpu", timeout=120)
    assert r.returncode != 0 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "nothing written" in r.stderr, r.stderr
    assert (results.read_bytes() if results.is_file() else None) == before
    r = _run("--tiny", "--device", "cpu", "--out", results, timeout=120)  # toy numbers never go there either
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "--out elsewhere" in r.stderr
    assert (results.read_bytes() if results.is_file() else None) == before
