"""Security properties that a grep or a fake server can prove: the Qdrant API key travels as a header (and only
there), TLS URLs are honoured, nothing is unpickled, no shell command is built, names are validated."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from app.errors import RecoError
from app.names import check_name
from app.settings import Settings
from app.store.server import ServerStore

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted(list((ROOT / "app").rglob("*.py")) + list((ROOT / "workers").rglob("*.py")))


class _FakeQdrant(BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        _FakeQdrant.seen.append((self.path, dict(self.headers)))
        body = json.dumps({"result": {"collections": []}, "status": "ok", "time": 0}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_qdrant_api_key_is_sent_as_a_header_and_never_shown():
    server = HTTPServer(("127.0.0.1", 0), _FakeQdrant)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        store = ServerStore(url, api_key="the-secret-key")
        store.ping()
        path, headers = _FakeQdrant.seen[-1]
        assert path.startswith("/collections")
        assert {k.lower(): v for k, v in headers.items()}["api-key"] == "the-secret-key"
        assert "the-secret-key" not in path
    finally:
        server.shutdown()
    s = Settings.from_env({"RECO_QDRANT_URL": url, "RECO_QDRANT_API_KEY": "the-secret-key"})
    assert "the-secret-key" not in repr(s) and "the-secret-key" not in json.dumps(s.describe())


def test_tls_url_is_used_as_https():
    store = ServerStore("https://qdrant.example.org:6333", api_key="k")
    assert store.client._client.rest_uri.startswith("https://qdrant.example.org:6333")


def test_nothing_is_unpickled_and_no_shell_is_built():
    for path in CODE:
        src = path.read_text()
        rel = path.relative_to(ROOT)
        assert "import pickle" not in src and "pickle.load" not in src, rel
        assert not re.search(r"torch\.load\(", src), f"{rel}: torch.load unpickles; use safetensors"
        assert "allow_pickle=True" not in src, rel
        for call in re.findall(r"np\.load\([^)]*\)", src):
            assert "allow_pickle=False" in call, f"{rel}: {call}"
        assert "shell=True" not in src and "os.system(" not in src and "os.popen(" not in src, rel


@pytest.mark.parametrize("bad", ["../etc", "a b", "x;rm -rf /", "$(id)", "UPPER", "", "a" * 65])
def test_names_that_could_escape_a_path_or_a_command_are_refused(bad):
    with pytest.raises(RecoError):
        check_name(bad)
