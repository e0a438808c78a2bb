"""Activating a new version while queries run: no query fails, each answer comes wholly from one version."""

import threading
import time

import numpy as np
import pytest

from app import synthetic
from app.build import build_in_process
from app.memory import activate, resolve_collection
from app.runtime import Runtime
from app.settings import Settings


def _version(rt, name, source, tiny_config):
    return build_in_process(rt, name, source, backbone=tiny_config).version


@pytest.mark.parametrize("backend", ["embedded", "server"])
def test_activate_during_query_loop(reco_env, tmp_path, tiny_config, tiny_backbone, backend, monkeypatch):
    if backend == "server":
        monkeypatch.setenv("RECO_QDRANT_URL", ":memory:")  # qdrant-client's in-process stand-in for a server
    rt = Runtime(Settings.from_env())
    # two versions with disjoint keys: v1 keys start with "a", v2 keys with "b"
    synthetic.write_wds(tmp_path / "v1", n_shards=2, per_shard=10, seed=1, prefix="a")
    synthetic.write_wds(tmp_path / "v2", n_shards=2, per_shard=10, seed=2, prefix="b")
    assert _version(rt, "swap", tmp_path / "v1", tiny_config) == 1
    assert _version(rt, "swap", tmp_path / "v2", tiny_config) == 2
    activate(rt, "swap", 1)

    queries = tiny_backbone.encode_texts([f"a {c} {s}" for c, s in (synthetic.concept(i) for i in range(8))])
    answers, errors = [], []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                collection, _ = resolve_collection(rt, "swap")
                rows = rt.store.search(collection, queries, using="text", k=5)
                answers.append({h.payload["key"][0] for row in rows for h in row})
            except Exception as exc:
                errors.append(exc)

    t = threading.Thread(target=loop)
    t.start()
    try:
        for i in range(20):
            activate(rt, "swap", 2 if i % 2 == 0 else 1)
            while len(answers) < 2 * (i + 1) and t.is_alive():
                time.sleep(0.001)
    finally:
        stop.set()
        t.join()
        rt.close()
    assert not errors
    assert len(answers) >= 40
    assert all(a in ({"a"}, {"b"}) for a in answers), "an answer mixed two versions"
    assert {"a"} in answers and {"b"} in answers
