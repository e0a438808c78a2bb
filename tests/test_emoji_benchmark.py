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


def test_reduced_protocol_reco_beats_frozen_base(npm_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("RECO_HOME", str(tmp_path / "unused"))
    p = Protocol(targets=["country-flag"], seed=0, epochs=10, max_targets=30, max_rest=300,
                 base=BaseConfig(steps=60))
    first = run(p, tmp_path / "home", npm_cache, log=lambda m: None)
    h = first["headline"]
    assert h["classes"] == 30
    assert first["base_model"]["cached"] is False
    assert h["reco_top1"] >= h["baseline_top1"] + 15, first["table"]
    assert h["no_target_memory_top1"] <= h["baseline_top1"] + 7, first["table"]
    assert h["uni_search_top1"] > h["cross_search_top1"], first["table"]
    assert 0 < h["swap_recovery"]
    assert all(r["leakage_guard"]["enabled"] for r in first["eval_runs"].values())

    # the same seed again (base model from the cache, the ablations left out): the same numbers
    p.ablations = False
    second = run(p, tmp_path / "home", npm_cache, log=lambda m: None)
    assert second["base_model"]["cached"] is True
    assert set(second["table"]) < set(first["table"])
    assert second["table"] == {row: first["table"][row] for row in second["table"]}


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
