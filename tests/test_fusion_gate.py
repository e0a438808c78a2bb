"""The per-query gate (`reco train --gate`): at step 0 it is the ungated untrained start exactly, what it sees, and
that trained it trusts the memory where the neighbours agree and the query where they scatter (app/fusion.py)."""

import json

import pytest
import torch
import torch.nn.functional as F

from app.fusion import FusionConfig, build, gate_features, info_nce, param_groups
from app.gate import GATE_FEATURES, GATE_SETS, GATE_SIGNALS, gate_names
from tests.test_train import memory  # noqa: F401 (the fixture)

D, K = 32, 6


def _inputs(b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    r = F.normalize(torch.randn(b, K, D, generator=g), dim=-1)
    s = torch.rand(b, K, generator=g).sort(dim=1, descending=True).values
    mask = torch.rand(b, K, generator=g) > 0.2
    mask[0] = False  # a query with no neighbour at all
    mask[1, 1:] = False  # and one with a single neighbour
    return q, r, s, mask


@pytest.mark.parametrize("init,features,temperature,hidden", [
    ("retrieval", "scores", False, 0), ("identity", "scores", False, 0), ("retrieval", "rivals", False, 0),
    ("retrieval", "scores", True, 0), ("retrieval", "rivals", True, 8), ("identity", "scores", False, 8)])
def test_a_gated_model_at_step_0_is_the_ungated_untrained_start_exactly(init, features, temperature, hidden):
    plain, gated = (build(FusionConfig(dim=D, k=K, init=init, gate=g, gate_features=features,
                                       gate_temperature=temperature and g, gate_hidden=hidden * g), 7)
                    for g in (False, True))
    first, last = (gated.image.gate, gated.image.gate) if hidden == 0 else (gated.image.gate[0], gated.image.gate[-1])
    assert first.in_features == len(GATE_SETS[features]) and first.out_features == (hidden or 1 + temperature)
    assert last.out_features == 1 + temperature
    if hidden:  # the hidden layer starts random (the output layer at zero), so the gate can learn past step 0
        assert first.weight.abs().sum() > 0 and not last.weight.any()
    for key, value in plain.state_dict().items():  # the gate takes nothing from the others' random start
        assert torch.equal(value, gated.state_dict()[key]), key
    q, r, s, mask = _inputs()
    for side in ("image", "text"):
        a, b = getattr(plain, side), getattr(gated, side)
        a.eval(), b.eval()
        assert torch.equal(a(q, r, s, mask), b(q, r, s, mask))
        assert torch.equal(b.gate_value(q, r, s, mask), torch.full((16,), 0.5))
        assert torch.equal(b.sharpness(q, r, s, mask), torch.ones(16))


def test_the_gate_temperature_multiplies_the_score_scale_per_query():
    """--gate-temperature: the gate's second output z sets the score softmax's scale to score_scale·e^z (bounded at
    e^±4), so a gate whose weights are zero is the layer built with that scale, and a query-dependent z sharpens one
    query's memory term and not another's."""
    q, r, s, mask = _inputs()
    for z, factor in ((0.7, 0.7), (-1.5, -1.5), (9.0, 4.0)):
        sharp = build(FusionConfig(dim=D, k=K, gate=True, gate_temperature=True, init="retrieval"), 3)
        fixed = build(FusionConfig(dim=D, k=K, gate=True, init="retrieval",
                                   score_scale_init=10.0 * torch.tensor(factor).exp().item()), 3)
        with torch.no_grad():
            sharp.image.gate.bias[1] = z
        for m in (sharp, fixed):
            m.eval()
        torch.testing.assert_close(sharp.image(q, r, s, mask), fixed.image(q, r, s, mask))
        torch.testing.assert_close(sharp.image.sharpness(q, r, s, mask), torch.full((16,), factor).exp())
    # z from a signal: the query whose top-1 leads by more gets the sharper memory term
    layer = build(FusionConfig(dim=D, k=K, gate=True, gate_temperature=True, init="retrieval"), 3).image.eval()
    with torch.no_grad():
        layer.gate.weight[1, GATE_FEATURES.index("margin")] = 5.0
    full = torch.ones(2, K, dtype=torch.bool)
    wide = torch.tensor([[0.9] + [0.3] * (K - 1), [0.9] + [0.85] * (K - 1)])
    factor = layer.sharpness(q[:2], r[:2], wide, full)
    assert factor[0] > factor[1] > 1.0 and layer.gate_value(q[:2], r[:2], wide, full).eq(0.5).all()
    with pytest.raises(ValueError, match="needs gate=True"):
        FusionConfig(dim=D, gate_temperature=True)


def test_gate_features_see_scores_and_agreement_of_present_neighbours_only():
    q, r, s, mask = _inputs()
    f = gate_features(q, r, s, mask)
    assert f.shape == (16, len(GATE_FEATURES))
    assert torch.equal(f[0], torch.zeros(len(GATE_FEATURES)))  # no neighbour: nothing to trust
    col = {name: i for i, name in enumerate(GATE_FEATURES)}
    assert f[1, col["top1_score"]] == s[1, 0] and f[1, col["margin"]] == 0 and f[1, col["present"]] == 1 / K
    same = F.normalize(torch.randn(1, D), dim=-1).expand(K, D)[None] + 0.01 * torch.randn(1, K, D)
    scattered = F.normalize(torch.randn(1, K, D), dim=-1)
    full = torch.ones(1, K, dtype=torch.bool)
    agree = gate_features(q[:1], same, s[2:3], full)[0]
    scatter = gate_features(q[:1], scattered, s[2:3], full)[0]
    for name in ("agreement", "top1_agreement"):
        assert agree[col[name]] > 0.95 and abs(scatter[col[name]]) < 0.6, name
    # a masked neighbour changes nothing, whatever it holds
    r2 = r.clone()
    r2[~mask] = 100.0
    torch.testing.assert_close(gate_features(q, r2, s, mask), f)
    torch.testing.assert_close(gate_features(q, r2, s, mask, GATE_SIGNALS), gate_features(q, r, s, mask, GATE_SIGNALS))


def test_rival_signals_measure_the_top_1_against_its_runner_up():
    """The "rivals" set adds the look-alike beside the top-1: its score gap, whether it says the same, and whether
    the top-1's vector fits the query; with one neighbour (no runner-up) the first two are 0."""
    q, r, s, mask = _inputs()
    f = gate_features(q, r, s, mask, GATE_SETS["rivals"])
    col = {name: i for i, name in enumerate(GATE_SETS["rivals"])}
    torch.testing.assert_close(f[:, :len(GATE_FEATURES)], gate_features(q, r, s, mask))  # the scores set, first
    assert f[1, col["runner_up_gap"]] == 0 and f[1, col["runner_up_agreement"]] == 0
    unit = F.normalize(r, dim=-1)
    for i in range(2, 16):
        present = mask[i].nonzero()[:, 0]  # scores are sorted: the first two present are the top-1 and runner-up
        if len(present) < 2:
            continue
        a, b = present[:2]
        torch.testing.assert_close(f[i, col["runner_up_gap"]], s[i, a] - s[i, b])
        torch.testing.assert_close(f[i, col["runner_up_agreement"]], unit[i, a] @ unit[i, b])
        torch.testing.assert_close(f[i, col["query_to_top1"]], F.normalize(q[i], dim=-1) @ unit[i, a])


def test_gate_features_are_a_set_or_known_names_and_old_models_see_the_scores():
    assert gate_names("rivals") == GATE_SIGNALS and gate_names("margin, present") == ("margin", "present")
    for bad in ("bogus", "margin,margin", ""):
        with pytest.raises(ValueError, match="gate features take a set"):
            gate_names(bad)
    # a model saved before the field existed (its stored config has no gate_features) sees round six's signals
    assert FusionConfig(dim=D, gate=True).gate_features == GATE_FEATURES == GATE_SETS["scores"]
    assert FusionConfig(dim=D, gate=True, gate_features=["margin"]).gate_features == ("margin",)  # from JSON


def _task(n, gen):
    """Queries that are noisy copies of their targets. Half of them ("agreeing") retrieve k noisy copies of the
    right target, which agree with each other; the others retrieve k scattered wrong vectors."""
    target = F.normalize(torch.randn(n, D, generator=gen), dim=-1)
    query = F.normalize(target + 2.0 * torch.randn(n, D, generator=gen) / D ** 0.5, dim=-1)
    agree = torch.arange(n) % 2 == 0
    right = F.normalize(target[:, None] + 0.3 * torch.randn(n, K, D, generator=gen) / D ** 0.5, dim=-1)
    wrong = F.normalize(torch.randn(n, K, D, generator=gen), dim=-1)
    retrieved = torch.where(agree[:, None, None], right, wrong)
    scores = (0.6 + 0.1 * torch.rand(n, K, generator=gen)).sort(dim=1, descending=True).values  # uninformative
    return query, retrieved, scores, target, agree


@pytest.mark.parametrize("hidden", [0, 8])
def test_trained_gate_trusts_the_memory_where_neighbours_agree(hidden):
    """The documented direction: after training, g is higher for queries whose neighbours agree (the memory then
    holds the answer) than for queries whose neighbours scatter, and only the gate learned (--tune gate); for the
    linear gate and for one with a hidden layer (--gate-hidden)."""
    model = build(FusionConfig(dim=D, k=K, gate=True, init="retrieval", score_scale_init=100.0, gate_hidden=hidden), 0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, "gate", 0.0), lr=5e-2)
    gen = torch.Generator().manual_seed(0)
    layer = model.image
    for _ in range(60):
        q, r, s, target, _ = _task(64, gen)
        loss = info_nce(layer(q, r, s), target, model.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    q, r, s, target, agree = _task(256, torch.Generator().manual_seed(1))
    with torch.no_grad():
        g = layer.gate_value(q, r, s)
        assert g[agree].mean() > 0.5 > g[~agree].mean()  # the start is 0.5 for every query
        assert g[agree].mean() > g[~agree].mean() + 0.3
        if not hidden:
            assert layer.gate.weight[0, GATE_FEATURES.index("agreement")] > 0  # more agreement, more memory
        # and the gate pays: top-1 against the targets beats the ungated start on the same queries
        start_model = build(FusionConfig(dim=D, k=K, gate=True, init="retrieval", score_scale_init=100.0), 0)
        start_model.eval()
        acc = lambda y: float(((y @ target.T).argmax(1) == torch.arange(256)).float().mean())  # noqa: E731
        assert acc(layer(q, r, s)) > acc(start_model.image(q, r, s)) + 0.05
    for key, value in model.state_dict().items():
        if "gate" not in key and key != "logit_scale":
            assert torch.equal(value, start[key]), key


def test_tune_gate_needs_the_gate():
    from app.errors import RecoError
    from app.train import TrainConfig

    with pytest.raises(ValueError, match="needs the gated fusion"):
        param_groups(build(FusionConfig(dim=D, k=K), 0), "gate", 0.0)
    with pytest.raises(RecoError, match="add --gate"):
        TrainConfig(tune="gate").check()
    with pytest.raises(RecoError, match="--gate-temperature is an output of the per-query gate: add --gate"):
        TrainConfig(gate_temperature=True).check()
    with pytest.raises(RecoError, match="--gate-hidden is the per-query gate's hidden width"):
        TrainConfig(gate_hidden=4).check()
    with pytest.raises(RecoError, match=">= 0"):
        TrainConfig(gate=True, gate_hidden=-1).check()
    with pytest.raises(ValueError, match="gate_hidden"):
        FusionConfig(dim=D, gate_hidden=4)
    with pytest.raises(RecoError, match="--val-batching must be"):
        TrainConfig(val_batching="groups").check()
    with pytest.raises(RecoError, match="--loss must be one of reco, fused"):
        TrainConfig(loss="clip").check()


def test_the_fused_loss_is_the_papers_fused_term_alone():
    """--loss fused trains on the comparison classification makes (fused image vs fused text); the paper's loss adds
    each fused side against the other's frozen embedding."""
    from app.fusion import LOSSES

    gen = torch.Generator().manual_seed(0)
    v_ref, t_ref, v, t = (F.normalize(torch.randn(8, D, generator=gen), dim=-1) for _ in range(4))
    scale = torch.tensor(2.0)
    fused = info_nce(v_ref, t_ref, scale)
    assert torch.equal(LOSSES["fused"](v_ref, t_ref, v, t, scale), fused)
    assert torch.allclose(LOSSES["reco"](v_ref, t_ref, v, t, scale),
                          fused + info_nce(v_ref, t, scale) + info_nce(v, t_ref, scale))


def test_train_cli_gate_and_shard_validation(cli_run, rt, memory, tmp_path, tiny_config):
    """`reco train --gate --tune gate --val-batching shard`: the model records the gate, its untrained start equals
    the ungated one's, and validation is told apart within each shard of the validation pairs."""
    from app.encoder import RecoEncoder
    from app.train import _batches, load_pairs
    from app import synthetic
    from tests.test_train import JITTER, build as build_memory

    synthetic.write_wds(tmp_path / "val", 3, 12, seed=2, jitter=JITTER, prefix="v")
    build_memory(rt, "val", tmp_path / "val", tiny_config)
    common = ["--pairs", "mem", "--memory", "mem", "-k", "5", "--epochs", "2", "--batch-size", "64",
              "--val-pairs", "val", "--select", "1se", "--val-batching", "shard"]
    cli_run("train", "gated", *common, "--gate", "--tune", "gate", "--gate-features", "rivals", "--gate-temperature",
            "--loss", "fused")
    cli_run("train", "plain", *common)
    shown = json.loads(cli_run("model", "show", "gated", "--json").stdout)
    assert shown["train"]["gate"] is True and shown["train"]["tune"] == "gate" and shown["train"]["loss"] == "fused"
    # the same start, validated with each job's loss: fused vs fused alone is one of the paper's three terms
    plain_start = json.loads(cli_run("model", "show", "plain", "--json").stdout)["metrics"]["start"]
    assert shown["metrics"]["start"]["acc"] == plain_start["acc"]
    assert 0 < shown["metrics"]["start"]["loss"] < plain_start["loss"]
    assert shown["train"]["gate_features"] == "rivals" and shown["train"]["gate_temperature"] is True
    assert shown["train"]["val_batching"] == "shard" and shown["metrics"]["val_pairs"] == 36
    gated = RecoEncoder.load("gated", runtime=rt, load_backbone=False, checkpoint="start")
    plain = RecoEncoder.load("plain", runtime=rt, load_backbone=False, checkpoint="start")
    assert gated.fusion.image.gate is not None and plain.fusion.image.gate is None
    assert gated.fusion.cfg.gate_features == GATE_SIGNALS and gated.fusion.text.gate.in_features == len(GATE_SIGNALS)
    assert gated.fusion.cfg.gate_temperature and gated.fusion.text.gate.out_features == 2
    for key, value in plain.fusion.state_dict().items():
        assert torch.equal(value, gated.fusion.state_dict()[key]), key
    # --gate-hidden: the job records the width, the gate reads its signals through that many units, and its start
    # is the same untrained start; a linear gate keeps the parameter names of models saved before the option
    cli_run("train", "wide", *common, "--gate", "--tune", "gate", "--gate-hidden", "4")
    wide_shown = json.loads(cli_run("model", "show", "wide", "--json").stdout)
    assert wide_shown["train"]["gate_hidden"] == 4 and shown["train"]["gate_hidden"] == 0
    assert wide_shown["metrics"]["start"] == plain_start
    wide = RecoEncoder.load("wide", runtime=rt, load_backbone=False)
    assert wide.fusion.cfg.gate_hidden == 4 and wide.fusion.image.gate[0].out_features == 4
    assert {"image.gate.weight", "image.gate.bias"} <= set(gated.fusion.state_dict())
    with rt.db.session() as s:
        from app.db.models import FusionModel

        job = s.query(FusionModel).filter_by(name="gated").one().config["job"]
    val = load_pairs(rt, job["val_pairs"][2], job["val_pairs"][3])
    batches = _batches(val, __import__("numpy").arange(36), 64, "shard")
    assert sorted(len(b) for b in batches) == [12, 12, 12]
    assert all(len({val.shards[i] for i in b}) == 1 for b in batches)
    bad = cli_run("train", "bad", "--pairs", "mem", "--memory", "mem", "--tune", "gate", ok=False)
    assert bad.exit_code != 0 and "add --gate" in bad.output
    bad = cli_run("train", "bad", *common, "--gate-hidden", "4", ok=False)
    assert bad.exit_code != 0 and "> 0 only with --gate" in bad.output
    bad = cli_run("train", "bad", *common, "--gate", "--gate-features", "top1_score,bogus", ok=False)
    assert bad.exit_code != 0 and "--gate-features: gate features take a set (scores, rivals)" in bad.output
