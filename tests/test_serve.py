"""`reco serve`: every route, every bad request, batching, the hot swap under load, auth, metrics, the page."""

import base64
import io
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import synthetic
from app.build import build_in_process
from app.encoder import RecoEncoder
from app.memory import activate
from app.query import query_memory
from app.runtime import Runtime
from app.serve.api import create_app
from app.serve.settings import ServeSettings
from app.settings import ENV_VARS, Settings
from app.train import TrainConfig, create_job, run_training

JITTER = 0.3
CLASSES = ["red circle", "blue triangle", "green square", "yellow star"]


def png(color="red", shape="circle", seed=5) -> bytes:
    buf = io.BytesIO()
    synthetic.render(color, shape, seed=seed, jitter=JITTER).save(buf, format="PNG")
    return buf.getvalue()


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_config):
    """An embedded home with memory `mem` (v1 active, v2 ready) and a trained model `m` on it."""
    home = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        for var in ENV_VARS:
            mp.delenv(var, raising=False)
        mp.setenv("RECO_HOME", str(home / "home"))
        mp.setenv("RECO_OFFLINE", "1")
        rt = Runtime(Settings.from_env())
        synthetic.write_wds(home / "v1", 4, 64, seed=1, jitter=JITTER)
        build_in_process(rt, "mem", str(home / "v1"), backbone=tiny_config, activate=True)
        synthetic.write_wds(home / "v2", 2, 16, seed=7, jitter=1.0, prefix="x")
        build_in_process(rt, "mem", str(home / "v2"), backbone=tiny_config)
        create_job(rt, "m", "mem", "mem", TrainConfig(k=10, epochs=3, batch_size=64, lr=3e-3, dedup_threshold=None,
                                                     checkpoint_every=1000, val_by="item"))
        run_training(rt, "m", progress=False)
        yield rt
        activate(rt, "mem", 1)
        rt.close()


@pytest.fixture
def client(served):
    activate(served, "mem", 1)
    with TestClient(create_app(ServeSettings(), runtime=served)) as c:
        yield c


# -- routes --------------------------------------------------------------------------------------------------------
def test_embed_matches_the_in_process_encoder_and_names_the_version(client, served):
    images = [png(), png("blue", "triangle", 9)]
    texts = ["a red circle", "a blue triangle"]
    r = client.post("/v1/embed", json={"images": [b64(x) for x in images], "texts": texts, "frozen": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["memory"] == {"name": "mem", "version": 1} and r.headers["x-reco-memory"] == "mem@1"
    enc = RecoEncoder.load("m", memory="mem@1", runtime=served)
    pil = [synthetic.render("red", "circle", seed=5, jitter=JITTER), synthetic.render("blue", "triangle", seed=9,
                                                                                        jitter=JITTER)]
    np.testing.assert_allclose([i["embedding"] for i in body["images"]], enc.encode_image(pil), atol=1e-5)
    np.testing.assert_allclose([i["frozen"] for i in body["images"]], enc.encode_image(pil, refine=False), atol=1e-5)
    np.testing.assert_allclose([t["embedding"] for t in body["texts"]], enc.encode_text(texts), atol=1e-5)
    v = np.array([i["embedding"] for i in body["images"]])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)

    # multipart uploads; refinement off per side gives the frozen vectors
    r = client.post("/v1/embed", files=[("images", ("a.png", images[0], "image/png"))],
                    data={"texts": texts, "refine_image": "false"})
    assert r.status_code == 200 and r.json()["refined"] == {"image": False, "text": True}
    np.testing.assert_allclose(r.json()["images"][0]["embedding"], body["images"][0]["frozen"], atol=1e-5)


def test_classify_returns_reco_and_the_frozen_baseline_side_by_side(client, served):
    from app.datasets import templates_for
    from app.metrics import zero_shot_weights

    r = client.post("/v1/classify", json={"images": [b64(png()), b64(png("green", "square", 3))],
                                          "classes": CLASSES, "top_k": 3, "compare": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and all(len(x["reco"]) == 3 and len(x["baseline"]) == 3 for x in results)
    enc = RecoEncoder.load("m", memory="mem@1", runtime=served)
    tpl = templates_for("default")
    prompts = [t.format(c=c) for c in CLASSES for t in tpl]
    w = zero_shot_weights(enc.encode_text(prompts), len(CLASSES), len(tpl))
    v = enc.encode_image([synthetic.render("red", "circle", seed=5, jitter=JITTER)])
    assert results[0]["reco"][0]["label"] == CLASSES[int((v @ w.T).argmax())]
    assert abs(results[0]["reco"][0]["score"] - float((v @ w.T).max())) < 1e-4
    probs = [x["probability"] for x in results[0]["reco"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_search_answers_as_memory_query_does(client, served):
    r = client.post("/v1/search", data={"text": "a picture of a red circle.", "k": "4", "thumbnails": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = query_memory(served, "mem", text="a picture of a red circle.", k=4)
    assert [h["key"] for h in body["hits"]] == [h.payload["key"] for h in expected]
    assert all(h["caption"] and h["thumbnail"].startswith("data:image/png;base64,") for h in body["hits"])
    r = client.post("/v1/search", files=[("images", ("q.png", png(), "image/png"))], data={"memory": "mem@2", "k": 3})
    assert r.status_code == 200 and r.json()["memory"] == {"name": "mem", "version": 2} and len(r.json()["hits"]) == 3
    assert r.json()["query"] == "image" and r.headers["x-reco-memory"] == "mem@2"


def test_models_memories_health_and_metrics(client):
    models = client.get("/v1/models").json()["models"]
    assert [(m["name"], m["memory"], m["memory_version"], m["dim"]) for m in models] == [("m", "mem", 1, 64)]
    mems = client.get("/v1/memories").json()["memories"]
    assert mems == [{"name": "mem", "active_version": 1, "backbone": mems[0]["backbone"], "items": 256,
                     "versions": [1, 2]}]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "models": ["m"]}
    client.post("/v1/embed", json={"texts": ["x"]})
    client.post("/v1/embed", json={"texts": []})
    text = client.get("/metrics").text
    for line in ('reco_requests_total{route="/v1/embed",status="200"} 1.0',
                 'reco_requests_total{route="/v1/embed",status="422"} 1.0',
                 'reco_request_errors_total{route="/v1/embed"} 1.0',
                 'reco_memory_version{memory="mem",model="m"} 1.0',
                 'reco_batch_size_count{model="m",side="text"} 1.0'):
        assert line in text, line
    for stage in ("encode", "search", "fuse"):
        assert f'reco_stage_seconds_count{{model="m",stage="{stage}"}}' in text
    assert 'reco_request_seconds_bucket{le="0.001",route="/v1/embed"}' in text
    assert client.get("/").headers["content-type"].startswith("text/html")
    assert client.get("/openapi.json").json()["paths"]["/v1/embed"]["post"]["requestBody"]


# -- bad requests ------------------------------------------------------------------------------------------------
BAD = [
    ("/v1/embed", dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    ("/v1/embed", dict(json=["a"]), 400, "must be an object"),
    ("/v1/embed", dict(json={}), 422, "at least one image or text"),
    ("/v1/embed", dict(json={"images": ["%%%"]}), 400, "not valid base64"),
    ("/v1/embed", dict(json={"images": [b64(b"these bytes are no image")]}), 400, "image 0 is not an image"),
    ("/v1/embed", dict(json={"images": [b64(png()[:60])]}), 400, "image 0 cannot be decoded"),
    ("/v1/embed", dict(files=[("images", ("x.txt", b"plain text", "text/plain"))]), 400, "not an image"),
    ("/v1/embed", dict(json={"images": [b64(png())] * 5}), 413, "at most 4"),
    ("/v1/embed", dict(json={"texts": ["x"] * 5}), 413, "at most 4"),
    ("/v1/embed", dict(json={"images": [b64(b"\0" * 20000)]}), 413, "over the 16384-byte limit"),
    ("/v1/embed", dict(json={"texts": ["x"], "model": "nope"}), 404, "no model 'nope' is served here; served: m"),
    ("/v1/embed", dict(json={"texts": ["x"], "colour": 1}), 422, "colour: Extra inputs are not permitted"),
    ("/v1/embed", dict(json={"texts": "x"}), 422, "texts: Input should be a valid list"),
    ("/v1/classify", dict(json={"images": [b64(png())], "classes": []}), 422, "at least one class name"),
    ("/v1/classify", dict(json={"images": [b64(png())], "classes": ["a", " "]}), 422, "none of them empty"),
    ("/v1/classify", dict(json={"images": [b64(png())]}), 422, "classes: Field required"),
    ("/v1/classify", dict(json={"classes": ["a"]}), 422, "at least one image"),
    ("/v1/classify", dict(json={"images": [b64(png())], "classes": ["a"], "templates": ["a photo"]}), 422, "{c}"),
    ("/v1/classify", dict(json={"images": [b64(png())], "classes": [f"c{i}" for i in range(11)]}), 413,
     "at most 10"),
    ("/v1/search", dict(json={"text": "x", "k": 0}), 422, "k: Input should be greater than or equal to 1"),
    ("/v1/search", dict(json={"text": "x", "k": 51}), 422, "over the limit of 50"),
    ("/v1/search", dict(json={"text": "x", "k": "many"}), 422, "k: Input should be a valid integer"),
    ("/v1/search", dict(json={}), 422, "exactly one query"),
    ("/v1/search", dict(json={"text": "x", "images": [b64(png())]}), 422, "exactly one query"),
    ("/v1/search", dict(json={"images": [b64(png()), b64(png())]}), 422, "one query image per search"),
    ("/v1/search", dict(json={"text": "x", "memory": "nope"}), 404, "no memory named 'nope'"),
    ("/v1/search", dict(json={"text": "x", "memory": "mem@9"}), 404, "mem"),
    ("/v1/search", dict(json={"text": "x", "memory": "Bad Name"}), 422, "memory: invalid memory name"),
    ("/v1/search", dict(json={"text": "x", "memory": "other"}), 409, "same backbone"),
    ("/v1/nothing", dict(json={}), 404, "no route POST /v1/nothing"),
]


@pytest.fixture
def strict_client(served, tmp_path, tiny_config):
    """Small limits, and a memory `other` of another backbone."""
    from app.memory import list_memories

    if "other" not in [m["name"] for m in list_memories(served)]:
        synthetic.write_wds(tmp_path / "o", 1, 8, seed=3, jitter=JITTER)
        other = tmp_path / "other.json"
        other.write_text((open(tiny_config).read()).replace('"embed_dim": 64', '"embed_dim": 32'))
        build_in_process(served, "other", str(tmp_path / "o"), backbone=str(other), activate=True)
    activate(served, "mem", 1)
    settings = ServeSettings(max_items=4, max_image_bytes=16384, max_classes=10, max_k=50)
    with TestClient(create_app(settings, runtime=served)) as c:
        yield c


def test_bad_requests_get_a_4xx_that_says_what_to_fix_and_the_server_keeps_serving(strict_client):
    for route, kw, status, says in BAD:
        r = strict_client.post(route, **kw)
        assert r.status_code == status and says in r.json()["error"], (route, kw.get("json"), r.status_code, r.text)
        assert "Traceback" not in r.text
    assert strict_client.post("/v1/embed", json={"texts": ["still here"]}).status_code == 200
    counted = strict_client.get("/metrics").text
    assert 'reco_request_errors_total{route="/v1/search"}' in counted


def test_an_unexpected_error_is_a_500_without_a_traceback(served, monkeypatch):
    from app.serve import engine

    def boom(self, *a, **k):
        raise ValueError("something internal at /secret/path")

    monkeypatch.setattr(engine.ServedModel, "_run_texts", boom)
    with TestClient(create_app(ServeSettings(), runtime=served), raise_server_exceptions=False) as c:
        r = c.post("/v1/embed", json={"texts": ["x"]})
        assert r.status_code == 500 and r.json() == {
            "error": "internal error (ValueError); the server log has the details"}
        assert c.get("/healthz").status_code == 200


# -- auth -----------------------------------------------------------------------------------------------------------
def test_bearer_token_when_set_and_never_logged(served, caplog):
    token = "s3cret-token-value"
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(ServeSettings(token=token), runtime=served)) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # probes and page are open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            r = c.post("/v1/embed", json={"texts": ["x"]}, headers=headers)
            assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/metrics").status_code == 401 and c.get("/v1/models").status_code == 401
        ok = {"Authorization": f"Bearer {token}"}
        assert c.post("/v1/embed", json={"texts": ["x"]}, headers=ok).status_code == 200
        assert c.get("/metrics", headers=ok).status_code == 200
    assert token not in caplog.text and token not in repr(ServeSettings(token=token))
    with TestClient(create_app(ServeSettings(), runtime=served)) as c:  # off by default
        assert c.post("/v1/embed", json={"texts": ["x"]}).status_code == 200
        assert "access-control-allow-origin" not in c.get("/healthz", headers={"Origin": "http://x"}).headers
    with TestClient(create_app(ServeSettings(cors_origins=("http://app.example",)), runtime=served)) as c:
        ok = c.get("/healthz", headers={"Origin": "http://app.example"}).headers
        assert ok["access-control-allow-origin"] == "http://app.example"
        assert "access-control-allow-origin" not in c.get("/healthz", headers={"Origin": "http://x"}).headers


# -- batching and the hot swap, on a real server -----------------------------------------------------------------
class Server:
    """uvicorn on a free port in a thread: requests from many client threads arrive concurrently."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def test_concurrent_requests_share_batches_and_get_their_own_answers(served):
    activate(served, "mem", 1)
    texts = [f"a picture of a {c}." for c in CLASSES * 4]
    enc = RecoEncoder.load("m", memory="mem@1", runtime=served)
    expected = enc.encode_text(texts)
    app = create_app(ServeSettings(max_batch=16, max_wait_ms=200), runtime=served)
    with Server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda t: c.post("/v1/embed", json={"texts": [t]}), texts))
        assert all(a.status_code == 200 for a in answers)
        got = np.array([a.json()["texts"][0]["embedding"] for a in answers])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        metrics = c.get("/metrics").text
    count = float(metrics.split('reco_batch_size_count{model="m",side="text"} ')[1].split()[0])
    total = float(metrics.split('reco_batch_size_sum{model="m",side="text"} ')[1].split()[0])
    assert total == len(texts) and count < len(texts)  # some requests shared a backbone batch


def test_hot_swap_under_load_no_failures_and_no_mixed_answers(served, tmp_path):
    """Clients embed three images and two texts in a loop while another process activates v1 and v2 in turn:
    every answer equals what the version it names gives, and both versions are seen."""
    import os
    import subprocess
    import sys

    activate(served, "mem", 1)
    images = [png(), png("blue", "triangle", 9), png("green", "square", 3)]
    texts = ["a red circle", "a green square"]
    pil = [synthetic.render(*a, seed=s, jitter=JITTER) for a, s in
           ((("red", "circle"), 5), (("blue", "triangle"), 9), (("green", "square"), 3))]
    expected = {}
    for v in (1, 2):
        enc = RecoEncoder.load("m", memory=f"mem@{v}", runtime=served)
        expected[v] = (enc.encode_image(pil), enc.encode_text(texts))
    assert not np.allclose(expected[1][0], expected[2][0], atol=1e-3)
    stop = threading.Event()
    seen, failures = [], []

    def client_loop(url):
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/embed", json={"images": [b64(x) for x in images], "texts": texts})
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                body = r.json()
                v = body["memory"]["version"]
                got_i = np.array([x["embedding"] for x in body["images"]])
                got_t = np.array([x["embedding"] for x in body["texts"]])
                mixed = not (np.allclose(got_i, expected[v][0], atol=1e-4) and np.allclose(got_t, expected[v][1],
                                                                                         atol=1e-4))
                seen.append((v, mixed, r.headers["x-reco-memory"] == f"mem@{v}"))

    env = {**os.environ, "RECO_HOME": str(served.settings.home)}
    with Server(create_app(ServeSettings(max_wait_ms=2), runtime=served)) as url:
        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(client_loop, url)
            for v in (2, 1, 2, 1):
                time.sleep(0.4)
                done = subprocess.run([sys.executable, "-m", "app", "memory", "activate", "mem", str(v)], env=env,
                                      capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, done.stderr
            time.sleep(0.4)
            stop.set()
    assert not failures, failures[:3]
    assert {v for v, _, _ in seen} == {1, 2}
    assert not any(mixed for _, mixed, _ in seen) and all(h for _, _, h in seen)


# -- the search page -------------------------------------------------------------------------------------------------
def test_search_page_in_headless_chromium(served, tmp_path):
    """Type a text: the memory's nearest items appear with their pictures; drop an image and name classes: the
    frozen baseline's and RECO's labels appear side by side. No console errors; the screenshot is not blank."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from tests.browser import chromium

    binary = chromium()
    activate(served, "mem", 1)
    query = tmp_path / "query.png"
    query.write_bytes(png("blue", "triangle", 9))
    errors = []
    with Server(create_app(ServeSettings(), runtime=served)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("#model option", state="attached", timeout=30_000)
            page.fill("#text", "a picture of a red circle.")
            page.click("#go")
            page.wait_for_selector("#hits figure img", timeout=30_000)
            assert page.locator("#hits figure").count() == 12
            assert "mem v1" in page.inner_text("#status")
            loaded = page.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length")
            assert loaded >= 12
            page.set_input_files("#file", str(query))
            page.fill("#classes", "red circle\nblue triangle, green square")
            page.click("#go")
            page.wait_for_selector("#labels table", timeout=30_000)
            rows = page.locator("#labels tr").all_inner_texts()
            assert rows[0].split("\t") == ["rank", "frozen CLIP", "RECO"] and len(rows) == 4
            assert "(image query)" in page.inner_text("#status") and page.inner_text("#error") == ""
            page.screenshot(path=str(tmp_path / "page.png"))
        finally:
            browser.close()
    assert not errors, errors
    pixels = np.asarray(Image.open(tmp_path / "page.png").convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and (pixels < 200).mean() > 0.02  # text and pictures, not a blank page


# -- the command ------------------------------------------------------------------------------------------------------
def test_reco_serve_command_starts_answers_and_refuses_what_cannot_work(served, tmp_path):
    import os
    import subprocess
    import sys

    from click.testing import CliRunner

    from app.cli import cli

    env = {**os.environ, "RECO_HOME": str(served.settings.home)}
    runner = CliRunner()
    for args, says in ((["--model", "nope"], "no model named 'nope': ready ones are m"),
                       (["--workers", "2"], "needs a Qdrant server"),
                       (["--max-wait-ms", "-1"], "-1")):
        r = runner.invoke(cli, ["serve", *args], env=env)
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = runner.invoke(cli, ["serve", "--port", str(taken.getsockname()[1])], env=env)
        assert r.exit_code == 1 and "pick another --port" in r.output, r.output
    empty = {**env, "RECO_HOME": str(tmp_path / "empty")}
    r = runner.invoke(cli, ["serve"], env=empty)
    assert r.exit_code == 1 and "no ready model to serve" in r.output

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port), "--model", "m"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embed", json={"texts": ["a red circle"]}, timeout=30)
        assert r.status_code == 200 and r.headers["x-reco-memory"].startswith("mem@")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "serving m on http://127.0.0.1" in out


def test_python_client(served, tmp_path):
    from app.serve.client import ClientError, RecoClient, main

    activate(served, "mem", 1)
    query = tmp_path / "q.png"
    query.write_bytes(png("blue", "triangle", 9))
    with Server(create_app(ServeSettings(token="t0k"), runtime=served)) as url:
        c = RecoClient(url, token="t0k")
        assert c.wait_ready(10)["status"] == "ready"
        assert [m["name"] for m in c.models()] == ["m"] and c.memories()[0]["name"] == "mem"
        hits = c.search(text="a picture of a red circle.", k=3)["hits"]
        assert [h["key"] for h in hits] == [h.payload["key"] for h in
                                            query_memory(served, "mem", text="a picture of a red circle.", k=3)]
        assert len(c.search(image=query, k=2)["hits"]) == 2
        out = c.classify([query, query.read_bytes()], CLASSES, compare=True, top_k=2)
        assert len(out["results"]) == 2 and out["results"][0] == out["results"][1]
        emb = c.embed(images=[synthetic.render("red", "circle", seed=5, jitter=JITTER)], texts=["x"])
        assert len(emb["images"][0]["embedding"]) == 64 and emb["memory"]["version"] == 1
        with pytest.raises(ClientError) as e:
            c.search(text="x", memory="nope")
        assert e.value.status == 404 and "no memory named 'nope'" in e.value.message
        with pytest.raises(ClientError) as e:
            RecoClient(url).models()
        assert e.value.status == 401
        assert main(["--url", url, "--token", "t0k", "classify", str(query), "--classes", "red circle,blue triangle"]) == 0
        assert main(["--url", url, "search", "--text", "x"]) == 1  # no token: one error line, exit 1
