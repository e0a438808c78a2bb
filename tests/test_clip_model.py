"""The drop-in model: CLIP_benchmark's own evaluation code, run on it, computes what `reco eval` computes.

Device-aware: `reco eval` runs where the runtime says (CUDA when present), so the parity tests put the drop-in
model on that device too and hand CLIP_benchmark the model's device; the default suite passes on the CPU and
with RECO_DEVICE=cuda on a GPU."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from app import synthetic
from app.backbone import pick_device
from app.build import build_in_process
from app.clip_model import create_model_and_transforms, get_tokenizer
from app.errors import RecoError
from app.evaluate import evaluate_classification, evaluate_retrieval
from app.train import TrainConfig, create_job, run_training

JITTER = 0.3
CONCEPTS = [synthetic.concept(i) for i in range(32)]


@pytest.fixture
def trained(rt, tmp_path, tiny_config):
    synthetic.write_wds(tmp_path / "mem", 4, 64, seed=1, jitter=JITTER)
    build_in_process(rt, "mem", str(tmp_path / "mem"), backbone=tiny_config, activate=True)
    create_job(rt, "m", "mem", "mem", TrainConfig(k=10, epochs=8, batch_size=64, lr=3e-3, dedup_threshold=None,
                                                  val_by="item", checkpoint_every=1000))
    run_training(rt, "m", progress=False)
    return rt


def _device(rt) -> str:
    """Where the product encodes in this runtime (`reco eval`, RecoEncoder.load): the drop-in model goes there."""
    return pick_device(rt.settings.device)


def _clip_benchmark_classification(model, tokenizer, root, classnames, templates):
    """CLIP_benchmark's zero_shot_classifier + run_classification; its `accuracy` helper fails under NumPy 2, so
    top-k is its formula in torch and the balanced accuracy sklearn's, as its `evaluate` reports them."""
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from sklearn.metrics import balanced_accuracy_score
    from torchvision.datasets import ImageFolder

    _, _, preprocess = model
    ds = ImageFolder(str(root), transform=preprocess)
    loader = torch.utils.data.DataLoader(ds, batch_size=10, shuffle=False)
    device = str(model[0].device)
    clf = zero_shot_classifier(model[0], tokenizer, classnames, templates, device, amp=False)
    logits, target = run_classification(model[0], clf, loader, device, amp=False)
    top = logits.topk(5, 1, True, True)[1]
    return {"acc1": float((top[:, :1] == target[:, None]).any(1).float().mean()),
            "acc5": float((top == target[:, None]).any(1).float().mean()),
            "mean_per_class_recall": float(balanced_accuracy_score(target.numpy(), logits.argmax(1).numpy()))}


def test_classification_parity_with_clip_benchmark(trained, tmp_path):
    root = synthetic.write_imagefolder(tmp_path / "eval", per_class=2, seed=500_000, jitter=JITTER)
    run = evaluate_classification(trained, "m", f"imagefolder:{root / 'images'}", ks=[10],
                                  classnames=str(root / "classnames.txt"), guard=False)
    model = create_model_and_transforms("reco:m", runtime=trained, device=_device(trained))
    tokenizer = get_tokenizer("reco:m", runtime=trained)
    reco = _clip_benchmark_classification(model, tokenizer, root / "images", run["classnames"], run["templates"])
    model[0].image_retrieval = model[0].text_retrieval = False  # the frozen backbone
    base = _clip_benchmark_classification(model, tokenizer, root / "images", run["classnames"], run["templates"])
    assert base == run["baseline"]
    assert reco == run["reco"]["10"]
    assert reco["acc1"] > base["acc1"]  # the comparison is not between two copies of one number


def test_retrieval_parity_with_clip_benchmark(trained, tmp_path):
    from clip_benchmark.metrics.zeroshot_retrieval import evaluate as cb_retrieval
    from PIL import Image

    images, entries = tmp_path / "kp" / "images", []
    images.mkdir(parents=True)
    for i in range(24):
        c, s = CONCEPTS[i]
        synthetic.render(c, s, seed=700_000 + i, jitter=JITTER).save(images / f"{i}.png")
        entries.append({"filepath": "images", "filename": f"{i}.png", "split": "test",
                        "sentences": [{"raw": f"a {c} {s}"}, {"raw": f"the {c} {s} shape"}]})
    (tmp_path / "kp" / "dataset_toy.json").write_text(json.dumps({"images": entries}))
    run = evaluate_retrieval(trained, "m", f"karpathy:{tmp_path / 'kp' / 'dataset_toy.json'}", ks=[10],
                             retrieval="both", guard=False)
    model, _, preprocess = create_model_and_transforms("reco:m", runtime=trained, device=_device(trained))
    tokenizer = get_tokenizer("reco:m", runtime=trained)
    pairs = [(preprocess(Image.open(images / e["filename"]).convert("RGB")), [s["raw"] for s in e["sentences"]])
             for e in entries]
    loader = torch.utils.data.DataLoader(pairs, batch_size=8, collate_fn=lambda b: (torch.stack([x for x, _ in b]),
                                                                                    [t for _, t in b]))

    def ours_as_theirs(m):
        return {f"image_retrieval_recall@{k}": m[f"text_to_image_R@{k}"] for k in (1, 5, 10)} | {
            f"text_retrieval_recall@{k}": m[f"image_to_text_R@{k}"] for k in (1, 5, 10)}

    theirs = cb_retrieval(model, loader, tokenizer, str(model.device), amp=False, recall_k_list=[1, 5, 10])
    assert theirs == pytest.approx(ours_as_theirs(run["reco"]["10"]), abs=1e-7)
    model.image_retrieval = model.text_retrieval = False
    theirs = cb_retrieval(model, loader, tokenizer, str(model.device), amp=False, recall_k_list=[1, 5, 10])
    assert theirs == pytest.approx(ours_as_theirs(run["baseline"]), abs=1e-7)


def test_the_drop_in_model_behaves_as_an_open_clip_model(trained):
    from app.encoder import RecoEncoder

    device = _device(trained)
    model, train_tf, preprocess = create_model_and_transforms("reco:m", runtime=trained, device=device)
    tokenizer = get_tokenizer("reco:m", runtime=trained)
    assert model.device.type == torch.device(device).type
    assert isinstance(model, torch.nn.Module) and not model.training
    model.train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    enc = RecoEncoder.load("m", runtime=trained)
    images = [synthetic.render(c, s, seed=9 + i, jitter=JITTER) for i, (c, s) in enumerate(CONCEPTS[:3])]
    for n in (1, 3):  # batches of any size, from the CPU whatever the model's device (open_clip users move them)
        x = torch.stack([preprocess(im) for im in images[:n]])
        out = model.encode_image(x)
        assert out.device == model.device  # returned where the model is, as open_clip returns them
        np.testing.assert_allclose(out.cpu().numpy(), enc.encode_image(images[:n]), atol=1e-5)
    texts = ["a red circle", "a blue square"]
    np.testing.assert_allclose(model.encode_text(tokenizer(texts)).cpu().numpy(), enc.encode_text(texts), atol=1e-5)
    img, txt, scale = model(torch.stack([preprocess(images[0])]), tokenizer(texts))
    assert img.shape == (1, 64) and txt.shape == (2, 64) and float(scale) == pytest.approx(float(model.logit_scale.exp()))
    assert torch.allclose(img.norm(dim=-1).cpu(), torch.ones(1), atol=1e-5)
    assert train_tf is not preprocess
    with pytest.raises(RecoError, match="use 'reco:MODEL'"):
        create_model_and_transforms("m", runtime=trained)


# -- devices, as open_clip places them -----------------------------------------------------------------------------
def test_the_drop_in_model_is_on_the_cpu_by_default_whatever_reco_device_says(trained, monkeypatch):
    """open_clip.create_model's device defaults to the CPU; RECO_DEVICE is the product's setting, not the drop-in's."""
    from app.clip_model import create_model

    monkeypatch.setattr(trained, "settings", dataclasses.replace(trained.settings, device="cuda"))
    model = create_model("reco:m", runtime=trained)
    assert model.device == torch.device("cpu") and model.encoder.device == "cpu"
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.encode_text(get_tokenizer("reco:m", runtime=trained)(["a red circle"])).device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RecoError, match="no CUDA device is available here; use device='cpu'"):
            create_model("reco:m", runtime=trained, device="cuda")
    with pytest.raises(RecoError, match="not a torch device"):
        create_model("reco:m", runtime=trained, device="gpu0")


def test_get_tokenizer_builds_no_tower(trained, monkeypatch):
    import app.backbone

    model, _, _ = create_model_and_transforms("reco:m", runtime=trained)
    texts = ["a red circle", "a blue square"]
    expected = model.encoder.backbone.tokenizer(texts)

    def no_tower(*a, **k):
        raise AssertionError("get_tokenizer built a tower")

    monkeypatch.setattr(app.backbone.Backbone, "load", no_tower)
    monkeypatch.setattr(trained, "settings", dataclasses.replace(trained.settings, device="cuda"))
    assert torch.equal(get_tokenizer("reco:m", runtime=trained)(texts), expected)


def test_moving_one_model_moves_its_encoder_and_no_other(trained):
    """`.to()` after creation: the tower and fusion layers move, the retrieval follows, and each model has a tower
    of its own (as open_clip.create_model builds one per call). On the CPU the other device is 'meta' (shapes, no
    data): the tower takes the CPU batch there, and only the copy of its output back to the host has nothing to
    copy. Under CUDA the next test does the same for real."""
    from app.clip_model import create_model
    from app.encoder import RecoEncoder

    a, b = create_model("reco:m", runtime=trained), create_model("reco:m", runtime=trained)
    _, _, preprocess = create_model_and_transforms("reco:m", runtime=trained)
    x = torch.stack([preprocess(synthetic.render(*CONCEPTS[0], seed=1, jitter=JITTER))])
    before = b.encode_image(x)
    assert a.to("meta") is a and a.device.type == "meta"
    assert all(p.device.type == "meta" for p in a.fusion.parameters())
    seen = []
    tower = a.clip.encode_image

    def watch(image, normalize=False):
        out = tower(image, normalize=normalize)
        seen.append((image.device.type, out.device.type, tuple(out.shape)))
        return out

    a.clip.encode_image = watch
    with pytest.raises(NotImplementedError, match="meta"):
        a.encode_image(x)  # a CPU batch: moved to the model's device, not refused by torch
    assert seen == [("meta", "meta", (1, 64))] and a.encoder.device == "meta"
    assert b.device.type == "cpu" and torch.allclose(b.encode_image(x), before, atol=1e-6)  # b's tower did not move
    enc = RecoEncoder.load("m", runtime=trained, device="cpu")  # nor the process-wide one
    assert next(enc.backbone.model.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inputs_on_another_device_are_moved_to_the_model(trained):
    from app.clip_model import create_model

    _, _, preprocess = create_model_and_transforms("reco:m", runtime=trained)
    tokenizer = get_tokenizer("reco:m", runtime=trained)
    x = torch.stack([preprocess(synthetic.render(c, s, seed=3, jitter=JITTER)) for c, s in CONCEPTS[:4]])
    tokens = tokenizer(["a red circle", "a blue square"])
    on_cpu = create_model("reco:m", runtime=trained)
    ref_i, ref_t = on_cpu.encode_image(x), on_cpu.encode_text(tokens)
    on_gpu = create_model("reco:m", runtime=trained, device="cuda")
    for model in (on_gpu, on_cpu.to("cuda")):  # created there, or moved there after creation
        assert model.device.type == "cuda"
        for inp in (x, x.cuda()):
            out = model.encode_image(inp)
            assert out.device.type == "cuda"
            # float16 autocast on CUDA (as the product encodes there) against float32 on the CPU
            assert torch.nn.functional.cosine_similarity(out.cpu(), ref_i).min() > 0.99
        out = model.encode_text(tokens)
        assert out.device.type == "cuda" and model.encoder.device.startswith("cuda")
        assert torch.nn.functional.cosine_similarity(out.cpu(), ref_t).min() > 0.99
    back = create_model("reco:m", runtime=trained)
    assert back.encode_image(x.cuda()).device.type == "cpu"  # a CUDA batch into a CPU model: moved to the CPU


# -- model bundles -------------------------------------------------------------------------------------------------
def test_export_import_evaluate_gives_identical_metrics(trained, tmp_path, cli_run, tiny_config):
    root = synthetic.write_imagefolder(tmp_path / "eval", per_class=2, seed=500_000, jitter=JITTER)
    ds = f"imagefolder:{root / 'images'}"
    before = evaluate_classification(trained, "m", ds, ks=[10], classnames=str(root / "classnames.txt"))
    cli_run("model", "export", "m", tmp_path / "bundle")
    files = sorted(p.name for p in (tmp_path / "bundle").iterdir())
    assert files == ["README.md", "SHA256SUMS", "checkpoint.json", "config.json", "model.safetensors"]
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert "untrained start" in card and f"| {before['run']} | zeroshot_classification" in card
    cfg = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert (cfg["k"], cfg["memory"], cfg["dim"]) == (10, {"name": "mem", "version": 1}, 64)
    r = cli_run("model", "import", tmp_path / "bundle", "--as", "m2")
    assert "model m2 imported, retrieving from memory mem" in r.output
    after = evaluate_classification(trained, "m2", ds, ks=[10], classnames=str(root / "classnames.txt"))
    assert after["reco"] == before["reco"] and after["baseline"] == before["baseline"]


@pytest.mark.parametrize("damage, says", [
    ("weights", "model.safetensors does not match its sum"),
    ("missing", "checkpoint.json is missing"),
    ("sums", "not a model bundle"),
])
def test_a_tampered_bundle_is_refused(trained, tmp_path, cli_run, damage, says):
    cli_run("model", "export", "m", tmp_path / "b")
    b = tmp_path / "b"
    if damage == "weights":
        data = bytearray((b / "model.safetensors").read_bytes())
        data[-3] ^= 0x01
        (b / "model.safetensors").write_bytes(bytes(data))
    elif damage == "missing":
        (b / "checkpoint.json").unlink()
    else:
        (b / "SHA256SUMS").unlink()
    r = cli_run("model", "import", b, "--as", "m3", ok=False)
    assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output
    assert "m3" not in cli_run("model", "list").output


def test_a_bundle_pointed_at_a_memory_of_another_backbone_is_refused(trained, tmp_path, cli_run, tiny_config):
    cli_run("model", "export", "m", tmp_path / "b")
    other = tmp_path / "other.json"
    cfg = json.loads(open(tiny_config).read())
    cfg["text_cfg"]["layers"] += 1
    other.write_text(json.dumps(cfg))
    synthetic.write_wds(tmp_path / "o", 1, 8, seed=3, jitter=JITTER)
    build_in_process(trained, "theirs", str(tmp_path / "o"), backbone=str(other))
    r = cli_run("model", "import", tmp_path / "b", "--as", "m4", "--memory", "theirs", ok=False)
    assert r.exit_code == 1 and "point --memory at a memory of the model's backbone" in r.output
    r = cli_run("model", "import", tmp_path / "b", "--as", "m4", "--memory", "nowhere", ok=False)
    assert r.exit_code == 1 and "no memory named 'nowhere' here" in r.output
    r = cli_run("model", "import", tmp_path / "b", ok=False)  # the name is taken
    assert r.exit_code == 1 and "a model named 'm' exists" in r.output
