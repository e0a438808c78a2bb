"""The quality benchmark, reduced: 30 held-out flags, 300 other emoji, a briefly pretrained base, few epochs.

Reads the emoji packages from the cache that `make bench-data` fills (`make test` runs it first); nothing is
downloaded here. RECO must beat the frozen base clearly, the memory without the targets must not, and a second
run with the same seed (base model from the cache) must give the same numbers.
"""

import pytest

from benchmarks.emoji import data
from benchmarks.emoji.base import BaseConfig
from benchmarks.emoji.protocol import Protocol, run


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


def test_reduced_protocol_training_keeps_the_untrained_start(npm_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("RECO_HOME", str(tmp_path / "unused"))
    p = Protocol(targets=["country-flag"], seed=0, epochs=10, max_targets=30, max_rest=300, ablations=True,
                 base=BaseConfig(steps=60))
    first = run(p, tmp_path / "home", npm_cache, log=lambda m: None)
    assert set(first["groups"]) == {"country-flag", "dev"}
    h = first["groups"]["country-flag"]["headline"]
    assert h["classes"] == 30
    assert first["base_model"]["cached"] is False
    # the trained layers never fall below their untrained start (before validation on the targets' vendor they
    # lost 9-14 points on every group); beating it here, as the issue asks, is not reached yet (README, quality)
    assert h["reco_top1"] >= h["untrained_top1"], first["groups"]["country-flag"]["table"]
    assert h["reco_top1"] >= h["baseline_top1"] + 15, first["groups"]["country-flag"]["table"]
    assert h["retrieval_off_top1"] <= h["baseline_top1"] + 7, first["groups"]["country-flag"]["table"]
    assert h["no_target_memory_top1"] <= h["baseline_top1"] + 7, first["groups"]["country-flag"]["table"]
    assert h["cross_search_top1"] < h["reco_top1"] and 0 < h["swap_recovery"]
    assert h["t2i_r1_reco"] > h["t2i_r1_baseline"]
    assert first["training"]["reco"]["start"]["acc"] <= first["training"]["reco"]["best"]["score"]
    assert all(r["leakage_guard"]["enabled"] for r in [first["groups"]["country-flag"]["eval_run"]])

    # the same seed again (base model from the cache, the ablations left out): the same numbers
    p.ablations = False
    second = run(p, tmp_path / "home", npm_cache, log=lambda m: None)
    assert second["base_model"]["cached"] is True
    table, again = first["groups"]["country-flag"]["table"], second["groups"]["country-flag"]["table"]
    assert set(again) < set(table)
    assert again == {row: table[row] for row in again}

    # the rare regime shows the targets to the base (one vendor, rarely): the base knows them a little
    rare = run(Protocol(targets=["country-flag"], regime="rare", seed=0, epochs=2, max_targets=30, max_rest=300,
                        base=BaseConfig(steps=60, rare_weight=1.0)), tmp_path / "home", npm_cache, log=lambda m: None)
    assert rare["base_model"]["rare_emoji"] == 30 + rare["n_novel_pairs"] + rare["n_unseen_val_pairs"]
    assert rare["groups"]["country-flag"]["headline"]["baseline_top1"] > h["baseline_top1"]


def test_strong_augmentation_keeps_the_white_background():
    import torch
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
    from benchmarks.emoji.__main__ import _versions

    cpu = _versions()["cpu"]
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


def test_concept_split_is_seeded_disjoint_and_keeps_validation_when_novel_changes():
    from benchmarks.emoji.protocol import split_concepts

    rest = list(range(100))
    base, novel, unseen = split_concepts(rest, 0.15, 0.2, seed=0)
    assert (len(base), len(novel), len(unseen)) == (65, 20, 15)
    assert sorted(base + novel + unseen) == rest
    assert split_concepts(rest, 0.15, 0.2, seed=0) == (base, novel, unseen)
    assert split_concepts(rest, 0.15, 0.0, seed=0)[2] == unseen  # the validation concepts stay put
    assert split_concepts(rest, 0.15, 0.2, seed=1)[2] != unseen


def test_a_run_with_other_settings_never_overwrites_a_default_result():
    from benchmarks.emoji.__main__ import _result_name

    assert _result_name(Protocol(seed=2)) == "emoji-absent-s2.json"
    assert _result_name(Protocol(regime="rare")) == "emoji-rare-s0.json"
    other = _result_name(Protocol(query_noise=0.5, base=BaseConfig(steps=60)))
    assert other == "emoji-absent-query_noise0.5-base_steps60-s0.json"
    assert _result_name(Protocol(targets=["animal-mammal+animal-bird"])) == \
        "emoji-absent-animal-mammal_animal-bird-s0.json"
