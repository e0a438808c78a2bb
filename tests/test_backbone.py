"""The frozen backbone: spec parsing, identity (canonical string, fingerprint), loading and encoding, offline."""

import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from app import synthetic
from app.backbone import Backbone, BackboneSpec, pick_device, resolve_pretrained
from app.errors import RecoError

TAG = "laion2b_s34b_b79k"
# the session's tiny_backbone is loaded with device auto: CUDA where there is one. fp16 autocast on CUDA moves
# vectors by ~1e-3 between batchings; the CPU computes in float32.
DEVICE = pick_device(None)
ATOL = 1e-5 if DEVICE == "cpu" else 5e-3


def _assert_same(a, b):
    """Bit-identical on the CPU; within autocast's tolerance on CUDA (kernels may be picked per call)."""
    if DEVICE == "cpu":
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, atol=ATOL)


@pytest.fixture
def weights_file(tmp_path):
    p = tmp_path / "w.pt"
    p.write_bytes(b"\x00" * 64)
    return p


# -- parsing -------------------------------------------------------------------------------------------------------
def test_parse_bare_model_and_tag():
    s = BackboneSpec.parse("ViT-B-32")
    assert (s.model, s.tag, s.weights, s.config) == ("ViT-B-32", None, None, None)
    assert s.canonical == "ViT-B-32"
    s = BackboneSpec.parse(f"  ViT-B-32:{TAG} ")
    assert (s.model, s.tag, s.weights, s.config) == ("ViT-B-32", TAG, None, None)
    assert s.canonical == f"ViT-B-32:{TAG}"


def test_parse_model_with_weights_file(weights_file, tmp_path, monkeypatch):
    s = BackboneSpec.parse(f"ViT-B-32:{weights_file}")
    assert (s.model, s.tag, s.weights, s.config) == ("ViT-B-32", None, str(weights_file.resolve()), None)
    assert s.canonical == f"ViT-B-32:{weights_file.resolve()}"
    monkeypatch.chdir(tmp_path)  # a relative path is recorded absolute
    rel = BackboneSpec.parse("ViT-B-32:./w.pt")
    assert rel.weights == str(weights_file.resolve()) and os.path.isabs(rel.weights)
    assert rel == s
    with pytest.raises(RecoError, match=r"weights file .*missing\.pt not found"):
        BackboneSpec.parse(f"ViT-B-32:{tmp_path / 'missing.pt'}")
    with pytest.raises(RecoError, match="not found"):
        BackboneSpec.parse("ViT-B-32:gone.safetensors")  # a weights suffix makes it a path, not a tag


def test_parse_config_with_and_without_weights(tiny_config, weights_file, tmp_path):
    cfg = str(Path(tiny_config).resolve())
    s = BackboneSpec.parse(tiny_config)
    assert (s.model, s.tag, s.weights, s.config) == (None, None, None, cfg)
    assert s.canonical == cfg
    s = BackboneSpec.parse(f"{tiny_config}:{weights_file}")
    assert (s.model, s.tag, s.weights, s.config) == (None, None, str(weights_file.resolve()), cfg)
    assert s.canonical == f"{cfg}:{weights_file.resolve()}"
    assert BackboneSpec.parse(s.canonical) == s  # the canonical string parses back to the same spec
    with pytest.raises(RecoError, match="config file .*nope.json not found"):
        BackboneSpec.parse(str(tmp_path / "nope.json"))
    with pytest.raises(RecoError, match="weights file .*missing.pt not found"):
        BackboneSpec.parse(f"{tiny_config}:{tmp_path / 'missing.pt'}")


def test_parse_unknown_model_tag_and_empty_spec_are_helpful_errors():
    with pytest.raises(RecoError) as e:
        BackboneSpec.parse("ViT-Nope")
    assert "'ViT-Nope'" in str(e.value) and "list_models" in str(e.value) and ".json" in str(e.value)
    with pytest.raises(RecoError, match="ViT-Nope"):
        BackboneSpec.parse(f"ViT-Nope:{TAG}")
    with pytest.raises(RecoError) as e:
        BackboneSpec.parse("ViT-B-32:nope")
    msg = str(e.value)
    assert "'nope'" in msg and "ViT-B-32" in msg
    assert TAG in msg and "openai" in msg  # lists the known tags
    assert "/path/to/weights" in msg
    for empty in ("", "   ", None):
        with pytest.raises(RecoError, match="empty backbone spec"):
            BackboneSpec.parse(empty)


def test_bad_config_content_is_an_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(RecoError, match="embed_dim, vision_cfg and text_cfg"):
        BackboneSpec.parse(str(p)).dim
    p.write_text("{not json")
    with pytest.raises(RecoError, match="cannot read backbone config"):
        BackboneSpec.parse(str(p)).dim


def test_dim_is_read_from_the_config_without_building(tiny_config, monkeypatch):
    import open_clip

    def no_build(*a, **k):
        raise AssertionError("dim must not build a model")

    monkeypatch.setattr(open_clip, "create_model", no_build)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_build)
    assert BackboneSpec.parse("ViT-B-32").dim == 512
    assert BackboneSpec.parse(f"ViT-B-32:{TAG}").dim == 512
    assert BackboneSpec.parse(tiny_config).dim == 64


# -- fingerprint ---------------------------------------------------------------------------------------------------
def test_fingerprint_identity(tiny_config, tmp_path):
    fp = lambda s: BackboneSpec.parse(s).fingerprint  # noqa: E731
    assert fp(f"ViT-B-32:{TAG}") == fp(f"ViT-B-32:{TAG}")
    assert len(fp("ViT-B-32")) == 64
    distinct = {fp("ViT-B-32"), fp(f"ViT-B-32:{TAG}"), fp("ViT-B-32:openai"), fp("ViT-B-16"), fp("ViT-B-16:openai")}
    assert len(distinct) == 5
    # a config is identified by its content, not its path
    copy_ = tmp_path / "copy.json"
    copy_.write_text(json.dumps(json.loads(Path(tiny_config).read_text())))  # same content, other formatting
    assert fp(str(copy_)) == fp(tiny_config)
    changed = dict(synthetic.TINY_CONFIG, embed_dim=32)
    copy_.write_text(json.dumps(changed))
    assert fp(str(copy_)) != fp(tiny_config)


def test_fingerprint_follows_the_weights_file_bytes(tiny_config, tmp_path):
    w = tmp_path / "w.pt"
    w.write_bytes(b"A" * 1000)
    first = BackboneSpec.parse(f"ViT-B-32:{w}").fingerprint
    assert BackboneSpec.parse(f"ViT-B-32:{w}").fingerprint == first
    w2 = tmp_path / "w2.pt"
    w2.write_bytes(b"A" * 1000)
    assert BackboneSpec.parse(f"ViT-B-32:{w2}").fingerprint == first  # same bytes elsewhere: same space
    assert first != BackboneSpec.parse("ViT-B-32").fingerprint
    assert first != BackboneSpec.parse(f"{tiny_config}:{w}").fingerprint
    # same size, different bytes (a re-trained checkpoint of the same architecture). The hash is cached on
    # (path, mtime, size); step the mtime explicitly since some filesystems/kernels have coarse timestamps.
    st = os.stat(w)
    w.write_bytes(b"B" * 1000)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert BackboneSpec.parse(f"ViT-B-32:{w}").fingerprint != first


# -- loading and encoding ------------------------------------------------------------------------------------------
def _images(n=4):
    return [synthetic.render(*synthetic.concept(i * 9), seed=i) for i in range(n)]


TEXTS = ["a red square", "a blue circle", "a green triangle"]


def test_encode_images_and_texts_give_unit_float32(tiny_backbone):
    b = tiny_backbone
    assert b.dim == 64 and b.device == DEVICE
    assert next(b.model.parameters()).device.type == DEVICE.split(":")[0]
    img = b.encode_images(_images(5), batch_size=2)  # batching across an uneven split
    txt = b.encode_texts(TEXTS)
    for z, n in ((img, 5), (txt, 3)):
        assert z.dtype == np.float32 and z.shape == (n, 64)
        assert np.isfinite(z).all()
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    # different inputs, different vectors; same input, same vector regardless of batching
    assert np.abs(img[0] - img[1]).max() > 1e-3 and np.abs(txt[0] - txt[1]).max() > 1e-3
    np.testing.assert_allclose(b.encode_images(_images(5)[2:3]), img[2:3], atol=ATOL)
    np.testing.assert_allclose(b.encode_texts(TEXTS[::-1]), txt[::-1], atol=ATOL)
    assert b.encode_images([]).shape == (0, 64) and b.encode_texts([]).shape == (0, 64)


def test_every_entry_point_takes_cpu_tensors_whatever_the_device(tiny_backbone):
    """Preprocessed pixels and tokens are made on the CPU; each entry point moves them to the model's device."""
    b = tiny_backbone
    pixels, tokens = b.preprocess_images(_images(3)), b.tokenize(TEXTS)
    assert pixels.device.type == "cpu" and tokens.device.type == "cpu"
    np.testing.assert_allclose(b.encode_image_tensor(pixels), b.encode_images(_images(3)), atol=ATOL)
    txt = b.encode_texts(TEXTS)
    np.testing.assert_allclose(b.encode_tokens(tokens), txt, atol=ATOL)
    np.testing.assert_allclose(b.encode_tokens(tokens, batch_size=2), txt, atol=ATOL)  # an uneven split
    assert b.encode_tokens(b.tokenize(["x"])[:0]).shape == (0, 64)


def test_model_is_frozen_and_in_eval_mode(tiny_backbone):
    m = tiny_backbone.model
    params = list(m.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not m.training and not any(mod.training for mod in m.modules())


def test_random_init_is_seeded_and_leaves_the_global_rng_alone(tiny_config, tiny_backbone):
    import torch

    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    again = Backbone.load(tiny_config)
    assert torch.equal(torch.random.get_rng_state(), state)  # loading did not consume or reseed the global RNG
    assert again.model is not tiny_backbone.model
    images = _images(3)
    _assert_same(again.encode_images(images), tiny_backbone.encode_images(images))
    _assert_same(again.encode_texts(TEXTS), tiny_backbone.encode_texts(TEXTS))
    assert again.spec == tiny_backbone.spec and again.spec.fingerprint == tiny_backbone.spec.fingerprint


def test_weights_file_is_really_used(tiny_config, tiny_backbone, tmp_path):
    import torch

    perturbed = {k: (v + 0.01 if v.is_floating_point() else v).clone()
                 for k, v in tiny_backbone.model.state_dict().items()}
    w = tmp_path / "w.pt"
    torch.save(perturbed, w)
    loaded = Backbone.load(f"{tiny_config}:{w}")
    assert loaded.spec.weights == str(w.resolve())
    assert loaded.spec.fingerprint != tiny_backbone.spec.fingerprint
    assert all(not p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training

    manual_model = copy.deepcopy(tiny_backbone.model)
    manual_model.load_state_dict(perturbed)
    manual = Backbone(loaded.spec, manual_model, tiny_backbone.preprocess, tiny_backbone.tokenizer,
                      tiny_backbone.device)  # the copy lives where the original does

    images = _images(3)
    for encode in (lambda b: b.encode_images(images), lambda b: b.encode_texts(TEXTS)):
        got, rand, want = encode(loaded), encode(tiny_backbone), encode(manual)
        assert np.abs(got - rand).max() > 1e-3
        np.testing.assert_allclose(got, want, atol=ATOL)


def test_weights_file_that_does_not_fit_is_an_error(tiny_config, tmp_path):
    import torch

    w = tmp_path / "other.pt"
    torch.save({"not_a_clip_param": torch.zeros(3)}, w)
    with pytest.raises(RecoError, match="cannot build backbone"):
        Backbone.load(f"{tiny_config}:{w}")


# -- offline -------------------------------------------------------------------------------------------------------
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No weights in any cache: HOME and the Hugging Face cache point at empty temp dirs."""
    import huggingface_hub.constants as hf_constants
    import open_clip  # noqa: F401  (imported before any timing starts)

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads HF_HOME at import time; its cache path constant is what lookups use
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    return tmp_path


def _no_network(monkeypatch):
    import socket

    import app.backbone as bb

    def refuse(*a, **k):
        raise AssertionError("the network must not be touched when offline")

    monkeypatch.setattr(bb, "hub_reachable", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _assert_offline_message(msg, model="ViT-B-32", tag=TAG):
    assert f"{model}:{tag}" in msg
    assert "offline" in msg and "/path/to/weights" in msg


def test_load_tag_offline_fails_fast_with_instructions(empty_caches, monkeypatch):
    _no_network(monkeypatch)
    import huggingface_hub.constants as hf_constants

    start = time.monotonic()
    with pytest.raises(RecoError) as e:
        Backbone.load(f"ViT-B-32:{TAG}", offline="1")
    assert time.monotonic() - start < 2.0
    _assert_offline_message(str(e.value))
    assert hf_constants.HF_HUB_OFFLINE is False  # the temporary offline switch is restored


def test_resolve_pretrained_auto_respects_hf_hub_offline(empty_caches, monkeypatch):
    _no_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model, tag in (("ViT-B-32", TAG), ("ViT-B-32", "openai")):
        start = time.monotonic()
        with pytest.raises(RecoError) as e:
            resolve_pretrained(model, tag, "auto")
        assert time.monotonic() - start < 2.0
        _assert_offline_message(str(e.value), model, tag)


def test_resolve_pretrained_offline_finds_cached_weights(empty_caches, monkeypatch):
    """Weights already in the Hugging Face cache are used offline, without the network."""
    import open_clip

    _no_network(monkeypatch)
    hub = open_clip.get_pretrained_cfg("ViT-B-32", TAG)["hf_hub"]
    repo = Path(empty_caches / "hf" / "hub" / ("models--" + hub.strip("/").replace("/", "--")))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        (snap / name).write_bytes(b"weights")
    start = time.monotonic()
    path = resolve_pretrained("ViT-B-32", TAG, "1")
    assert time.monotonic() - start < 2.0
    assert Path(path).parent == snap and Path(path).read_bytes() == b"weights"


def test_registry_read_without_torch_matches_open_clip():
    """Names, configs and the pretrained table come from open_clip's own files, read without importing it."""
    import open_clip

    from app import openclip_registry as reg

    assert set(reg.model_names()) == {m for m in open_clip.list_models() if not m.startswith("reco-")}
    assert reg.model_config("ViT-B-32") == open_clip.get_model_config("ViT-B-32")
    for model, tag in open_clip.list_pretrained():
        assert reg.pretrained_cfg(model, tag) == open_clip.get_pretrained_cfg(model, tag), (model, tag)
    assert reg.pretrained_tags("ViT-B-32") == open_clip.list_pretrained_tags_by_model("ViT-B-32")
    assert reg.pretrained_cfg("ViT-B-32", "nope") == {}


def test_cached_weights_prefer_safetensors_as_open_clip_does(empty_caches):
    from app import openclip_registry as reg

    cfg = reg.pretrained_cfg("ViT-B-32", TAG)
    repo = Path(empty_caches / "hf" / "hub" / ("models--" + cfg["hf_hub"].strip("/").replace("/", "--")))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    assert reg.cached_weights(cfg) is None
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"bin")
    assert Path(reg.cached_weights(cfg)).name == "open_clip_pytorch_model.bin"
    (snap / "open_clip_model.safetensors").write_bytes(b"safe")
    assert Path(reg.cached_weights(cfg)).name == "open_clip_model.safetensors"
