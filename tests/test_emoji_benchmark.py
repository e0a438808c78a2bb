"""The quality benchmark, reduced: 30 held-out flags, 300 other emoji, a briefly pretrained base, few epochs.

Reads the emoji packages from the cache that `make bench-data` fills (`make test` runs it first); nothing is
downloaded here. RECO must beat the frozen base clearly, the memory without the targets must not, and a second
run with the same seed (base model from the cache) must give the same numbers.
"""

import itertools

import numpy as np
import pytest
import torch

from app.memory import list_memories
from benchmarks.emoji import data
from benchmarks.emoji.balance import BIASES, pooled_grid, target_hits, validation_hits
from benchmarks.emoji.base import BaseConfig
from benchmarks.emoji.crossfit import START, _key, _name, fold_hits, folds, pick, recipes
from benchmarks.emoji.protocol import Protocol, fresh_runtime, run
from benchmarks.emoji.report import markdown


@pytest.fixture(scope="module")
def npm_cache():
    mods = data.DEFAULT_CACHE / "npm" / "node_modules"
    missing = [p for p, v in data.PACKAGES.items() if data._installed_version(mods / p) != v]
    if missing:
        pytest.fail(f"emoji packages {', '.join(missing)} are not in {mods}: run `make bench-data` first")
    return data.DEFAULT_CACHE


def test_catalogue_has_four_vendors_and_names(npm_cache):
    emojis = data.catalogue(npm_cache)
    assert len(emojis) > 1800
    flags, rest = data.split_targets(emojis, ["country-flag"])
    assert len(flags) > 250 and len(flags) + len(rest) == len(emojis)
    japan = next(e for e in flags if e.name == "japan flag")
    assert set(japan.images) == set(data.VENDORS) and "japan" in japan.keywords
    # the three caption forms never coincide
    assert len({data.PRETRAIN_CAPTION.format(name=japan.name), data.memory_caption(japan),
                data.pair_caption(japan, 0)}) == 3
    with pytest.raises(SystemExit, match="unknown subcategory"):
        data.split_targets(emojis, ["no-such-thing"])


def test_reduced_protocol_trains_the_gate_on_held_out_subcategories(npm_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("RECO_HOME", str(tmp_path / "unused"))
    p = Protocol(targets=["country-flag"], seed=0, epochs=10, max_targets=30, max_rest=300, ablations=True,
                 held_vendors=("facebook", "google"), base=BaseConfig(steps=60))
    first = run(p, tmp_path / "home", npm_cache, log=lambda m: None)
    assert set(first["groups"]) == {"country-flag", "dev"}
    h = first["groups"]["country-flag"]["headline"]
    assert h["classes"] == 30
    assert first["base_model"]["cached"] is False
    assert first["base_model"]["torch_threads"] == torch.get_num_threads()  # what the base's rounding depends on
    assert h["reco_top1"] >= h["baseline_top1"] + 15, first["groups"]["country-flag"]["table"]
    assert h["retrieval_off_top1"] <= h["baseline_top1"] + 7, first["groups"]["country-flag"]["table"]
    assert h["no_target_memory_top1"] <= h["baseline_top1"] + 7, first["groups"]["country-flag"]["table"]
    assert h["cross_search_top1"] < h["reco_top1"] and 0 < h["swap_recovery"]
    assert h["t2i_r1_reco"] > h["t2i_r1_baseline"]
    # the gate trains on the held-out subcategories' facebook drawings, all of them, and keeps its last step
    m = first["training"]["reco"]
    assert m["start"] is None and m["best"]["rule"] == "last" and m["best"]["step"] == m["steps"] > 0
    assert m["train_pairs"] == first["n_train_pairs"] == len(p.held_vendors) * first["n_unseen_val_pairs"]
    assert m["val_pairs"] == 0
    assert all(r["leakage_guard"]["enabled"] for r in [first["groups"]["country-flag"]["eval_run"]])
    # validation: whole subcategories of non-target emoji, reported; the gated fusion, only its gate trained
    val = first["validation_subcategories"]
    assert val and sum(val.values()) == first["n_unseen_val_pairs"] and "country-flag" not in val
    assert first["groups"]["dev"]["subcategories"] == sorted(val)
    assert f"in {len(val)} whole subcategories ({', '.join(f'{s} {n}' for s, n in val.items())})" in markdown(first)
    assert first["protocol"]["gate"] is True and first["protocol"]["tune"] == "gate"
    hits = first["groups"]["country-flag"]["top1_hits"]
    assert {len(v) for v in hits.values()} == {30}  # one per facebook drawing, the pooled summary's input
    assert 100 * hits["reco"].count("1") / 30 == pytest.approx(h["reco_top1"])
    # the second look: the same targets' google drawings, classified by the same models, one hit per drawing
    google = first["groups"]["country-flag"]["second_look"]["google"]
    assert {len(v) for v in google["top1_hits"].values()} == {30} and "second_look" not in first["groups"]["dev"]
    assert 100 * google["top1_hits"]["untrained"].count("1") / 30 == pytest.approx(google["untrained_top1"])

    # the balance diagnostic on the same split and base: its cell (0, 0) is this run's untrained start on
    # validation, and every global balance is scored on the same drawings (python -m benchmarks.emoji balance)
    hits = validation_hits(p, tmp_path / "home", npm_cache, log=lambda m: None)
    assert set(hits) == set(itertools.product(BIASES, repeat=2))
    assert {len(v) for v in hits.values()} == {first["n_unseen_val_pairs"]}
    # the cross-fit on the same split: every held-out drawing scored once, out of its fold, the start's hits
    # the balance grid's (0, 0) (each drawing told apart among its own subcategory's captions in both), whichever
    # vendors' drawings trained
    logged, fb, both = [], ("facebook", 1e-1, 3, "scores", False, "reco", 0), ("facebook+google", 1e-1, 3, "scores",
                                                                               False, "reco", 0)
    rivals = ("facebook", 1e-1, 3, "rivals", False, "reco", 0)  # the gate sees the top-1's rival too
    cf = fold_hits(p, tmp_path / "home", npm_cache, lrs=(1e-1,), epochs=(3,), log=logged.append,
                   vendors=("facebook", "facebook+google"), features=("scores", "rivals"))
    assert set(cf) == {START, fb, both, rivals, ("facebook+google", 1e-1, 3, "rivals", False, "reco", 0)}
    assert {len(v) for v in cf.values()} == {first["n_unseen_val_pairs"]}
    assert cf[START].mean() == pytest.approx(hits[(0.0, 0.0)].mean())
    stored = {m["name"]: m["versions"][-1]["items_stored"] for m in list_memories(
        fresh_runtime(tmp_path / "home" / "runs" / f"crossfit-{p.regime}-s{p.seed}" / "home"))}
    folds_fb = stored["fold0-facebook"] + stored["fold1-facebook"]
    assert folds_fb == first["n_unseen_val_pairs"]  # each held-out drawing in one fold: the google ones train too
    assert stored["fold0-facebook_google"] + stored["fold1-facebook_google"] == 2 * folds_fb
    cells = {(c["vendors"], c["lr"], c["epochs"], c["features"], c["temperature"], c["loss"], c["hidden"]): c
             for c in recipes([cf])}
    assert cells[both]["minus_start"] == pytest.approx(100 * (cf[both].mean() - cf[START].mean()))
    again = fold_hits(p, tmp_path / "home", npm_cache, lrs=(1e-1,), epochs=(3,), log=logged.append, reuse=True,
                      vendors=("facebook", "facebook+google"), features=("scores", "rivals"))
    assert "held-out hits from" in logged[-1] and all((again[k] == cf[k]).all() for k in cf)
    # the gate that also sets each query's sharpness, and the one trained on the fused term alone, beside the
    # protocol's: the same folds, all trained
    sharp = fold_hits(p, tmp_path / "home", npm_cache, lrs=(1e-1,), epochs=(3,), log=logged.append, reuse=True,
                      temperature=(False, True), loss=("reco", "fused"))
    temp, fused = fb[:4] + (True, "reco", 0), fb[:5] + ("fused", 0)
    assert "held-out hits from" not in logged[-1] and set(sharp) == {START, fb, temp, fused, temp[:5] + ("fused", 0)}
    assert (sharp[fb] == cf[fb]).all() and (sharp[START] == cf[START]).all()
    from app.db.models import FusionModel

    with fresh_runtime(tmp_path / "home" / "runs" / f"crossfit-{p.regime}-s{p.seed}" / "home").db.session() as s:
        trained_on = {m.name: m.config["job"]["train"]["loss"] for m in s.query(FusionModel)}
    assert trained_on["fold0-facebook-lr1e-01-e3-fused"] == "fused" and trained_on["fold0-facebook-lr1e-01-e3"] == "reco"
    # a gate with a hidden layer, on the same folds: its job records the width, and it is scored on the same drawings
    wide = fold_hits(p, tmp_path / "home", npm_cache, lrs=(1e-1,), epochs=(3,), log=logged.append, reuse=True,
                     hidden=(8,))
    assert set(wide) == {START, fb[:6] + (8,)} and (wide[START] == cf[START]).all()
    with fresh_runtime(tmp_path / "home" / "runs" / f"crossfit-{p.regime}-s{p.seed}" / "home").db.session() as s:
        assert s.query(FusionModel).filter_by(name="fold1-facebook-lr1e-01-e3-h8").one() \
            .config["job"]["train"]["gate_hidden"] == 8
    assert hits[(-3.0, -3.0)].mean() < hits[(0.0, 0.0)].mean()  # the query alone: the memory's gain is gone
    cells = {(c["image_bias"], c["text_bias"]): c for c in pooled_grid([hits, hits])}
    start = cells[(0.0, 0.0)]
    assert (start["minus_start"], start["ci95_low"], start["ci95_high"]) == (0, 0, 0)
    for c in cells.values():
        assert c["ci95_low"] <= c["minus_start"] <= c["ci95_high"] and c["per_seed"][0] == c["per_seed"][1]
    # and a cell measured on the targets through the product's evaluation: the start is this run's start; the
    # query nearly alone (the memory weighs e^-3 of it on both sides) loses what the memory gave
    run_hits = first["groups"]["country-flag"]["top1_hits"]
    for cell in ((0.0, 0.0), (-3.0, -3.0)):
        t = target_hits(p, tmp_path / "home", npm_cache, cell)["country-flag"]["top1_hits"]
        assert t["untrained"] == run_hits["untrained"] and t["baseline"] == run_hits["baseline"]
        if cell == (0.0, 0.0):
            assert t["reco"] == t["untrained"]
        else:
            assert t["reco"].count("1") < t["untrained"].count("1")

    # the same seed again (base model from the cache, the ablations and the second look left out): the same numbers
    p.ablations, p.second_look = False, ()
    second = run(p, tmp_path / "home", npm_cache, log=lambda m: None)
    assert second["base_model"]["cached"] is True and "second_look" not in second["groups"]["country-flag"]
    table, again = first["groups"]["country-flag"]["table"], second["groups"]["country-flag"]["table"]
    assert set(again) < set(table)
    assert again == {row: table[row] for row in again}

    # the rare regime shows the targets to the base (one vendor, rarely): the base knows them a little
    rare = run(Protocol(targets=["country-flag"], regime="rare", seed=0, epochs=2, max_targets=30, max_rest=300,
                        second_look=(), base=BaseConfig(steps=60, rare_weight=1.0)), tmp_path / "home", npm_cache,
               log=lambda m: None)
    assert rare["base_model"]["rare_emoji"] == 30 + rare["n_novel_concepts"] + rare["n_unseen_val_pairs"]
    assert rare["groups"]["country-flag"]["headline"]["baseline_top1"] > h["baseline_top1"]


def test_strong_augmentation_keeps_the_white_background():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from benchmarks.emoji.base import _augment

    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    rgb = torch.ones(16, 3, 64, 64)
    rgb[:, 0, 24:40, 24:40] = 0.2  # a dark cyan-ish square on white
    x = (rgb - mean) / std
    geo = _augment(x, torch.Generator().manual_seed(0), "geometric")
    strong = _augment(x, torch.Generator().manual_seed(0), "strong")
    for out in (geo, strong):
        corners = (out * std + mean)[:, :, :4, :4]
        assert torch.allclose(corners, torch.ones_like(corners), atol=1e-4)  # white stays white
    assert not torch.allclose(geo, strong)
    with pytest.raises(ValueError, match="geometric or strong"):
        _augment(x, torch.Generator(), "heavy")


def test_result_records_the_cpu_it_ran_on():
    """The base tower is trained from scratch and ends elsewhere on another CPU: the result must say which."""
    from benchmarks.emoji.data import versions

    cpu = versions()["cpu"]
    assert cpu["model"] and cpu["torch_capability"] and cpu["threads"] >= 1


def test_summary_means_over_seeds_per_regime_and_group():
    from benchmarks.emoji.report import SUMMARY_KEYS, summarize

    def run(seed, regime, reco):
        head = {k: 10.0 + seed for k in SUMMARY_KEYS} | {"reco_top1": reco, "untrained_top1": 20.0, "classes": 7}
        return {"protocol": {"seed": seed, "regime": regime}, "groups": {"country-flag": {"headline": head}}}

    summary, md = summarize({"absent": [run(0, "absent", 30.0), run(1, "absent", 40.0), run(2, "absent", 50.0)],
                             "rare": []})
    flags = summary["regimes"]["absent"]["country-flag"]
    assert set(summary["regimes"]) == {"absent"}
    assert flags["reco_top1"] == 40.0 and flags["baseline_top1"] == 11.0 and flags["seeds"] == [0, 1, 2]
    assert flags["reco_top1_std"] == pytest.approx(8.165, abs=1e-3) and flags["classes"] == 7
    assert "| country-flag | 7 | 11.0 | 20.0 | **40.0** ± 8.2 | +20.0 |" in md


def test_pooled_rows_pool_every_target_image_with_a_paired_bootstrap():
    import numpy as np

    from benchmarks.emoji.report import SUMMARY_KEYS, pooled, summarize

    rng = np.random.default_rng(0)
    sizes = {"country-flag": 60, "clothing": 40}

    def run(seed, lift):
        groups = {}
        for g, n in sizes.items():
            base = rng.random(n) < 0.2
            start = base | (rng.random(n) < 0.4)
            reco = start | (rng.random(n) < lift)  # RECO keeps every hit of its start and adds some
            bits = {m: "".join("1" if h else "0" for h in v) for m, v in
                    (("baseline", base), ("untrained", start), ("reco", reco))}
            head = {k: 0.0 for k in SUMMARY_KEYS} | {"classes": n, "reco_top1": 100 * reco.mean(),
                                                     "untrained_top1": 100 * start.mean()}
            groups[g] = {"headline": head, "top1_hits": bits}
            if lift:  # google's drawings of the same targets: RECO gains nothing on them
                gbits = {m: "".join("1" if h else "0" for h in start) for m in ("untrained", "reco")}
                groups[g]["second_look"] = {"google": {"top1_hits": {"baseline": bits["baseline"], **gbits}}}
        groups["dev"] = {"headline": {k: 0.0 for k in SUMMARY_KEYS} | {"classes": 5}, "top1_hits": {"baseline": "0", "untrained": "1", "reco": "1"}}
        return {"protocol": {"seed": seed, "regime": "rare"}, "groups": groups}

    runs = [run(s, 0.1) for s in range(3)]
    pool = pooled(runs)
    assert pool["classes"] == 100 and pool["images"] == 100 and pool["groups"] == ["country-flag", "clothing"]
    assert pool["reco_top1"] >= pool["untrained_top1"] >= pool["baseline_top1"]
    assert pool["reco_minus_untrained"] == pytest.approx(np.mean(pool["reco_minus_untrained_per_seed"]))
    assert 0 < pool["ci95_low"] < pool["reco_minus_untrained"] < pool["ci95_high"]  # a gain that never loses
    assert pool["ci95_low_vs_baseline"] < pool["reco_minus_baseline"] < pool["ci95_high_vs_baseline"]
    # nothing gained: the interval straddles zero
    same = [run(s, 0.0) for s in range(3)]
    flat = pooled(same)
    assert flat["reco_minus_untrained"] == 0 and flat["ci95_low"] == flat["ci95_high"] == 0
    for r in runs:  # each seed's validation subcategories are reported beside the tables
        r["validation_subcategories"] = {f"tool-{r['protocol']['seed']}": 15, "arrow": 21}
    # the second look: google's drawings alone (no gain), and both vendors' with a target's two drawings together
    google, both = pooled(runs, ("google",)), pooled(runs, ("facebook", "google"))
    assert google["reco_minus_untrained"] == google["ci95_low"] == 0 and google["images"] == 100
    assert both["images"] == 200 and both["emoji"] == 100 and both["classes"] == 100
    assert both["reco_minus_untrained"] == pytest.approx(pool["reco_minus_untrained"] / 2)
    # a target's two drawings are resampled together: google's add nothing here, so every bootstrap draw is half
    # the facebook one's (drawings resampled one by one would not give exactly half)
    assert (both["ci95_low"], both["ci95_high"]) == pytest.approx((pool["ci95_low"] / 2, pool["ci95_high"] / 2))
    assert pooled(same, ("google",)) is None  # runs without the second look: no row
    summary, md = summarize({"rare": runs})
    assert summary["regimes"]["rare"]["pooled"]["reco_top1"] == pool["reco_top1"]
    assert summary["regimes"]["rare"]["second_look"]["facebook+google"] == both
    assert "| rare, google | 100 | 100 |" in md and "| rare, facebook+google | 100 | 200 |" in md
    assert summary["regimes"]["rare"]["validation_subcategories"]["2"] == {"tool-2": 15, "arrow": 21}
    assert "seed 1: tool-1 15, arrow 21; seed 2: tool-2 15, arrow 21." in md
    assert md.splitlines()[0].startswith("### pooled") and "| rare | 100 | 100 |" in md
    # runs from before the per-image hits: no pooled row rather than a wrong one
    for r in runs:
        del r["groups"]["clothing"]["top1_hits"]
    assert pooled(runs) is None and "pooled" not in summarize({"rare": runs})[0]["regimes"]["rare"]


def test_replications_pool_the_runs_of_one_protocol_as_bases(tmp_path):
    """Rounds rerun on rebuilt bases are one sample of bases: pooled as seeds are, each folder's row beside, and the
    interval that resampling only the drawings leaves; a run of another protocol is refused."""
    import numpy as np

    from benchmarks.emoji.report import SUMMARY_KEYS, images_only, pooled, replications

    def run(seed, gains, **protocol):
        n = len(gains)
        start = np.zeros(n, bool)  # the start misses every drawing: RECO's hits are its gains
        reco = gains
        bits = {m: "".join("1" if h else "0" for h in v) for m, v in
                (("baseline", np.zeros(n, bool)), ("untrained", start), ("reco", reco))}
        head = {k: 0.0 for k in SUMMARY_KEYS} | {"classes": n, "reco_top1": 100 * reco.mean(),
                                                 "untrained_top1": 100 * start.mean()}
        return {"protocol": {"seed": seed, "regime": "rare", "lr": 0.03, **protocol},
                "groups": {"clothing": {"headline": head, "top1_hits": bits}}}

    odd, even = np.arange(60) % 2 == 1, np.arange(60) % 2 == 0
    old = [run(s, odd) for s in range(2)]  # written before the protocol had gate_features
    new = [run(s, even, gate_features="scores", gate_temperature=False, second_look=["google"]) for s in range(2)]
    out, md = replications({"round-a": {"rare": old, "absent": []}, "round-b": {"rare": new}})
    rare = out["regimes"]["rare"]
    assert rare["pooled"] == pooled(old + new) and rare["pooled"]["seeds"] == [0, 1, 0, 1]
    assert rare["per_source"] == {"round-a": pooled(old), "round-b": pooled(new)}
    assert out["sources"]["round-b"]["runs"] == {"rare": [0, 1]} and rare["clothing"]["seeds"] == [0, 1, 0, 1]
    # one folder gains on the odd drawings, the other on the even: every drawing gains in 2 of the 4 runs, so
    # resampling the drawings alone cannot move the mean, and resampling the runs does
    assert images_only(old + new) == {"ci95_low": 50.0, "ci95_high": 50.0, "runs": 4}
    assert rare["pooled"]["reco_minus_untrained"] == 50.0 and rare["pooled"]["ci95_high"] > 50.0 > \
        rare["pooled"]["ci95_low"]
    assert images_only(old)["ci95_low"] < 50.0 < images_only(old)["ci95_high"]  # odd drawings only: they move
    assert "| rare, round-a | 60 | 60 |" in md and "| round-b | ? | rare 2 |" in md
    assert md.index("### pooled") < md.index("### each folder's pooled row")
    with pytest.raises(ValueError, match="round-c: rare seed 0 differs from the first run in gate_features"):
        replications({"round-a": {"rare": old}, "round-c": {"rare": [run(0, odd, gate_features="rivals")]}})
    # the command: folders of run files in, emoji-replications.{json,md} out; another protocol is an error message
    import json

    from benchmarks.emoji.__main__ import main

    for name, runs in (("a", old), ("b", new), ("c", [run(0, odd, lr=0.1)])):
        (tmp_path / name).mkdir()
        for r in runs:
            (tmp_path / name / f"emoji-rare-s{r['protocol']['seed']}.json").write_text(json.dumps(r))
    assert main(["summary", "--dirs", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--out-dir", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "emoji-replications.json").read_text())["regimes"]["rare"]["pooled"]
    assert [written[k] for k in ("reco_minus_untrained", "ci95_low", "ci95_high")] == pytest.approx(
        [rare["pooled"][k] for k in ("reco_minus_untrained", "ci95_low", "ci95_high")])
    with pytest.raises(SystemExit, match="differs from the first run in lr"):
        main(["summary", "--dirs", f"{tmp_path / 'a'},{tmp_path / 'c'}", "--out-dir", str(tmp_path)])


def test_concept_split_holds_whole_seeded_subcategories_for_validation():
    from types import SimpleNamespace

    from benchmarks.emoji.protocol import split_concepts, val_subcategories

    sizes = {"a": 20, "b": 18, "c": 16, "d": 15, "e": 10, "f": 8, "g": 6, "h": 4, "i": 3}
    rest = [SimpleNamespace(subcategory=sub, name=f"{sub}{i}") for sub, n in sizes.items() for i in range(n)]
    base, novel, unseen = split_concepts(rest, 0.15, 0.2, seed=0)
    assert sorted(e.name for e in base + novel + unseen) == sorted(e.name for e in rest)
    held = val_subcategories(unseen)
    # whole subcategories of >= 15 look-alikes, as many as it takes to hold 15 % of the others
    assert held and all(sizes[s] >= 15 for s in held) and len(unseen) == sum(sizes[s] for s in held) >= 15
    assert not {e.subcategory for e in base + novel} & set(held)
    assert len(novel) == 20
    assert split_concepts(rest, 0.15, 0.2, seed=0) == (base, novel, unseen)
    assert split_concepts(rest, 0.15, 0.0, seed=0)[2] == unseen  # the validation concepts stay put
    assert len({tuple(val_subcategories(split_concepts(rest, 0.15, 0.2, seed=s)[2])) for s in range(6)}) > 1
    # a reduced catalogue whose subcategories are all small still validates on its largest
    small = [e for e in rest if sizes[e.subcategory] < 15]
    assert val_subcategories(split_concepts(small, 0.15, 0.2, seed=0)[2]) == ["e"]


def test_a_run_with_other_settings_never_overwrites_a_default_result():
    from benchmarks.emoji.__main__ import _result_name

    assert _result_name(Protocol(seed=2)) == "emoji-absent-s2.json"
    assert _result_name(Protocol(regime="rare")) == "emoji-rare-s0.json"
    other = _result_name(Protocol(query_noise=0.5, base=BaseConfig(steps=60)))
    assert other == "emoji-absent-query_noise0.5-base_steps60-s0.json"
    assert _result_name(Protocol(regime="rare", batching="random", train_on="all", pair_vendor="facebook")) == \
        "emoji-rare-batchingrandom-train_onall-pair_vendorfacebook-s0.json"
    assert _result_name(Protocol(held_vendors=("google",))) == "emoji-absent-held_vendorsgoogle-s0.json"
    for bad in (("apple", "google"), ("twitter",), ()):  # a vendor the base or the memory holds, or none
        with pytest.raises(SystemExit, match="--held-vendors takes facebook and/or google"):
            Protocol(held_vendors=bad)
    # training settings `reco train` refuses are refused when the protocol is made, before any base is pretrained
    for bad, message in (({"gate_hidden": -1}, "--gate-hidden is the per-query gate's hidden width"),
                         ({"gate": False}, "--tune gate trains only the per-query gate: add --gate"),
                         ({"tune": "all", "gate": False, "gate_temperature": True}, "add --gate")):
        with pytest.raises(SystemExit, match=message):
            Protocol(**bad)
    assert _result_name(Protocol(gate_hidden=16)) == "emoji-absent-gate_hidden16-s0.json"
    assert _result_name(Protocol(targets=["animal-mammal+animal-bird"])) == \
        "emoji-absent-animal-mammal_animal-bird-s0.json"


def test_crossfit_folds_split_the_held_out_subcategories_evenly():
    from types import SimpleNamespace

    sizes = {"person-role": 82, "tool": 25, "office": 23, "arrow": 21, "other-symbol": 18, "animal-marine": 17,
             "animal-bug": 16, "plant-other": 16}
    unseen = [SimpleNamespace(subcategory=sub) for sub, n in sizes.items() for _ in range(n)]
    a, b = folds(unseen)
    assert sorted(a + b) == sorted(sizes) and not set(a) & set(b)
    size = lambda f: sum(sizes[s] for s in f)  # noqa: E731
    assert abs(size(a) - size(b)) <= 16 and "person-role" in a  # the largest first
    assert folds(list(reversed(unseen))) == [a, b]


def test_crossfit_hits_are_saved_under_names_that_read_back_as_their_recipe():
    for key in (START, ("facebook", 0.03, 20, "scores", False, "reco", 0),
                ("facebook+google", 0.1, 10, "rivals", True, "reco", 0),
                ("facebook", 0.1, 10, "scores", True, "fused", 0), ("facebook", 0.1, 10, "scores", False, "fused", 0),
                ("facebook", 0.1, 10, "scores", False, "reco", 16), ("facebook", 0.03, 20, "rivals", True, "fused", 8)):
        assert _key(_name(key)) == key
    # names saved before round seven (no features), round eight (no sharpness), round nine (no loss) and round ten
    # (no hidden width): a fixed-sharpness linear gate that saw the scores, or the features named, trained on the
    # paper's loss
    assert _key("facebook_0.03_20") == ("facebook", 0.03, 20, "scores", False, "reco", 0)
    assert _key("facebook_0.1_10_rivals") == ("facebook", 0.1, 10, "rivals", False, "reco", 0)
    assert _key("facebook_0.1_10_scores_temperature") == ("facebook", 0.1, 10, "scores", True, "reco", 0)
    assert _key("facebook_0.1_10_scores_temperature_fused") == ("facebook", 0.1, 10, "scores", True, "fused", 0)


def test_crossfit_keeps_the_start_unless_a_recipe_clears_one_standard_error():
    best = {"vendors": "facebook+google", "lr": 0.01, "epochs": 40, "minus_start": 2.1, "se": 1.4}
    assert pick(best) is best
    best["se"] = 2.5  # the highest gain, but within its noise: the start stays
    assert pick(best) is None


def test_crossfit_table_names_the_gate_form_only_when_the_grid_varies_it():
    """The markdown's rows: a grid over the gate's hidden width (`crossfit --hidden 0,16`) gets a `gate` column,
    linear or N hidden; the default grid keeps the table of earlier rounds."""
    from benchmarks.emoji.crossfit import markdown as crossfit_markdown

    rng = np.random.default_rng(0)
    start = rng.random(200) < 0.2
    linear = ("facebook", 0.03, 20, "scores", False, "reco", 0)
    wide = linear[:6] + (16,)
    per_seed = [{START: start, linear: start | (rng.random(200) < 0.05), wide: start | (rng.random(200) < 0.1)}]
    cells = recipes(per_seed)
    best = max(cells, key=lambda c: c["minus_start"])
    result = {"regime": "rare", "seeds": [0], "images": 200, "recipes": cells, "best": best, "pick": pick(best),
              "start_top1": 100 * start.mean(), "start_per_seed": [100 * start.mean()], "folds": {"0": [["a"], ["b"]]}}
    text = crossfit_markdown(result)
    assert "| gate | lr \\ epochs | 20 |" in text and best["hidden"] == 16
    assert "| facebook | scores | linear | 0.03 |" in text and "| facebook | scores | 16 hidden | 0.03 |" in text
    assert ", 16 hidden units, lr 0.03," in text
    one = crossfit_markdown({**result, "recipes": [c for c in cells if c["hidden"] == 0], "best": cells[0]})
    assert "gate |" not in one and "| facebook | scores | 0.03 |" in one and "hidden" not in one


def test_the_switch_oracle_takes_per_drawing_the_image_balance_that_is_right():
    """`balance`'s hindsight headroom of a per-query image gate: per drawing, the memory off or the start, or any
    image bias (the text side at its start), pooled against the start; a drawing only a text-side change gets right
    does not count."""
    from benchmarks.emoji.balance import switch_oracle

    def seed(start, off, half, text_only):
        h = {cell: np.zeros(4, bool) for cell in itertools.product(BIASES, repeat=2)}
        h[(0.0, 0.0)], h[(BIASES[0], 0.0)], h[(-0.5, 0.0)], h[(0.0, -1.0)] = (np.array(x, bool) for x in
                                                                             (start, off, half, text_only))
        return h

    o = switch_oracle([seed([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]),
                       seed([1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1])])
    assert o["off_or_start"]["top1"] == pytest.approx(100 * 4 / 8)  # the start's 3 of 8, and one the memory off gets
    assert o["off_or_start"]["minus_start"] == pytest.approx(100 * 1 / 8)
    assert o["any"]["minus_start"] == pytest.approx(100 * 2 / 8)  # and one at bias -0.5; text-only ones never
    assert o["any"]["ci95_low"] >= 0
