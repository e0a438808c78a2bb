"""Class sets: classes as a versioned store collection, ranked by a dense matrix or a top-k search."""

import json

import numpy as np
import pytest

from app import classes as class_sets
from app.classes import build_class_set, dense_top_k, read_names
from app.errors import RecoError
from app.evaluate import evaluate_classification
from app.metrics import classification_metrics, ranked_metrics


def _predictions(run):
    return [(d["baseline"], d["reco"]) for d in run["details"]]


def test_store_backed_classification_equals_the_dense_one_baseline_and_reco(rt, trained):
    """Without the leakage guard: a class set's text side was refined when it was built, so the guard (which keeps
    memory copies of the evaluation images out of retrieval) cannot reach it; the dense run applies it to both."""
    spec = f"imagefolder:{trained['data']}"
    dense = evaluate_classification(rt, "m", spec, classnames=trained["classnames"], guard=False)
    build_class_set(rt, "shapes", trained["classnames"], model="m", activate=True)
    # RECO changes some predictions here, so equal metrics are not two copies of one number
    assert any(b != r for b, r in _predictions(dense))
    for ranking in ("dense", "search"):
        run = evaluate_classification(rt, "m", spec, classnames=trained["classnames"], classes="shapes",
                                      ranking=ranking, guard=False)
        assert run["classes"]["ranking"] == ranking and run["classes"]["count"] == 32
        assert run["classes"]["ef"] == (class_sets.CLASS_SEARCH_EF if ranking == "search" else None)
        for m in ("acc1", "acc5", "mean_per_class_recall"):
            assert run["baseline"][m] == dense["baseline"][m], (ranking, m)
            assert run["reco"]["10"][m] == dense["reco"]["10"][m], (ranking, m)
        assert _predictions(run) == _predictions(dense)
        assert run["timing_per_item_s"]["rank"] > 0


def test_frozen_class_set_with_distractors_and_image_side_only(rt, trained, tmp_path, tiny_config):
    spec = f"imagefolder:{trained['data']}"
    names = tmp_path / "names.jsonl"
    real = [ln for ln in open(trained["classnames"]).read().splitlines() if ln]
    rows = [{"id": n, "name": n} for n in real] + [{"id": f"x{i}", "name": f"gadget {i}"} for i in range(300)]
    names.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_class_set(rt, "wide", str(names), backbone=tiny_config, activate=True)
    dense = evaluate_classification(rt, "m", spec, classnames=trained["classnames"], retrieval="image")
    runs = {r: evaluate_classification(rt, "m", spec, classnames=trained["classnames"], classes="wide", ranking=r,
                                       retrieval="image")
            for r in ("dense", "search")}
    assert runs["dense"]["baseline"] == runs["search"]["baseline"]
    assert runs["dense"]["reco"] == runs["search"]["reco"]
    # more candidates can only take hits away from the 32-class ranking
    assert runs["search"]["baseline"]["acc1"] <= dense["baseline"]["acc1"]
    assert runs["search"]["reco"]["10"]["acc5"] <= dense["reco"]["10"]["acc5"]


def test_auto_ranking_switches_to_search_above_the_measured_class_count(rt, trained, monkeypatch):
    build_class_set(rt, "shapes", trained["classnames"], model="m", activate=True)
    spec, names = f"imagefolder:{trained['data']}", trained["classnames"]
    assert evaluate_classification(rt, "m", spec, classnames=names, classes="shapes")["classes"]["ranking"] == "dense"
    monkeypatch.setattr(class_sets, "DENSE_MAX_CLASSES", 31)
    searched = []
    search = rt.store.search
    monkeypatch.setattr(rt.store, "search", lambda *a, **kw: searched.append((kw.get("using"), kw.get("hnsw_ef")))
                        or search(*a, **kw))
    assert evaluate_classification(rt, "m", spec, classnames=names, classes="shapes")["classes"]["ranking"] == "search"
    assert {("frozen", 512), ("refined", 512)} <= set(searched)
    evaluate_classification(rt, "m", spec, classnames=names, classes="shapes", ef=64)
    assert ("refined", 64) in searched


def test_ranked_metrics_equal_classification_metrics_on_one_ranking():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((200, 40)).astype(np.float32)
    labels = rng.integers(0, 40, 200)
    ids = np.array([f"c{i}" for i in range(40)], dtype=object)
    top, _ = dense_top_k(logits, np.eye(40, dtype=np.float32), 5, ids, rows_per_step=33)
    assert ranked_metrics(top, ids[labels]) == pytest.approx(classification_metrics(logits, labels))


def test_class_set_cli_build_list_show_activate_verify_delete(cli_run, trained, tiny_config):
    out = cli_run("classes", "build", "shapes", "--names", trained["classnames"], "--backbone", tiny_config).output
    assert "shapes v1 ready: 32 classes" in out
    cli_run("classes", "build", "shapes", "--names", trained["classnames"], "--model", "m", "--activate")
    listed = json.loads(cli_run("classes", "list", "--json").output)
    assert [(v["version"], v["active"], v["items_stored"]) for v in listed[0]["versions"]] == \
        [(1, False, 32), (2, True, 32)]
    show = json.loads(cli_run("classes", "show", "shapes", "--json").output)
    assert show["details"]["refined"]["model"] == "m" and show["details"]["refined"]["k"] == 10
    assert show["details"]["templates"] and show["storage"]["quantization"] == "none"
    assert "refined        by m (best), k=10, memory mem v1" in cli_run("classes", "show", "shapes").output
    assert "OK" in cli_run("classes", "verify", "shapes").output
    cli_run("classes", "activate", "shapes", "1")
    assert json.loads(cli_run("memory", "list", "--json").output)[0]["name"] == "mem"  # class sets stay apart
    cli_run("classes", "delete", "shapes", "2")
    assert [v["version"] for v in json.loads(cli_run("classes", "list", "--json").output)[0]["versions"]] == [1]


def _one_error(result, *fragments):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_bad_class_sets_get_one_error_line(cli_run, trained, tiny_config, tmp_path):
    spec = f"imagefolder:{trained['data']}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "Q1", "name": "a"}\nnot json\n')
    dup = tmp_path / "dup.txt"
    dup.write_text("red square\nblue circle\nred square\n")
    few = tmp_path / "few.txt"
    few.write_text("red square\nblue circle\n")
    cases = [
        (["classes", "build", "c", "--names", tmp_path / "none.txt", "--backbone", tiny_config], "not found"),
        (["classes", "build", "c", "--names", bad, "--backbone", tiny_config], "bad.jsonl line 2 is not JSON"),
        (["classes", "build", "c", "--names", dup, "--backbone", tiny_config], "dup.txt line 3 repeats the class id"),
        (["classes", "build", "c", "--names", few], "give --backbone"),
        (["classes", "build", "mem", "--names", few, "--backbone", tiny_config], "mem is a memory, not a class set"),
        (["classes", "build", "c", "--names", few, "--backbone", tiny_config, "--memory", "mem"], "give --model"),
        (["eval", "classification", "--model", "m", "--dataset", spec, "--classes", "nope"],
         "no class set named 'nope'"),
        (["eval", "classification", "--model", "m", "--dataset", spec, "--classes", "mem"],
         "mem is a memory, not a class set"),
        (["eval", "classification", "--model", "m", "--dataset", spec, "--ranking", "search"], "give --classes"),
        (["eval", "classification", "--model", "m", "--dataset", spec, "--ef", "64"], "give --classes"),
    ]
    for args, fragment in cases:
        _one_error(cli_run(*args, ok=False), fragment)
    assert json.loads(cli_run("classes", "list", "--json").output) == []  # nothing was left behind

    cli_run("classes", "build", "few", "--names", few, "--model", "m", "--activate")
    cli_run("classes", "build", "frozen", "--names", trained["classnames"], "--backbone", tiny_config, "--activate")
    cli_run("classes", "build", "shapes", "--names", trained["classnames"], "--model", "m")
    ev = ["eval", "classification", "--model", "m", "--dataset", spec, "--classnames", trained["classnames"]]
    for args, fragment in [
        (ev + ["--classes", "few"], "lacks 30 of the dataset's 32 classes"),
        (ev + ["--classes", "frozen"], "holds frozen class embeddings only"),
        (ev + ["--classes", "shapes"], "has no active version"),
        (ev + ["--classes", "shapes@1", "-k", "5"], "refined with k=10"),
        (ev + ["--classes", "shapes@1", "--checkpoint", "start"], "refined by model m (best checkpoint)"),
        (ev + ["--classes", "shapes@1", "--templates", few], "--templates applies to the dataset's own classes"),
    ]:
        _one_error(cli_run(*args, ok=False), fragment)
    run = json.loads(cli_run(*ev, "--classes", "frozen", "--retrieval", "image", "--json").output)
    assert run["classes"]["name"] == "frozen" and run["classes"]["refined"] is None


def test_names_files(tmp_path):
    (tmp_path / "plain.txt").write_text("red square\n\n  blue circle  \n")
    assert read_names(tmp_path / "plain.txt") == (["red square", "blue circle"], ["red square", "blue circle"])
    (tmp_path / "oven.jsonl").write_text(
        '{"wikidata_id": "Q1", "wikipedia_title": "Crow", "wikipedia_content": "..."}\n{"id": 7, "name": "Rook"}\n')
    assert read_names(tmp_path / "oven.jsonl") == (["Q1", "7"], ["Crow", "Rook"])
    for text, fragment in [("", "holds no class names"), ('{"id": "Q1"}\n', "needs an id and a name"),
                           ('{"id": 1, "name": "a"}\n{bad\n', "x.jsonl line 2 is not JSON"),
                           ('{"id": 1, "name": "a"}\n[1]\n', "x.jsonl line 2 is not a JSON object")]:
        (tmp_path / "x.jsonl").write_text(text)
        with pytest.raises(RecoError, match=fragment):
            read_names(tmp_path / "x.jsonl")


def test_oven_stand_in_through_a_class_set_reports_seen_unseen_and_harmonic_mean(rt, trained, tmp_path, cli_run):
    from app import synthetic

    root = synthetic.write_oven(tmp_path / "oven", entities=32, per_entity=2)
    spec = f"oven:{root}"
    dense = evaluate_classification(rt, "m", spec, guard=False)  # the split's own 32 entities, dense
    for part in (dense["baseline"], dense["reco"]["10"]):
        s, u = part["seen"], part["unseen"]
        assert part["harmonic_mean"] == pytest.approx(2 * s * u / (s + u) if s and u else 0, abs=1e-9)
    assert dense["baseline"]["seen"] != dense["baseline"]["unseen"] or dense["reco"]["10"]["seen"] != \
        dense["reco"]["10"]["unseen"]
    entity_list = root / "Wiki6M_ver_1_0_title_only.jsonl"
    build_class_set(rt, "wiki", str(entity_list), model="m", templates=dense["templates"], activate=True)
    run = evaluate_classification(rt, "m", spec, classes="wiki", ranking="search", guard=False)
    assert run["baseline"] == pytest.approx(dense["baseline"]) and run["reco"]["10"] == pytest.approx(dense["reco"]["10"])

    # the open form: every entity of the knowledge base is a candidate (here 32 + 400 distractors), by the CLI
    wide = synthetic.write_oven(tmp_path / "oven-wide", entities=32, per_entity=2, distractors=400)
    (tmp_path / "oven.txt").write_text("a photo of {c}.\n")
    cli_run("classes", "build", "wiki6m", "--names", wide / "Wiki6M_ver_1_0_title_only.jsonl", "--model", "m",
            "--templates", tmp_path / "oven.txt", "--activate")
    out = cli_run("eval", "classification", "--model", "m", "--dataset", f"oven:{wide}", "--classes", "wiki6m",
                  "--ranking", "search").output
    assert "SEEN" in out and "UNSEEN" in out and "HARMONIC_MEAN" in out and "432 classes" in out
    got = json.loads(cli_run("eval", "classification", "--model", "m", "--dataset", f"oven:{wide}", "--classes",
                             "wiki6m", "--json").output)
    assert {"seen", "unseen", "harmonic_mean"} <= set(got["reco"]["10"]) and got["classes"]["count"] == 432
