"""The HTTP service against the in-process encoder: `/v1/embed` throughput and latency at concurrency 1, 4, 16 and
64 (images and texts), batching on and off, and a hot-swap run that counts failed requests.

    python benchmarks/serve.py [--memory-size 20000] [--concurrency 1,4,16,64] [--duration 6]
                               [--swap-seconds 30] [--out benchmarks/results/serve.json]

Setup (through the product, as benchmarks/inference.py): a memory of `--memory-size` 512-d CLIP-like embeddings
(clustered generator) under the ViT-B-32 spec (random weights), a RECO model trained one epoch against it, and a
second version of the memory for the swap run.

One process holds the server (uvicorn in a thread, the app of `reco serve`) and the in-process `RecoEncoder`
(the same Runtime, so both read one open memory). The clients run in a subprocess of their own (asyncio + httpx,
`--client` mode): each sends one image (a 224-px PNG, multipart) or one text per request, back to back, for
`--duration` seconds. Per concurrency c, in-process `encode_image(images[:c])` / `encode_text(texts[:c])` is timed
right before the HTTP phase at c, so both see the same machine load. The clients share this machine's cores with
the server, which the in-process encoder does not: the comparison is conservative.

Swap run: 16 clients send image and text requests for `--swap-seconds` while the main thread activates v1 and v2
in turn every second; every non-200 answer is a failed request, and an answer whose header and body name
different versions is counted too.

Targets: images/s with 16 concurrent single-image clients >= 0.8x in-process encode_image at batch 16; p99 with
one client <= 1.5x the in-process single-image call; zero failed requests during the swap.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RECO_OFFLINE"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_THROUGHPUT, TARGET_P99 = 0.8, 1.5


# -- the client (a subprocess) ------------------------------------------------------------------------------------------
async def _client_run(url: str, concurrency: int, kind: str, duration: float, warmup: float) -> dict:
    import httpx

    from app import synthetic

    buf = io.BytesIO()
    synthetic.render("red", "circle", size=224, seed=3).save(buf, format="PNG")
    image = buf.getvalue()
    latencies, failures, versions, mismatched = [], [], {}, 0
    start = time.perf_counter()
    t_measure, t_end = start + warmup, start + warmup + duration

    async def one(c: httpx.AsyncClient, i: int) -> None:
        nonlocal mismatched
        k = kind if kind != "mixed" else ("image", "text")[i % 2]
        t0 = time.perf_counter()
        try:
            if k == "image":
                r = await c.post("/v1/embed", files=[("images", ("q.png", image, "image/png"))])
            else:
                r = await c.post("/v1/embed", json={"texts": [f"a picture of thing number {i % 97}"]})
        except httpx.HTTPError as exc:
            if t0 >= t_measure:
                failures.append(f"{type(exc).__name__}: {exc}")
            return
        t1 = time.perf_counter()
        if t0 < t_measure:
            return
        if r.status_code != 200:
            failures.append(f"{r.status_code} {r.text[:200]}")
            return
        latencies.append(t1 - t0)
        body = r.json()
        v = body["memory"]["version"]
        versions[v] = versions.get(v, 0) + 1
        mismatched += r.headers.get("x-reco-memory") != f"{body['memory']['name']}@{v}"

    async def worker(c: httpx.AsyncClient, w: int) -> None:
        i = w
        while time.perf_counter() < t_end:
            await one(c, i)
            i += concurrency

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        await asyncio.gather(*(worker(c, w) for w in range(concurrency)))
    wall = time.perf_counter() - t_measure
    return {"requests": len(latencies), "failed": len(failures), "failures": failures[:5], "wall_s": wall,
            "latencies_s": latencies, "versions": versions, "header_mismatches": mismatched}


def client_main(args) -> int:
    out = asyncio.run(_client_run(args.client, args.c, args.kind, args.duration, args.warmup))
    print(json.dumps(out))
    return 0


# -- the harness --------------------------------------------------------------------------------------------------------
def run_clients(url: str, concurrency: int, kind: str, duration: float, warmup: float = 1.0) -> dict:
    cmd = [sys.executable, __file__, "--client", url, "--c", str(concurrency), "--kind", kind,
           "--duration", str(duration), "--warmup", str(warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 300)
    if done.returncode != 0:
        raise RuntimeError(f"client failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stats(latencies: list[float]) -> dict:
    import numpy as np

    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    a = np.asarray(latencies) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def in_process(enc, kind: str, batch: int, images: list, texts: list, seconds: float) -> dict:
    """Calls of encode_image(images[:batch]) (or encode_text) back to back for `seconds`: latency per call and
    items per second."""
    call = (lambda: enc.encode_image(images[:batch])) if kind == "image" else (lambda: enc.encode_text(texts[:batch]))
    call()  # warm
    lat, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(lat) < 5:
        t0 = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t0)
    return {"batch": batch, "calls": len(lat), "items_per_s": batch / statistics.median(lat), **stats(lat)}


class ServerThread:
    def __init__(self, app, port: int):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--memory-size", type=int, default=20_000)
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--data", choices=("clustered", "random"), default="clustered")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--duration", type=float, default=6.0, help="seconds of measured requests per phase")
    p.add_argument("--in-process-seconds", type=float, default=4.0)
    p.add_argument("--max-batch", type=int, default=32, help="the server's batch limit when batching is on")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--swap-seconds", type=float, default=30.0)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/serve.json")
    p.add_argument("--workdir", default=None)
    p.add_argument("--home", default=None, help="keep RECO_HOME here and reuse its memory and model (development)")
    # client mode (the load generator subprocess)
    p.add_argument("--client", default=None, help=argparse.SUPPRESS)
    p.add_argument("--c", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--kind", default="image", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        return client_main(args)

    from app import synthetic
    from app.encoder import RecoEncoder
    from app.memory import activate, list_memories
    from app.serve.api import create_app
    from app.serve.settings import ServeSettings
    from benchmarks.common import log, machine, write_result
    from benchmarks.inference import DIM, SPEC, prepare
    from benchmarks.train import build_memory, fresh_runtime, write_embeddings

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    work = Path(tempfile.mkdtemp(prefix="reco-bench-serve-", dir=args.workdir))
    home = Path(args.home) if args.home else work / "home"
    try:
        rt = fresh_runtime(home)
        setup = prepare(rt, args, work)
        versions = [v["version"] for m in list_memories(rt) if m["name"] == "mem" for v in m["versions"]]
        if len(versions) < 2:  # the swap run's second version
            src = work / "emb-mem2"
            write_embeddings(src, args.memory_size, DIM, args.data, args.seed + 1)
            setup["mem_v2_build_s"] = build_memory(rt, src, SPEC, "mem")["build_s"]
            shutil.rmtree(src, ignore_errors=True)
        activate(rt, "mem", 1)
        enc = RecoEncoder.load("bench", runtime=rt)
        palette = [synthetic.concept(i) for i in range(max(levels))]
        images = [synthetic.render(c, s, size=args.image_size, seed=1_000_000 + i) for i, (c, s) in enumerate(palette)]
        texts = [f"a picture of thing number {i}" for i in range(max(levels))]

        results: dict = {"batching_on": {}, "batching_off": {}}
        for mode, max_batch in (("batching_on", args.max_batch), ("batching_off", 1)):
            settings = ServeSettings(models=("bench",), max_batch=max_batch,
                                     max_wait_ms=args.max_wait_ms if max_batch > 1 else 0.0)
            with ServerThread(create_app(settings, runtime=rt), free_port()) as url:
                run_clients(url, 4, "mixed", 2.0, 0.5)  # warm the server
                for kind in ("image", "text"):
                    for c in levels:
                        local = in_process(enc, kind, c, images, texts, args.in_process_seconds)
                        http = run_clients(url, c, kind, args.duration)
                        row = {"concurrency": c, "requests": http["requests"], "failed": http["failed"],
                               "requests_per_s": http["requests"] / http["wall_s"], **stats(http["latencies_s"]),
                               "in_process": local}
                        row["throughput_vs_in_process"] = row["requests_per_s"] / local["items_per_s"]
                        results[mode].setdefault(kind, {})[str(c)] = row
                        log(f"{mode} {kind} c={c}: {row['requests_per_s']:.1f} req/s (in-process batch {c}: "
                            f"{local['items_per_s']:.1f}/s, x{row['throughput_vs_in_process']:.2f}), p50 "
                            f"{row['p50_ms']:.0f} ms p99 {row['p99_ms']:.0f} ms (in-process p99 {local['p99_ms']:.0f})")

        # the hot swap under load
        settings = ServeSettings(models=("bench",), max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
        swaps = []
        with ServerThread(create_app(settings, runtime=rt), free_port()) as url:
            run_clients(url, 4, "mixed", 2.0, 0.5)
            box: dict = {}
            t = threading.Thread(target=lambda: box.update(run_clients(url, 16, "mixed", args.swap_seconds, 0.5)))
            t.start()
            time.sleep(0.5)
            t_end = time.perf_counter() + args.swap_seconds
            v = 1
            while time.perf_counter() < t_end:
                v = 2 if v == 1 else 1
                t0 = time.perf_counter()
                activate(rt, "mem", v)
                swaps.append(time.perf_counter() - t0)
                time.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))
            t.join()
        activate(rt, "mem", 1)
        swap = {"seconds": args.swap_seconds, "activations": len(swaps), "clients": 16,
                "requests": box["requests"], "failed_requests": box["failed"], "failures": box["failures"],
                "versions_answered": box["versions"], "header_mismatches": box["header_mismatches"],
                **stats(box["latencies_s"])}
        log(f"swap: {len(swaps)} activations, {box['requests']} requests, {box['failed']} failed, versions "
            f"{box['versions']}")
        enc.close()
        rt.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    on = results["batching_on"]
    ratios = {
        "throughput_c16_vs_in_process": on["image"]["16"]["throughput_vs_in_process"] if "16" in on["image"] else None,
        "p99_c1_vs_in_process": on["image"]["1"]["p99_ms"] / on["image"]["1"]["in_process"]["p99_ms"]
        if "1" in on["image"] else None,
        "p99_c1_vs_in_process_median": on["image"]["1"]["p99_ms"] / on["image"]["1"]["in_process"]["p50_ms"]
        if "1" in on["image"] else None,
        "batching_on_vs_off_images_c16": on["image"]["16"]["requests_per_s"]
        / results["batching_off"]["image"]["16"]["requests_per_s"] if "16" in on["image"] else None,
        "basis": "server requests/s with c single-item clients / in-process items/s of one call at batch c, and "
                 "server p99 at c=1 / in-process p99 of the single-image call; measured phase by phase in one "
                 "process, the clients in a subprocess on the same cores",
    }
    met = {"throughput_c16": ratios["throughput_c16_vs_in_process"] is not None
           and ratios["throughput_c16_vs_in_process"] >= TARGET_THROUGHPUT,
           "p99_c1": ratios["p99_c1_vs_in_process"] is not None and ratios["p99_c1_vs_in_process"] <= TARGET_P99,
           "swap_zero_failures": swap["failed_requests"] == 0 and swap["header_mismatches"] == 0}
    result = {
        "benchmark": "serve: /v1/embed over HTTP vs in-process RecoEncoder; batching on/off; hot swap under load",
        "started": started, "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "setup": {**setup, "backbone": SPEC + " (random weights, seed 0)", "dim": DIM, "memory_items":
                  args.memory_size, "data": args.data, "image_px": args.image_size, "duration_s": args.duration,
                  "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms},
        "results": results, "swap": swap, "ratios": ratios,
        "target": {"throughput_c16_vs_in_process": f">= {TARGET_THROUGHPUT}", "p99_c1_vs_in_process":
                   f"<= {TARGET_P99}", "swap.failed_requests": 0},
        "target_met": met,
    }
    out = write_result(args.out, result)
    log(f"ratios {json.dumps({k: v for k, v in ratios.items() if k != 'basis'})}; targets {met} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
