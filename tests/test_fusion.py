"""The fusion layer and the retrieval that feeds it. Device-aware: the layer tests run on the CPU, and also on
CUDA where there is one (where training and inference put the layers), so RECO_DEVICE=cuda on a GPU checks both."""

import numpy as np
import pytest
import torch

from app.fusion import FusionConfig, FusionLayer, RecoFusion, info_nce, reco_loss
from app.retrieval import modes, retrieve
from app.store.base import point_id
from app.store.edge import EdgeStore

D = 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    img, txt = _unit(rng.standard_normal((20, D))).astype(np.float32), _unit(rng.standard_normal((20, D))).astype(np.float32)
    s = EdgeStore(tmp_path / "v")
    ids = [point_id("m", 1, str(i)) for i in range(20)]
    s.create("c", D)
    s.upsert("c", ids, img, txt, [{"key": str(i)} for i in range(20)])
    return s, ids, img, txt


def test_modes_table():
    assert modes("image") == ("image", "text")
    assert modes("text") == ("text", "image")
    assert modes("image", search="cross") == ("text", "text")
    assert modes("image", fusion="uni") == ("image", "image")
    with pytest.raises(ValueError):
        modes("image", search="sideways")


def test_uni_search_cross_fusion_returns_the_other_modality(store):
    s, ids, img, txt = store
    nb = retrieve(s, "c", img[:3], "image", 4, dim=D)
    assert [row[0] for row in nb.ids] == ids[:3]
    np.testing.assert_allclose(nb.vectors[:, 0], txt[:3], atol=1e-5)
    assert nb.mask.all() and nb.scores[:, 0] == pytest.approx(1.0, abs=1e-4)
    nb = retrieve(s, "c", txt[:2], "text", 2, dim=D, fusion="uni")
    np.testing.assert_allclose(nb.vectors[:, 0], txt[:2], atol=1e-5)
    nb = retrieve(s, "c", img[:2], "image", 1, dim=D, search="cross")  # image query against captions
    exact = np.argmax(img[:2] @ txt.T, axis=1)
    assert [row[0] for row in nb.ids] == [ids[j] for j in exact]


def test_exclusions_dedup_threshold_and_mask(store):
    s, ids, img, txt = store
    nb = retrieve(s, "c", img[:2], "image", 3, dim=D, exclude=[{ids[0]}, {ids[1]}])
    assert ids[0] not in nb.ids[0] and ids[1] not in nb.ids[1]
    near = _unit(img[0] + 0.01 * np.random.default_rng(1).standard_normal(D)).astype(np.float32)
    nb = retrieve(s, "c", near[None], "image", 3, dim=D, dedup_threshold=0.98)
    assert ids[0] not in nb.ids[0] and (nb.scores[0] <= 0.98).all()
    nb = retrieve(s, "c", img[:1], "image", 5, dim=D, score_threshold=0.999)
    assert nb.ids[0] == [ids[0]]
    assert nb.mask[0].tolist() == [True, False, False, False, False]
    assert not nb.vectors[0, 1:].any() and not nb.scores[0, 1:].any()


def test_untrained_layer_returns_the_query_and_only_fusion_params_learn():
    layer = FusionLayer(FusionConfig(dim=D, k=4))
    q = torch.nn.functional.normalize(torch.randn(3, D), dim=-1)
    out = layer(q, torch.randn(3, 4, D), torch.rand(3, 4), torch.ones(3, 4, dtype=torch.bool))
    torch.testing.assert_close(out, q)
    assert all(p.requires_grad for p in layer.parameters())


def test_masked_neighbours_have_no_influence_and_scores_steer_attention():
    torch.manual_seed(0)
    layer = FusionLayer(FusionConfig(dim=D, k=4, heads=1))
    for p in (layer.out.weight, layer.mlp[-1].weight):
        torch.nn.init.normal_(p, std=0.5)
    q = torch.nn.functional.normalize(torch.randn(1, D), dim=-1)
    r = torch.randn(1, 4, D)
    mask = torch.tensor([[True, True, False, False]])
    scores = torch.rand(1, 4)
    a = layer(q, r, scores, mask)
    r2, scores2 = r.clone(), scores.clone()
    r2[0, 2:] = 100 * torch.randn(2, D)
    scores2[0, 2:] = 5.0
    b = layer(q, r2, scores2, mask)
    torch.testing.assert_close(a, b)
    # with a large score scale the output follows the best-scored neighbour
    layer.score_scale.data.fill_(1000.0)
    one = layer(q, r, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.ones(1, 4, dtype=torch.bool))
    two = layer(q, r, torch.tensor([[0.0, 1.0, 0.0, 0.0]]), torch.ones(1, 4, dtype=torch.bool))
    assert not torch.allclose(one, two, atol=1e-3)


def test_size_and_switches():
    full = RecoFusion(FusionConfig(dim=512, k=10))
    n = sum(p.numel() for p in full.image.parameters())
    assert 2.9e6 < n < 3.4e6  # about 3 M per side at D = 512, as ARCHITECTURE.md says
    plain = FusionLayer(FusionConfig(dim=512, k=10, use_rank=False, use_score=False))
    assert plain.rank_emb is None and plain.score_scale is None
    assert FusionConfig(dim=512).heads == 8


def test_loss_prefers_matching_pairs():
    a = torch.nn.functional.normalize(torch.randn(8, D), dim=-1)
    scale = torch.tensor(np.log(100.0))
    assert info_nce(a, a, scale) < info_nce(a, a.roll(1, 0), scale)
    assert reco_loss(a, a, a, a, scale) == pytest.approx(3 * float(info_nce(a, a, scale)))


def test_retrieval_init_starts_as_score_weighted_fusion():
    """init=retrieval: the untrained layer is normalize(q + α Σ softmax(s/τ) n), the prior that generalises."""
    d, k = 64, 5
    torch.manual_seed(0)
    layer = FusionLayer(FusionConfig(dim=d, k=k, init="retrieval", score_scale_init=100.0, alpha_init=1.0))
    layer.eval()
    q = torch.nn.functional.normalize(torch.randn(8, d), dim=-1)
    n = torch.nn.functional.normalize(torch.randn(8, k, d), dim=-1)
    n = n - n.mean(-1, keepdim=True)  # layer norm then only rescales each neighbour
    n = torch.nn.functional.normalize(n, dim=-1)
    s = torch.rand(8, k)
    out = layer(q, n, s, torch.ones(8, k, dtype=torch.bool))
    w = torch.softmax(100.0 * s, dim=-1)
    expected = torch.nn.functional.normalize(q + (w[..., None] * n).sum(1), dim=-1)
    assert torch.nn.functional.cosine_similarity(out, expected).min() > 0.999
    # no neighbour at all: the query attends to itself and comes back (up to layer norm's centring)
    alone = layer(q, n, s, torch.zeros(8, k, dtype=torch.bool))
    assert torch.nn.functional.cosine_similarity(alone, q).min() > 0.99
    with pytest.raises(ValueError, match="fusion init"):
        FusionConfig(dim=d, init="magic")


def test_retrieval_off_ignores_every_neighbour_in_training_and_inference():
    """The Figure 3-left control: with retrieval=False the neighbours, their scores and their mask change nothing."""
    torch.manual_seed(0)
    layer = FusionLayer(FusionConfig(dim=D, k=4, init="retrieval", retrieval=False))
    for p in (layer.q.weight, layer.mlp[-1].weight):
        torch.nn.init.normal_(p, std=0.5)
    q = torch.nn.functional.normalize(torch.randn(5, D), dim=-1)
    outs = [layer(q, torch.randn(5, 4, D), torch.rand(5, 4), torch.rand(5, 4) > 0.3) for _ in range(3)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])
    layer.train()
    out = layer(q, torch.randn(5, 4, D), torch.rand(5, 4))
    out.sum().backward()  # it still learns (the MLP and projections), from the query alone
    assert layer.mlp[-1].weight.grad.abs().sum() > 0
    on = FusionLayer(FusionConfig(dim=D, k=4, init="retrieval"))
    on.load_state_dict(layer.state_dict())
    on.eval()
    assert not torch.allclose(on(q, torch.randn(5, 4, D), torch.rand(5, 4)), outs[0])


def test_build_gives_the_same_start_for_the_same_seed():
    from app.fusion import build

    cfg = FusionConfig(dim=D, k=4)
    a, b, c = build(cfg, 3), build(cfg, 3), build(cfg, 4)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key])
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def _tuned(tune: str, d: int = 32):
    """(state at the start, state after five steps) of retrieval-init layers trained with `tune`."""
    from app.fusion import build, param_groups

    model = build(FusionConfig(dim=d, k=4, init="retrieval"), 0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, tune, 0.05), lr=1e-2)
    for _ in range(5):
        q = torch.nn.functional.normalize(torch.randn(8, d), dim=-1)
        r, s = torch.randn(8, 4, d), torch.rand(8, 4)
        loss = reco_loss(model.image(q, r, s), model.text(q, r, s), q, q, model.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return start, model.state_dict()


def test_tune_attention_learns_where_to_look_and_keeps_the_values():
    from app.fusion import build, param_groups

    d = 32
    start, now = _tuned("attention", d)
    for side in ("image", "text"):
        for name in ("q.weight", "type_emb", "rank_emb", "score_scale"):
            assert not torch.equal(now[f"{side}.{name}"], start[f"{side}.{name}"]), name
        assert not torch.equal(now[f"{side}.kv.weight"][:d], start[f"{side}.kv.weight"][:d])  # keys learn
        for name in ("kv.weight", "kv.bias"):  # values do not, not even by weight decay
            assert torch.equal(now[f"{side}.{name}"][d:], start[f"{side}.{name}"][d:]), name
        for name in ("out.weight", "mlp.0.weight", "mlp.3.weight", "ln1.weight", "ln2.bias"):
            assert torch.equal(now[f"{side}.{name}"], start[f"{side}.{name}"]), name
    with pytest.raises(ValueError, match="tune must be"):
        param_groups(build(FusionConfig(dim=d, k=4), 0), "values", 0.0)


def test_tune_scalars_learns_only_the_balance_of_the_retrieval_prior():
    import math

    d = 32
    start, now = _tuned("scalars", d)
    assert not torch.equal(now["logit_scale"], start["logit_scale"])
    for side in ("image", "text"):
        w = now[f"{side}.out.weight"]
        alpha = w[0, 0] * math.sqrt(d)
        assert abs(alpha - 1.0) > 1e-3  # the memory's weight moved ...
        torch.testing.assert_close(w, torch.eye(d) * w[0, 0])  # ... and the map is still alpha times the identity
        assert not torch.equal(now[f"{side}.score_scale"], start[f"{side}.score_scale"])
        for name in ("q.weight", "kv.weight", "out.bias", "type_emb", "rank_emb", "mlp.0.weight", "ln1.weight"):
            assert torch.equal(now[f"{side}.{name}"], start[f"{side}.{name}"]), name


def test_similar_groups_are_balanced_complete_and_hold_near_rows():
    from app.train import similar_groups

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 16)) * 10
    x = np.repeat(centres, 40, axis=0) + rng.standard_normal((320, 16))  # 8 clusters of 40 rows
    rows = rng.permutation(320)[:300]
    groups = similar_groups(x, rows, 40)
    assert sorted(np.concatenate(groups).tolist()) == sorted(rows.tolist())
    assert all(20 < len(g) <= 40 for g in groups)
    # a group is mostly one cluster: near rows end up together
    purity = np.mean([np.bincount(g // 40).max() / len(g) for g in groups])
    assert purity > 0.9
    assert [g.tolist() for g in similar_groups(x, rows, 40)] == [g.tolist() for g in groups]  # deterministic


@pytest.mark.parametrize("tune", ["all", "attention", "scalars"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_layers_refine_and_learn_on_the_device_as_on_the_cpu(device, tune):
    """What the layer makes itself (a missing mask, the score bias, neighbour dropout, the gradient hooks of
    tune=attention and tune=scalars) is made on the inputs' device; the refined vectors match the CPU's."""
    from app.fusion import build, param_groups

    cfg = FusionConfig(dim=32, k=4, init="retrieval", neighbour_dropout=0.5)
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 32, generator=gen), dim=-1)
    r, sc = torch.randn(6, 4, 32, generator=gen), torch.rand(6, 4, generator=gen)
    ref, model = build(cfg, 0).eval(), build(cfg, 0).to(device).eval()
    out = model.image(q.to(device), r.to(device), sc.to(device))  # mask None: made on the device
    assert out.device.type == device
    torch.testing.assert_close(out.cpu(), ref.image(q, r, sc), atol=1e-4, rtol=1e-4)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, tune, 0.05), lr=1e-2)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    q, r, sc = q.to(device), r.to(device), sc.to(device)
    loss = reco_loss(model.image(q, r, sc), model.text(q, r, sc), q, q, model.logit_scale)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())
