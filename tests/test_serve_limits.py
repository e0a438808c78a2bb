"""`reco serve` under abuse (issue 28): work budgets refused up front, one request never starves the rest, bodies
bounded in size and time, disconnects counted apart, search keeps its memory open, an OpenAPI that says what the
service refuses, and a Schemathesis run over it."""

import json
import logging
import re
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from app.memory import CLASSES as CLASS_SET, activate, create_version
from app.serve.api import create_app
from app.serve.settings import ServeSettings
from tests.test_serve import CLASSES, Server, b64, png, served  # noqa: F401  (served: the module's fixture)


@pytest.fixture
def app_with(served):  # noqa: F811
    """create_app(ServeSettings(**limits)) on the served home, with memory `mem` at v1."""
    activate(served, "mem", 1)
    return lambda **limits: create_app(ServeSettings(**limits), runtime=served)


def error_of(r, status: int) -> str:
    """The one-line `{"error"}` body of a refusal."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and "Traceback" not in r.text
    return body["error"]


def raw_request(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head + body)
    return s


def read_answer(s: socket.socket) -> str:
    """The whole response: a server may send its head and body in separate writes, so one recv can end early."""
    buf = b""
    while True:
        head, sep, body = buf.partition(b"\r\n\r\n")
        if sep:
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if length and len(body) >= int(length.group(1)):
                return buf.decode()
        chunk = s.recv(65536)
        if not chunk:  # closed: all there is
            return buf.decode()
        buf += chunk


# -- 1. memory references ----------------------------------------------------------------------------------------
def test_bad_memory_references_are_4xx_not_500_or_503(app_with, served):  # noqa: F811
    if not any(m == "labels" for m in _memory_names(served)):
        create_version(served, "labels", source="names.txt", fmt="names", backbone="b", backbone_hash="h", dim=64,
                       shard_specs=[{"name": "names.txt", "rows": 1}], kind=CLASS_SET)
    with TestClient(app_with()) as c:
        for memory, status, says in (("mem@9223372036854775808", 422, "out of range"),
                                     ("mem@2147483648", 422, "out of range"),
                                     ("mem@0", 422, "out of range"),
                                     ("labels", 422, "labels is a class set, not a memory"),
                                     ("labels@1", 422, "class set")):
            assert says in error_of(c.post("/v1/search", json={"text": "x", "memory": memory}), status), memory
        assert c.post("/v1/search", json={"text": "x", "memory": "mem@2"}).status_code == 200


def _memory_names(rt):
    from app.db.models import Memory

    with rt.db.session() as s:
        return [m.name for m in s.query(Memory)]


# -- 2. work budgets and fairness --------------------------------------------------------------------------------
def test_work_budgets_are_refused_up_front(app_with):
    with TestClient(app_with(max_prompts=50, max_text_chars=100)) as c:
        img = b64(png())
        says = error_of(c.post("/v1/classify", json={"images": [img], "classes": [f"c{i}" for i in range(11)],
                                                     "templates": ["a {c}.", "the {c}.", "one {c}.", "my {c}.",
                                                                   "{c}!"]}), 413)
        assert "11 classes x 5 templates = 55 prompts" in says and "RECO_SERVE_MAX_PROMPTS" in says
        assert c.post("/v1/classify", json={"images": [img], "classes": CLASSES,
                                            "templates": ["a {c}."] * 12}).status_code == 200  # 48 prompts
        long = "x" * 101
        for route, body, where in (("/v1/embed", {"texts": ["ok", long]}, "texts.1"),
                                   ("/v1/search", {"text": long}, "text"),
                                   ("/v1/classify", {"images": [img], "classes": ["a", long]}, "classes.1"),
                                   ("/v1/classify", {"images": [img], "classes": ["a"], "templates": [long + "{c}"]},
                                    "templates.0")):
            assert f"{where} is" in error_of(c.post(route, json=body), 413), route
            assert "RECO_SERVE_MAX_TEXT_CHARS" in error_of(c.post(route, json=body), 413)
        assert c.post("/v1/embed", json={"texts": ["x" * 100]}).status_code == 200


def test_a_large_classification_does_not_starve_other_requests(app_with, served):  # noqa: F811
    """10,000 prompts (within the budget) go through the model in batches of max_batch: while they run, /healthz
    answers within 1 s and a small embed finishes long before the classification does."""
    app = app_with(max_batch=16, max_wait_ms=1)
    classes = [f"class number {i}" for i in range(100)]
    templates = [f"template {j} of a {{c}}." for j in range(100)]
    with Server(app) as url, httpx.Client(base_url=url, timeout=300) as c:
        big: dict = {}

        def classify():
            big["r"] = c.post("/v1/classify", json={"images": [b64(png())], "classes": classes,
                                                    "templates": templates, "top_k": 1})
            big["done"] = time.monotonic()

        t = threading.Thread(target=classify)
        t.start()
        deadline = time.monotonic() + 60
        while _batches(c) < 5:  # the classification is under way
            assert time.monotonic() < deadline and t.is_alive(), big
            time.sleep(0.02)
        t0 = time.monotonic()
        assert c.get("/healthz", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 1
        r = c.post("/v1/embed", json={"texts": ["a red circle"]}, timeout=60)
        small_done = time.monotonic()
        assert r.status_code == 200, r.text
        assert t.is_alive(), "the classification ended before the embed: make it bigger"
        t.join(300)
        assert big["r"].status_code == 200, big["r"].text
        assert small_done < big["done"]
        metrics = c.get("/metrics").text
    upto16 = metrics.split('reco_batch_size_bucket{le="16.0",model="m",side="text"} ')[1].split()[0]
    total = metrics.split('reco_batch_size_count{model="m",side="text"} ')[1].split()[0]
    assert upto16 == total and float(total) >= 10_000 / 16  # every batch held at most max_batch prompts


def _batches(c) -> float:
    text = c.get("/metrics").text
    key = 'reco_batch_size_count{model="m",side="text"} '
    return float(text.split(key)[1].split()[0]) if key in text else 0.0


# -- 3. bodies: strings counted before parsing, pixels before decoding --------------------------------------------
def test_a_body_of_millions_of_strings_is_refused_without_blocking_healthz(app_with):
    body = json.dumps({"images": ["QUFB"] * 2_000_000}).encode()  # 16 MB, under the byte limit
    with Server(app_with()) as url, httpx.Client(base_url=url, timeout=120) as c:
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("r", c.post(
            "/v1/embed", content=body, headers={"content-type": "application/json"})))
        t.start()
        slowest = 0.0
        while t.is_alive():
            t0 = time.monotonic()
            assert c.get("/healthz", timeout=5).status_code == 200
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.01)
        t.join()
        assert "more than" in error_of(out["r"], 413) and slowest < 1


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_pixels_are_checked_before_decoding(app_with):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")  # a few KB that decode to 144 M pixels
    with TestClient(app_with()) as c:
        says = error_of(c.post("/v1/embed", json={"images": [b64(buf.getvalue())]}), 413)
        assert "12000 x 12000" in says and "RECO_SERVE_MAX_IMAGE_PIXELS" in says
        r = c.post("/v1/embed", files=[("images", ("big.png", buf.getvalue(), "image/png"))])
        assert "RECO_SERVE_MAX_IMAGE_PIXELS" in error_of(r, 413)
    with TestClient(app_with(max_image_pixels=100)) as c:
        assert "over the limit of 100" in error_of(c.post("/v1/embed", json={"images": [b64(png())]}), 413)


def test_body_limits_hold_for_declared_and_chunked_bodies(app_with):
    with TestClient(app_with(max_body_bytes=1000)) as c:
        big = json.dumps({"texts": ["x" * 50] * 30}).encode()
        assert "RECO_SERVE_MAX_BODY_BYTES" in error_of(
            c.post("/v1/embed", content=big, headers={"content-type": "application/json"}), 413)
        assert "RECO_SERVE_MAX_BODY_BYTES" in error_of(  # no Content-Length: counted as it streams in
            c.post("/v1/embed", content=iter([big[:600], big[600:]]), headers={"content-type": "application/json"}),
            413)


# -- 4. slow senders -----------------------------------------------------------------------------------------------
def test_a_slow_body_gets_a_408_and_the_server_keeps_serving(app_with):
    app = app_with(body_timeout_s=1.0)
    with Server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        s = raw_request(port, b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n", b'{"texts": [')
        t0 = time.monotonic()
        answer = read_answer(s)
        s.close()
        assert answer.startswith("HTTP/1.1 408") and "RECO_SERVE_BODY_TIMEOUT_S" in answer
        assert time.monotonic() - t0 < 10
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.post(url + "/v1/embed", json={"texts": ["x"]}, timeout=60).status_code == 200


def test_serve_passes_the_keep_alive_timeout_to_uvicorn(served, monkeypatch):  # noqa: F811
    import os

    import uvicorn
    from click.testing import CliRunner

    from app.cli import cli

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    env = {**os.environ, "RECO_HOME": str(served.settings.home), "RECO_SERVE_KEEP_ALIVE_S": "7"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(cli, ["serve", "--port", str(port)], env=env)
    assert r.exit_code == 0, r.output
    assert seen["timeout_keep_alive"] == 7.0


# -- 5. clients that go away -----------------------------------------------------------------------------------------
def test_a_client_that_disconnects_is_counted_as_499_and_logged_quietly(app_with, caplog):
    caplog.set_level(logging.INFO, logger="reco.serve")
    with Server(app_with()) as url:
        port = int(url.rsplit(":", 1)[1])
        s = raw_request(port, b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 1000\r\n\r\n", b'{"texts": ["a')
        time.sleep(0.3)
        s.close()
        deadline = time.monotonic() + 10
        while 'status="499"' not in (text := httpx.get(url + "/metrics").text):
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
    assert 'reco_requests_total{route="/v1/embed",status="499"} 1.0' in text
    assert 'reco_client_disconnects_total{route="/v1/embed"} 1.0' in text
    assert 'reco_request_errors_total{route="/v1/embed"}' not in text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "client disconnected" in caplog.text


# -- 6. search keeps its memory open -----------------------------------------------------------------------------
def test_search_only_traffic_keeps_the_memory_open(app_with, served, monkeypatch):  # noqa: F811
    """The encoder lets its memory go when idle; searches alone must not reopen it on every request."""
    from app.store import edge

    if not isinstance(served.store, edge.EdgeStore):
        pytest.skip("a server store's hold is a no-op")
    with TestClient(app_with()) as c:
        assert c.post("/v1/search", json={"text": "a red circle", "k": 2}).status_code == 200
        c.app.state.reco["models"]["m"].encoder.close()  # as after KEEP_OPEN_S without an embed
        opens = []
        real = edge._edge

        def counting():
            e = real()
            return type("E", (), {"__getattr__": lambda self, name: getattr(e, name), "EdgeShard": type(
                "S", (), {"load": staticmethod(lambda *a: opens.append(a) or e.EdgeShard.load(*a)),
                          "create": staticmethod(e.EdgeShard.create)})})()

        monkeypatch.setattr(edge, "_edge", counting)
        for _ in range(5):
            assert c.post("/v1/search", json={"text": "a blue triangle", "k": 2}).status_code == 200
        assert c.post("/v1/search", json={"text": "x", "memory": "mem@2"}).status_code == 200
        for _ in range(3):
            assert c.post("/v1/search", json={"text": "x", "memory": "mem@2"}).status_code == 200
    assert len(opens) == 1, opens  # mem@2 opened once; mem@1 stayed open throughout


# -- 7. the OpenAPI says what the service refuses -------------------------------------------------------------------
def test_openapi_lists_errors_limits_and_metrics_as_text(app_with):
    with TestClient(app_with(max_items=4, max_classes=10, max_k=50, max_text_chars=100)) as c:
        spec = c.get("/openapi.json").json()
        r = c.put("/v1/embed", json={})
        assert "not allowed" in error_of(r, 405) and r.headers["allow"] == "POST"
        assert r.headers["allow"] == "POST"
    paths = spec["paths"]
    for route in ("/v1/embed", "/v1/classify", "/v1/search"):
        op = paths[route]["post"]
        for code in ("400", "401", "404", "408", "413", "422"):
            assert op["responses"][code]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"}, (route, code)
    assert spec["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    body = lambda route: paths[route]["post"]["requestBody"]["content"]["application/json"]["schema"]  # noqa: E731
    embed, classify, search = body("/v1/embed"), body("/v1/classify"), body("/v1/search")
    assert embed["properties"]["texts"]["maxItems"] == 4 and embed["properties"]["texts"]["items"]["maxLength"] == 100
    assert embed["properties"]["images"]["items"]["minLength"] == 1 and len(embed["anyOf"]) == 2
    assert classify["properties"]["classes"]["minItems"] == 1 and classify["properties"]["classes"]["maxItems"] == 10
    assert classify["properties"]["images"]["minItems"] == 1
    assert search["properties"]["k"]["maximum"] == 50 and search["properties"]["images"]["maxItems"] == 1
    # the bodies the issue names are refused by the schema as they are by the service
    jsonschema_rs = pytest.importorskip("jsonschema_rs")  # comes with schemathesis
    for schema, bad in ((classify, {"classes": []}), (embed, {}), (embed, {"images": [""]}),
                        (classify, {"images": ["QUFB"], "classes": [" "]}), (search, {}),
                        (search, {"text": "x", "images": ["QUFB"]}),
                        (classify, {"images": ["QUFB"], "classes": ["a"], "templates": ["no class"]}),
                        (search, {"text": "x", "memory": "mem@99999999999"})):
        assert not jsonschema_rs.validator_for(schema).is_valid(bad), bad
    for schema, good in ((classify, {"images": ["QUFB"], "classes": ["a"], "templates": ["a {c}"]}),
                         (embed, {"texts": ["x"]}), (search, {"text": "x", "memory": "mem@2"}),
                         (search, {"images": ["QUFB"]})):
        assert jsonschema_rs.validator_for(schema).is_valid(good), good


# -- 8. top_k and the README's examples --------------------------------------------------------------------------
def test_top_k_is_clamped_to_the_classes_and_the_readme_examples_work(app_with, tmp_path):
    from app.serve.client import RecoClient

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(png())
    app = app_with()
    with TestClient(app) as c:
        # curl -s localhost:8000/v1/classify -F images=@photo.jpg -F classes="cedar waxwing" \
        #      -F classes="bohemian waxwing" -F compare=true
        r = c.post("/v1/classify", files=[("images", ("photo.jpg", photo.read_bytes(), "image/jpeg"))],
                   data={"classes": ["cedar waxwing", "bohemian waxwing"], "compare": "true"})
        assert r.status_code == 200, r.text
        row = r.json()["results"][0]
        assert len(row["reco"]) == len(row["baseline"]) == 2
        # curl ... /v1/search -d '{"text": "a red circle", "k": 3}'; /v1/embed -F images=@photo.jpg -F texts=...
        assert len(c.post("/v1/search", json={"text": "a red circle", "k": 3}).json()["hits"]) == 3
        r = c.post("/v1/embed", files=[("images", ("photo.jpg", photo.read_bytes(), "image/jpeg"))],
                   data={"texts": "a cedar waxwing", "frozen": "true"})
        assert r.status_code == 200 and "frozen" in r.json()["images"][0]
    with Server(app_with()) as url:
        cl = RecoClient(url, token=None)  # the README's Python example, as written
        assert len(cl.search(text="a red circle", k=5)["hits"]) == 5
        row = cl.classify([str(photo)], ["cedar waxwing", "bohemian waxwing"], compare=True)["results"][0]
        assert {x["label"] for x in row["reco"]} == {"cedar waxwing", "bohemian waxwing"}
        assert len(cl.embed(images=[str(photo)], texts=["a bird"])["images"][0]["embedding"]) == 64


# -- Schemathesis over the OpenAPI ------------------------------------------------------------------------------
@pytest.mark.slow
def test_schemathesis_finds_no_failure(app_with):
    """Every operation with generated bodies, valid and not (10 examples each): never a 5xx, only documented
    statuses and media types, every error an `{"error"}` object, and what the schema refuses is refused. (Not
    positive_data_acceptance: a generated string that fits the schema is still no image, a 400.)"""
    schemathesis = pytest.importorskip("schemathesis")  # the `test` extra
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.config import SchemathesisConfig
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi import checks as oc

    checks = [not_a_server_error, oc.status_code_conformance, oc.content_type_conformance,
              oc.response_schema_conformance, oc.negative_data_rejection]
    app = app_with(max_items=4, max_classes=10, max_templates=5, max_k=20, max_text_chars=200,
                   max_image_bytes=4096, body_timeout_s=10)
    failures, ran = [], []
    with Server(app) as url:
        config = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {  # 408 and 413 refuse too
            "expected-statuses": [400, 401, 404, 405, 406, 408, 409, 413, 415, 422]}}})
        schema = schemathesis.openapi.from_url(url + "/openapi.json", config=config)
        for result in schema.get_all_operations():
            op = result.ok()
            negative = [GenerationMode.NEGATIVE] if op.method.upper() == "POST" else []  # GETs take no input
            for mode in [GenerationMode.POSITIVE, *negative]:

                @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def run(case):
                    case.call_and_validate(checks=checks)

                try:
                    run()
                    ran.append(op.label)
                except Exception as exc:  # every operation's failure, not only the first
                    failures.append(f"{op.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
    assert {"POST /v1/embed", "POST /v1/classify", "POST /v1/search", "GET /metrics"} <= set(ran)
