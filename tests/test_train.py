"""Training end to end on the embedded profile, resumption, inference, and every bad input.

Device-aware: training runs where the runtime picks (cuda when present), so tensors a model holds are compared after
`.cpu()` and inputs built here are moved to the model's device."""

import json
import uuid

import numpy as np
import pytest
import torch

from app import synthetic
from app.backbone import get_backbone
from app.build import build_in_process, run_in_process, start_build
from app.encoder import RecoEncoder
from app.errors import NotFound, RecoError
from app.train import NeighbourCache, TrainConfig, create_job, load_pairs, run_training

JITTER = 0.3  # drawings of a concept vary enough that only retrieval, not the random backbone, can name them


def build(rt, name, src, backbone, activate=True):
    return build_in_process(rt, name, src, backbone=backbone, activate=activate)


@pytest.fixture
def memory(rt, tmp_path, tiny_config):
    synthetic.write_wds(tmp_path / "mem", 4, 64, seed=1, jitter=JITTER)
    build(rt, "mem", tmp_path / "mem", tiny_config)
    return "mem"


def cfg(**kw):
    base = dict(k=10, epochs=60, batch_size=64, lr=3e-3, dedup_threshold=None, checkpoint_every=1000, val_by="item")
    base.update(kw)
    return TrainConfig(**base)


def zero_shot(enc, refine_img, refine_txt, n=64):
    """Top-1 over the 32 concept prompts for n held-out drawings (never in the memory)."""
    concepts = [synthetic.concept(i) for i in range(32)]
    images = [synthetic.render(c, s, seed=900_000 + i, jitter=JITTER) for i, (c, s) in
              enumerate(synthetic.concept(i) for i in range(n))]
    labels = np.arange(n) % 32
    v = enc.encode_image(images, refine=False)
    t = enc.encode_text([f"a picture of a {c} {s}." for c, s in concepts], refine=False)
    v = enc.refine(v, "image") if refine_img else v
    t = enc.refine(t, "text") if refine_txt else t
    return float(((v @ t.T).argmax(1) == labels).mean())


def test_training_learns_to_use_the_memory(rt, memory, tiny_config, monkeypatch):
    backbone = get_backbone(tiny_config)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    calls = {"search": 0, "scan": 0}
    for method in calls:
        real = getattr(rt.store, method)

        def counting(*a, _real=real, _m=method, **kw):
            calls[_m] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(rt.store, method, counting)

    create_job(rt, "m", "mem", "mem", cfg())
    metrics = run_training(rt, "m", progress=False)
    # one batched query per side for 256 pairs, over 60 epochs, and one more for the text side's rows whose equal
    # scores run past the hits fetched (the captions come eight alike: the run is fetched whole, in id order)
    assert calls == {"search": 3, "scan": 1}
    assert metrics["store_queries"] == 2

    history = json.loads((rt.settings.home / "models" / "m" / "last.json").read_text())["history"]
    assert history[0]["step"] == 0 and history[0]["train_loss"] is None  # the starting point is validated too
    losses = [h["train_loss"] for h in history[1:]]
    assert losses[-1] < losses[0] - 1.0  # the loss falls

    enc = RecoEncoder.load("m", runtime=rt)
    assert not any(p.requires_grad for p in enc.fusion.parameters())
    assert not any(p.requires_grad for p in backbone.model.parameters())
    baseline, reco = zero_shot(enc, False, False), zero_shot(enc, True, True)
    assert reco >= baseline + 0.15, (baseline, reco)  # measured: 0.03 -> 0.22
    for k, v in backbone.model.state_dict().items():  # the backbone is bit-identical after training
        assert torch.equal(v, before[k]), k

    # a second model on the same pairs, memory and modes: neighbours and pairs come from the cache
    before_rerun = dict(calls)
    create_job(rt, "m2", "mem", "mem", cfg(epochs=2, lr=1e-3))
    assert run_training(rt, "m2", progress=False)["store_queries"] == 0
    assert calls == before_rerun


def test_no_pair_retrieves_itself_or_a_near_duplicate(rt, memory):
    c = cfg(epochs=1, dedup_threshold=0.98)
    create_job(rt, "d", "mem", "mem", c)
    run_training(rt, "d", progress=False)
    with rt.db.session() as s:
        from app.db.models import FusionModel

        job = s.query(FusionModel).filter_by(name="d").one().config["job"]
    pairs = load_pairs(rt, job["pairs"][2], job["pairs"][3])
    nbrs = NeighbourCache(rt, job, c, 64).get(pairs)
    for side in ("image", "text"):
        nb = nbrs[side]
        for i, pid in enumerate(pairs.ids):
            got = {nb.ids[j] for j, m in zip(nb.idx[i], nb.mask[i]) if m}
            assert pid not in got
            assert (nb.scores[i][nb.mask[i]] <= 0.98).all()
        assert nb.mask.any()


def test_a_killed_job_resumes_from_its_last_checkpoint(rt, memory):
    c = cfg(epochs=4, checkpoint_every=3, neighbour_dropout=0.2)
    create_job(rt, "ref", "mem", "mem", c)
    run_training(rt, "ref", progress=False)

    create_job(rt, "crash", "mem", "mem", c)

    def die(step):
        if step == 8:
            raise KeyboardInterrupt  # the process dies between checkpoints (step 6 was the last)

    with pytest.raises(KeyboardInterrupt):
        run_training(rt, "crash", progress=False, on_step=die)
    create_job(rt, "crash", "mem", "mem", c)  # the same command again
    metrics = run_training(rt, "crash", progress=False)
    assert metrics["resumed_from"] == 6 and metrics["steps"] == 12  # 230 train pairs / 64 = 3 steps x 4 epochs
    from app.checkpoint import load

    a, _ = load(rt.settings.home / "models" / "ref", "last")
    b, _ = load(rt.settings.home / "models" / "crash", "last")
    for key in a:
        if key.startswith("model."):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)  # the same run, interrupted or not


def test_activating_another_version_changes_outputs_without_reload(rt, memory, tmp_path, tiny_config):
    create_job(rt, "m", "mem", "mem", cfg(epochs=10))
    run_training(rt, "m", progress=False)
    follows = RecoEncoder.load("m", runtime=rt)
    pinned = RecoEncoder.load("m", memory="mem@1", runtime=rt)
    v = follows.encode_image([synthetic.render("red", "circle", seed=5, jitter=JITTER)], refine=False)
    a, p1 = follows.refine(v, "image"), pinned.refine(v, "image")
    synthetic.write_wds(tmp_path / "v2", 2, 16, seed=7, jitter=1.0, prefix="x")
    build(rt, "mem", tmp_path / "v2", tiny_config, activate=True)
    b, p2 = follows.refine(v, "image"), pinned.refine(v, "image")
    assert not np.allclose(a, b)
    np.testing.assert_allclose(p1, p2, atol=1e-6)
    follows.image_retrieval = False
    np.testing.assert_allclose(follows.encode_image([synthetic.render("red", "circle", seed=5, jitter=JITTER)]), v,
                               atol=1e-6)


def test_train_cli_and_model_commands(cli_run, rt, memory):
    r = cli_run("train", "cli-m", "--pairs", "mem", "--memory", "mem@1", "-k", "5", "--epochs", "2",
                "--batch-size", "64", "--val-by", "concept", "--val-fraction", "0.25")
    assert "cli-m ready: 6 steps" in r.output
    listed = json.loads(cli_run("model", "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["cli-m"]
    shown = json.loads(cli_run("model", "show", "cli-m", "--json").stdout)
    assert shown["memory"] == "mem" and shown["trained_with_memory_version"] == 1 and shown["pairs"] == "mem@1"
    assert shown["train"]["k"] == 5 and shown["metrics"]["val_pairs"] == 64  # 8 of 32 concepts, 8 items each
    r = cli_run("train", "cli-m", "--pairs", "mem", "--memory", "mem", ok=False)
    assert r.exit_code == 1 and "already exists" in r.output
    cli_run("model", "delete", "cli-m")
    assert json.loads(cli_run("model", "list", "--json").stdout) == []
    r = cli_run("model", "show", "nope", ok=False)
    assert r.exit_code == 1 and "no model named 'nope'" in r.output


def test_validation_on_another_memorys_pairs(rt, memory, tmp_path, tiny_config, cli_run):
    """--val-pairs: every training pair trains, and the checkpoint is chosen on the other memory's pairs."""
    synthetic.write_wds(tmp_path / "val", 1, 32, seed=2, jitter=JITTER, prefix="v")
    build(rt, "val", tmp_path / "val", tiny_config)
    create_job(rt, "vp", "mem", "mem", cfg(epochs=3, val_pairs="val"))
    metrics = run_training(rt, "vp", progress=False)
    assert metrics["train_pairs"] == 256 and metrics["val_pairs"] == 32
    with rt.db.session() as s:
        from app.db.models import FusionModel

        job = s.query(FusionModel).filter_by(name="vp").one().config["job"]
    assert job["val_pairs"][0] == "val" and job["train"]["val_pairs"] == "val"
    val = load_pairs(rt, job["val_pairs"][2], job["val_pairs"][3])
    frozen = float(((val.image @ val.text.T).argmax(1) == np.arange(32)).mean())
    from app.checkpoint import load

    _, meta = load(rt.settings.home / "models" / "vp", "last")
    assert meta["history"][0]["step"] == 0
    assert meta["history"][0]["val"]["baseline_acc"] == pytest.approx(frozen)  # measured on the val memory
    assert metrics["best"]["step"] in [h["step"] for h in meta["history"]]

    cli_run("train", "vp-cli", "--pairs", "mem", "--memory", "mem", "--epochs", "1", "--batch-size", "64",
            "--val-pairs", "val@1")
    shown = json.loads(cli_run("model", "show", "vp-cli", "--json").stdout)
    assert shown["train"]["val_pairs"] == "val@1" and shown["metrics"]["val_pairs"] == 32

    with pytest.raises(RecoError, match="names the training pairs"):
        create_job(rt, "vp2", "mem", "mem", cfg(val_pairs="mem"))
    with pytest.raises(NotFound):
        create_job(rt, "vp2", "mem", "mem", cfg(val_pairs="nope"))


def test_select_1se_picks_the_earliest_checkpoint_within_one_standard_error():
    from app.train import select_1se

    def hist(accs):
        return [{"step": 5 * i, "val": {"acc": a} if a is not None else {}} for i, a in enumerate(accs)]

    # best 0.47 over 240 pairs: one standard error is 0.032, so 0.44 and up qualify; the earliest of them wins
    pick, keep = select_1se(hist([0.30, 0.40, 0.46, 0.47, 0.45, None, 0.43]), 240)
    assert pick["step"] == 10 and keep == {10, 15, 20}
    # with many validation pairs the error is small and the rule approaches the best checkpoint
    assert select_1se(hist([0.30, 0.40, 0.46, 0.47, 0.45]), 1_000_000)[0]["step"] == 15
    # a worse checkpoint after the best changes nothing: its file can go, the pick stays
    pick, keep = select_1se(hist([0.40, 0.47, 0.05]), 240)
    assert pick["step"] == 5 and keep == {5}


@pytest.mark.parametrize("rule", ["1se", "best", "last"])
def test_the_selected_checkpoint_is_the_one_inference_loads(rt, memory, rule):
    from app.checkpoint import load
    from app.train import select_1se

    create_job(rt, rule, "mem", "mem", cfg(epochs=6, checkpoint_every=1, select=rule))
    metrics = run_training(rt, rule, progress=False)
    ckdir = rt.settings.home / "models" / rule
    _, last = load(ckdir, "last")
    validated = [h for h in last["history"] if h["val"]]
    top = max(validated, key=lambda h: h["val"]["acc"])
    expected = {"1se": lambda: select_1se(last["history"], metrics["val_pairs"])[0], "best": lambda: top,
                "last": lambda: last["history"][-1]}[rule]()
    best = metrics["best"]
    assert best["step"] == expected["step"] and best["rule"] == rule
    if rule == "1se":
        assert best["top"] == top["step"] and best["step"] <= top["step"]
    tensors, meta = load(ckdir, "best")
    assert meta["step"] == best["step"]
    enc = RecoEncoder.load(rule, runtime=rt, load_backbone=False)
    for key, value in enc.fusion.state_dict().items():
        torch.testing.assert_close(value.cpu(), tensors[key])
    assert not list(ckdir.glob("cand-*"))  # the candidates are gone once training ends
    with pytest.raises(RecoError, match="--select must be one of"):
        cfg(select="median").check()


def test_untrained_start_is_printed_stored_and_can_be_evaluated(cli_run, rt, memory):
    """Users see at once whether training beat the same layers untrained, and can evaluate that start."""
    from app.checkpoint import load
    from app.fusion import FusionConfig, build

    r = cli_run("train", "st", "--pairs", "mem", "--memory", "mem", "-k", "5", "--epochs", "4", "--batch-size", "64",
                "--val-by", "concept", "--val-fraction", "0.25")
    shown = json.loads(cli_run("model", "show", "st", "--json").stdout)
    _, last = load(rt.settings.home / "models" / "st", "last")
    start, pick = shown["metrics"]["start"], shown["metrics"]["best"]["val"]
    assert start == last["history"][0]["val"] and last["history"][0]["step"] == 0
    line = f"val in-batch acc {pick['acc']:.3f}, untrained start {start['acc']:.3f} ({pick['acc'] - start['acc']:+.3f}"
    assert line in r.output and line in cli_run("model", "show", "st").output
    assert f"{pick['acc']:.3f} ({start['acc']:.3f} / {pick['baseline_acc']:.3f})" in cli_run("model", "list").output

    tensors, meta = load(rt.settings.home / "models" / "st", "best")
    untrained = RecoEncoder.load("st", runtime=rt, load_backbone=False, checkpoint="start")
    fresh = build(FusionConfig(**meta["fusion"]), 0)
    for key, value in untrained.fusion.state_dict().items():
        torch.testing.assert_close(value.cpu(), fresh.state_dict()[key])
    assert any(not torch.equal(v.cpu(), tensors[k]) for k, v in untrained.fusion.state_dict().items())  # it trained
    with pytest.raises(RecoError, match="checkpoint must be one of"):
        RecoEncoder.load("st", runtime=rt, load_backbone=False, checkpoint="last")


def test_query_noise_and_retrieval_off_options(cli_run, rt, memory):
    from app.train import _forward

    cli_run("train", "off", "--pairs", "mem", "--memory", "mem", "-k", "5", "--epochs", "2", "--batch-size", "64",
            "--no-retrieval", "--query-noise", "0.5")
    shown = json.loads(cli_run("model", "show", "off", "--json").stdout)
    assert shown["train"]["retrieval"] is False and shown["train"]["query_noise"] == 0.5
    enc = RecoEncoder.load("off", runtime=rt, load_backbone=False)
    dev, d = enc.device, enc.info["dim"]  # the layers sit on the runtime's device: so must what is fed to them
    q = np.random.default_rng(0).standard_normal((4, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    alone = enc.fusion.image(torch.from_numpy(q).to(dev), torch.zeros(4, 5, d, device=dev),
                             torch.zeros(4, 5, device=dev), torch.zeros(4, 5, dtype=torch.bool, device=dev))
    np.testing.assert_allclose(enc.refine(q, "image"), alone.cpu().numpy(), atol=1e-6)  # the memory changes nothing

    # noise reaches only what the layers refine; the loss compares with the clean frozen embeddings
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(3, d), dim=-1).to(dev)
    nb = (torch.zeros(3, 5, d, device=dev), torch.zeros(3, 5, device=dev),
          torch.zeros(3, 5, dtype=torch.bool, device=dev))
    clean = _forward(enc.fusion, (v, v, nb, nb))
    noisy = _forward(enc.fusion, (v, v, nb, nb), query_noise=0.5)
    assert torch.equal(noisy[2], v) and torch.equal(noisy[3], v)
    assert not torch.allclose(noisy[0], clean[0])
    with pytest.raises(RecoError, match="query-noise"):
        cfg(query_noise=-1).check()


def test_validation_accuracy_is_not_swung_by_a_short_last_batch():
    """259 validation rows at batch 256: two batches of ~130, not 256 + 3 (a batch of 3 is nearly always right)."""
    from app.fusion import FusionConfig, RecoFusion
    from app.train import Pairs, SideNeighbours, evaluate

    rng = np.random.default_rng(0)
    n, d = 259, 8
    img = rng.standard_normal((n, d)).astype(np.float32)
    txt = img + 2.0 * rng.standard_normal((n, d)).astype(np.float32)  # weakly aligned: low in-batch accuracy
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    pairs = Pairs([str(i) for i in range(n)], [f"c{i}" for i in range(n)], img, txt)
    side = SideNeighbours(np.zeros((n, 1), np.int32), np.zeros((n, 1), np.float32), np.zeros((n, 1), bool),
                          np.zeros((1, d), np.float32))
    model = RecoFusion(FusionConfig(dim=d, k=1, heads=1, init="identity"))  # refined = frozen
    got = evaluate(model, pairs, {"image": side, "text": side}, np.arange(n), 256, "cpu")

    def acc(rows):
        return float(((img[rows] @ txt[rows].T).argmax(1) == np.arange(len(rows))).mean())

    expected = (130 * acc(np.arange(130)) + 129 * acc(np.arange(130, n))) / n
    assert got["baseline_acc"] == pytest.approx(expected, abs=1e-6)
    assert got["acc"] == pytest.approx(expected, abs=1e-6)
    assert got["acc"] < (acc(np.arange(256)) + acc(np.arange(256, n))) / 2 - 0.1  # what the old mean reported


def test_bad_inputs(rt, memory, tmp_path, tiny_config):
    other_cfg = tmp_path / "other.json"
    other_cfg.write_text(json.dumps({**synthetic.TINY_CONFIG, "vision_cfg": {**synthetic.TINY_CONFIG["vision_cfg"],
                                                                            "layers": 1}}))
    synthetic.write_wds(tmp_path / "o", 1, 16, seed=3)
    build(rt, "other", tmp_path / "o", str(other_cfg))
    with pytest.raises(RecoError, match="same backbone"):
        create_job(rt, "x", "other", "mem", cfg())
    with pytest.raises(RecoError, match="larger than memory"):
        create_job(rt, "x", "mem", "mem", cfg(k=1000))
    import tarfile

    (tmp_path / "empty").mkdir()
    with tarfile.open(tmp_path / "empty" / "00000.tar", "w"):
        pass
    v = start_build(rt, "broken", str(tmp_path / "empty"), backbone=tiny_config)
    run_in_process(rt, v.id, show_progress=False)
    with pytest.raises(RecoError, match="not ready"):
        create_job(rt, "x", "mem", "broken@1", cfg())
    with pytest.raises(NotFound):
        RecoEncoder.load("nope", runtime=rt)
    with pytest.raises(RecoError, match="invalid model name"):
        create_job(rt, "Bad Name", "mem", "mem", cfg())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(rt, memory, monkeypatch):
    import app.fusion

    real = app.fusion.LOSSES["reco"]
    seen = {"n": 0}

    def poisoned(*a):
        loss = real(*a)
        if torch.is_grad_enabled():  # training steps, not validation
            seen["n"] += 1
            if seen["n"] >= 6:
                return loss * float("nan")
        return loss

    monkeypatch.setitem(app.fusion.LOSSES, "reco", poisoned)
    create_job(rt, "nan", "mem", "mem", cfg(epochs=3, checkpoint_every=4))
    with pytest.raises(RecoError, match="non-finite at step 6 .*step 4"):
        run_training(rt, "nan", progress=False)
    from app.checkpoint import load
    from app.db.models import FusionModel

    _, meta = load(rt.settings.home / "models" / "nan", "last")
    assert meta["step"] == 4
    with rt.db.session() as s:
        row = s.query(FusionModel).filter_by(name="nan").one()
        assert row.status == "failed" and "non-finite" in row.error


@pytest.mark.parametrize("damage", ["flip", "truncate", "json"])
def test_corrupt_or_tampered_checkpoint_is_refused(rt, memory, damage):
    create_job(rt, "c", "mem", "mem", cfg(epochs=1))
    run_training(rt, "c", progress=False)
    d = rt.settings.home / "models" / "c"
    blob = bytearray((d / "best.safetensors").read_bytes())
    if damage == "flip":
        blob[-3] ^= 0xFF
        (d / "best.safetensors").write_bytes(bytes(blob))
    elif damage == "truncate":
        (d / "best.safetensors").write_bytes(bytes(blob[: len(blob) // 2]))
    else:
        (d / "best.json").write_text("{not json")
    with pytest.raises(RecoError, match="corrupt or tampered|not valid JSON"):
        RecoEncoder.load("c", runtime=rt)


# -- device speed: one permutation per epoch, resident data, RNG state, precision --------------------------
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_each_epoch_draws_one_permutation_and_a_resumed_epoch_gets_the_same_order(monkeypatch):
    import app.train
    from app.train import StepRows, epoch_order, similar_groups

    calls = []
    monkeypatch.setattr(app.train, "epoch_order", lambda *a: calls.append(a) or epoch_order(*a))
    train_rows = np.sort(np.random.default_rng(0).choice(1000, 256, replace=False))  # rows are not 0..n-1
    rows_at = StepRows(train_rows, 64, 4, seed=3)
    steps = [np.asarray(rows_at(s)) for s in range(12)]
    assert [c[1] for c in calls] == [0, 1, 2]  # one draw per epoch, none per step
    for e in range(3):
        epoch = np.concatenate(steps[4 * e : 4 * e + 4])
        assert sorted(epoch) == list(train_rows)  # the steps of an epoch: exactly one permutation of the rows
        np.testing.assert_array_equal(epoch, train_rows[epoch_order(3, e, 256)])  # a function of (seed, epoch)
    assert not np.array_equal(steps[0], steps[4])
    resumed = StepRows(train_rows, 64, 4, seed=3)  # a job resumed mid-epoch 1
    for s in (6, 7, 8):
        np.testing.assert_array_equal(resumed(s), steps[s])

    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    groups = similar_groups(x, np.arange(300), 64)
    calls.clear()
    by_group = StepRows(np.arange(300), 64, len(groups), seed=0, groups=groups)
    picked = [by_group(s) for s in range(2 * len(groups))]
    assert len(calls) == 2
    for e in range(2):
        got = picked[e * len(groups) : (e + 1) * len(groups)]
        assert sorted(int(g[0]) for g in got) == sorted(int(g[0]) for g in groups)  # each group once an epoch


def test_training_draws_one_permutation_per_epoch(rt, memory, monkeypatch):
    import app.train

    calls = []
    real = app.train.epoch_order
    monkeypatch.setattr(app.train, "epoch_order", lambda *a: calls.append(a[1]) or real(*a))
    create_job(rt, "perm", "mem", "mem", cfg(epochs=3))
    assert run_training(rt, "perm", progress=False)["steps"] == 9  # 3 steps an epoch
    assert calls == [0, 1, 2]


def _toy_data(n=50, k=3, d=8, u=30, seed=0):
    from app.train import Pairs, SideNeighbours

    rng = np.random.default_rng(seed)
    pairs = Pairs([str(i) for i in range(n)], [f"c{i}" for i in range(n)],
                  rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32))
    nbrs = {side: SideNeighbours(rng.integers(0, u, (n, k)).astype(np.int32), rng.random((n, k), np.float32),
                                 rng.random((n, k)) > 0.3, rng.standard_normal((u, d)).astype(np.float32))
            for side in ("image", "text")}
    return pairs, nbrs


def _host_batch(pairs, nbrs, rows):
    """The batch as training built it before the data was resident: gathered in numpy, then copied."""
    def t(x, dtype=torch.float32):
        return torch.as_tensor(x, dtype=dtype)

    ni, nt = nbrs["image"], nbrs["text"]
    return (t(pairs.image[rows]), t(pairs.text[rows]),
            (t(ni.table[ni.idx[rows]]), t(ni.scores[rows]), t(ni.mask[rows], torch.bool)),
            (t(nt.table[nt.idx[rows]]), t(nt.scores[rows]), t(nt.mask[rows], torch.bool)))


def _flat(batch):
    return [y for x in batch for y in (x if isinstance(x, tuple) else (x,))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["device", "host"])
def test_resident_batches_equal_the_host_gathered_ones_exactly(device, where):
    from app.train import place_data

    pairs, nbrs = _toy_data()
    data = place_data(pairs, nbrs, device, where=where)
    assert data.resident == (where == "device")
    for i, rows in enumerate([np.array([3, 0, 49, 7]), np.random.default_rng(1).permutation(50)[:17]]):
        want = _flat(_host_batch(pairs, nbrs, rows))
        if i:  # copied ahead, as the training loop does for host data on CUDA
            data.prefetch(rows, key=i)
        got = _flat(data.batch(data.index(rows), key=i))
        assert all(g.device.type == torch.device(device).type for g in got)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g.cpu(), w)
    if device == "cpu":  # on the CPU the arrays are used in place, not copied
        assert data.image.data_ptr() == pairs.image.ctypes.data
        assert data.sides["image"][3].data_ptr() == nbrs["image"].table.ctypes.data


def test_data_goes_to_the_device_only_when_it_fits(monkeypatch):
    from app.train import FIT_SHARE, _fits, _host_tensors

    pairs, nbrs = _toy_data()
    image, text, sides = _host_tensors(pairs, nbrs)
    need = sum(x.nbytes for x in (image, text, *(x for p in sides.values() for x in p)))
    for free, fits in ((need / FIT_SHARE + 1000 + 10, True), (need / FIT_SHARE + 1000 - 10, False)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (int(free), 1 << 40))
        assert _fits(image, text, sides, "cuda", reserve=1000) is fits


def test_rng_state_round_trips_through_a_checkpoint(tmp_path, monkeypatch):
    from app import checkpoint
    from app.train import rng_state, set_rng_state

    def round_trip(device):
        checkpoint.save(tmp_path, "r", {"model.w": torch.zeros(1), **rng_state(device)}, {})
        first = torch.rand(4)
        tensors, _ = checkpoint.load(tmp_path, "r")
        set_rng_state(tensors)
        assert torch.equal(torch.rand(4), first)
        return tensors

    assert set(round_trip("cpu")) == {"model.w", "rng"}

    # the CUDA part, on a stand-in for two devices (the real one below, where present)
    gens = [torch.Generator().manual_seed(i) for i in (1, 2)]
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [g.get_state() for g in gens])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [g.set_state(s) for g, s in zip(gens, states)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    state = rng_state("cuda:1")
    assert set(state) == {"rng", "rng.cuda.0", "rng.cuda.1"}
    drawn = [torch.rand(3, generator=g) for g in gens]
    set_rng_state(state)
    assert all(torch.equal(torch.rand(3, generator=g), d) for g, d in zip(gens, drawn))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_rng_state_round_trip():
    from app.train import rng_state, set_rng_state

    state = rng_state("cuda")
    first = torch.rand(4, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), first)


def test_bf16_trains_and_is_recorded_and_tf32_is_undone(cli_run, rt, memory):
    cli_run("train", "bf", "--pairs", "mem", "--memory", "mem", "-k", "5", "--epochs", "2", "--batch-size", "64",
            "--precision", "bf16", "--device", "cpu")
    shown = json.loads(cli_run("model", "show", "bf", "--json").stdout)
    assert shown["train"]["precision"] == "bf16" and shown["metrics"]["steps"] == 6
    assert np.isfinite(shown["metrics"]["final"]["train_loss"])

    before = torch.get_float32_matmul_precision()
    during = []
    create_job(rt, "tf", "mem", "mem", cfg(epochs=1, precision="tf32"))
    run_training(rt, "tf", progress=False, on_step=lambda s: during.append(torch.get_float32_matmul_precision()))
    assert set(during) == {"high"} and torch.get_float32_matmul_precision() == before  # for the run only


def test_bad_precision_is_refused_with_one_line(cli_run, memory):
    with pytest.raises(RecoError, match=r"^--precision must be one of fp32, tf32, bf16, not 'fp16'$"):
        cfg(precision="fp16").check()
    r = cli_run("train", "x", "--pairs", "mem", "--memory", "mem", "--precision", "fp16", ok=False)
    assert r.exit_code == 1 and "'fp16' is not one of" in r.output and r.output.count("\n") == 1


def test_shard_batching_trains_each_batch_within_one_source_shard(rt, memory, monkeypatch):
    """`reco train --batching shard`: every step's batch holds pairs of one source shard only (in chunks of at most
    --batch-size), and every training pair is seen once an epoch."""
    import app.train

    steps = []
    real = app.train.TrainData.batch
    monkeypatch.setattr(app.train.TrainData, "batch",
                        lambda self, rows, key=None: steps.append(np.asarray(rows).copy()) or real(self, rows, key))
    create_job(rt, "by-shard", "mem", "mem", cfg(epochs=2, batch_size=40, batching="shard", val_fraction=0))
    m = run_training(rt, "by-shard", progress=False)
    with rt.db.session() as s:
        job = s.query(app.train.FusionModel).filter_by(name="by-shard").one().config["job"]
    pairs = app.train.load_pairs(rt, job["pairs"][2], job["pairs"][3])
    assert len(set(pairs.shards)) == 4
    assert m["steps"] == 2 * 4 * 2 == len(steps)  # 4 shards of 64 pairs, each in 2 chunks of 32
    for batch in steps:
        assert len({pairs.shards[i] for i in batch}) == 1 and 2 <= len(batch) <= 40
    assert sorted(np.concatenate(steps[:8]).tolist()) == list(range(256))
