"""Zero-shot evaluation: classifier and baseline against open_clip, the leakage guard, runs, reports."""

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from app import synthetic
from app.build import build_in_process
from app.errors import NotFound, RecoError
from app.evaluate import evaluate_classification, evaluate_retrieval, load_run
from app.metrics import zero_shot_weights
from tests.conftest import JITTER

CONCEPTS = [synthetic.concept(i) for i in range(32)]


def build(rt, name, src, backbone, activate=True):
    return build_in_process(rt, name, src, backbone=backbone, activate=activate)


def test_classifier_and_baseline_equal_open_clip(rt, trained, tiny_backbone):
    from open_clip import build_zero_shot_classifier

    ds_spec = f"imagefolder:{trained['data']}"
    run = evaluate_classification(rt, "m", ds_spec, ks=[1, 5, 10], classnames=trained["classnames"])
    names, templates = run["classnames"], run["templates"]
    ours = zero_shot_weights(tiny_backbone.encode_texts([t.format(c=c) for c in names for t in templates]),
                             len(names), len(templates))
    theirs = build_zero_shot_classifier(tiny_backbone.model, tiny_backbone.tokenizer, names,
                                        [lambda c, t=t: t.format(c=c) for t in templates],
                                        device=tiny_backbone.device).float().cpu()
    np.testing.assert_allclose(ours, theirs.T.numpy(), atol=1e-5 if tiny_backbone.device == "cpu" else 5e-3)

    # the baseline, computed directly with open_clip on the same images
    from PIL import Image

    files = sorted(trained["data"].rglob("*.png"))
    labels = torch.tensor([int(f.parent.name[:2]) for f in files])
    with torch.no_grad():
        x = torch.stack([tiny_backbone.preprocess(Image.open(f).convert("RGB")) for f in files])
        feats = tiny_backbone.model.encode_image(x.to(tiny_backbone.device), normalize=True).float().cpu()
        top1 = float(((feats @ theirs).argmax(1) == labels).float().mean())
    assert run["baseline"]["acc1"] == pytest.approx(top1, abs=1e-6)
    assert set(run["reco"]) == {"1", "5", "10"}
    assert all(0 <= run["reco"][k]["acc1"] <= run["reco"][k]["acc5"] <= 1 for k in run["reco"])


def _memory_with_copies(rt, tmp_path, data: Path, tiny_config):
    """A memory holding the evaluation images (as stored, and re-encoded as JPEG at another size) and other
    vendors' drawings of the same concepts."""
    import tarfile

    from PIL import Image

    files = sorted(data.rglob("*.png"))
    with tarfile.open(tmp_path / "copies.tar", "w") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for i, f in enumerate(files):
            c, s = CONCEPTS[int(f.parent.name[:2])]
            add(f"same{i:04d}.png", f.read_bytes())
            add(f"same{i:04d}.txt", f"a {c} {s}".encode())
            buf = io.BytesIO()
            Image.open(f).convert("RGB").resize((96, 96)).save(buf, "JPEG", quality=80)
            add(f"jpeg{i:04d}.jpg", buf.getvalue())
            add(f"jpeg{i:04d}.txt", f"a {c} {s}".encode())
            for vendor in (2, 3):
                other = synthetic.render(c, s, seed=500_000 + 100 * int(f.parent.name[:2]) + int(f.stem),
                                         jitter=JITTER, vendor=vendor)
                add(f"vend{vendor}{i:04d}.png", synthetic.png_bytes(other))
                add(f"vend{vendor}{i:04d}.txt", f"a {c} {s}".encode())
    (tmp_path / "leak").mkdir()
    shutil.move(tmp_path / "copies.tar", tmp_path / "leak" / "00000.tar")
    build(rt, "leaky", tmp_path / "leak", tiny_config)
    return len(files)


def test_leakage_guard_excludes_copies_but_not_other_drawings(rt, trained, tmp_path, tiny_config):
    n = _memory_with_copies(rt, tmp_path, trained["data"], tiny_config)
    spec = f"imagefolder:{trained['data']}"
    on = evaluate_classification(rt, "m", spec, memory="leaky", ks=[10], classnames=trained["classnames"])
    off = evaluate_classification(rt, "m", spec, memory="leaky", ks=[10], classnames=trained["classnames"],
                                  guard=False)

    def kinds(run):
        return [{Path(nb["src"]["member"]).stem[:4] for nb in d["neighbours"]} for d in run["details"]]

    missed = {f"{kind}{i:04d}" for i in range(n) for kind in ("same", "jpeg")} - set(on["leakage_guard"]["excluded_keys"])
    assert not missed, (missed, on["leakage_guard"])
    assert on["leakage_guard"]["excluded_items"] == 2 * n  # each image as stored and as a JPEG
    assert sorted({k[:4] for k in on["leakage_guard"]["excluded_keys"]}) == ["jpeg", "same"]  # never a vendor's
    assert all(not ({"same", "jpeg"} & k) for k in kinds(on))  # no copy is ever retrieved
    assert all({"vend"} & k for k in kinds(on))  # other vendors' drawings of the same concept still are
    assert sum(bool({"same", "jpeg"} & k) for k in kinds(off)) == n  # without the guard the copies come back
    assert off["leakage_guard"]["excluded_items"] == 0


def test_run_is_stored_listed_compared_plotted_and_gallery_renders(rt, trained, cli_run, tmp_path):
    r = cli_run("eval", "classification", "--model", "m", "--dataset", f"imagefolder:{trained['data']}",
                "--classnames", trained["classnames"], "-k", "1,3,10")
    assert "frozen baseline" in r.stdout and "RECO k=10 (both)" in r.stdout
    runs = json.loads(cli_run("eval", "list", "--json").stdout)
    assert len(runs) == 1 and runs[0]["k"] == [1, 3, 10] and runs[0]["memory"] == "mem@1"
    result = json.loads(Path(runs[0]["result"]).read_text())
    assert result["task"] == "zeroshot_classification" and result["metrics"] == result["reco"]["10"]
    assert set(result["timing_per_item_s"]) == {"encode", "search", "fuse", "rank"} and len(result["dataset_hash"]) == 64
    cmp = cli_run("eval", "compare", str(runs[0]["run"])).stdout
    assert cmp.count("RECO k=") == 3
    pngs = cli_run("eval", "plot", str(runs[0]["run"]), "--out", tmp_path / "plots").stdout.split()
    assert [Path(p).name for p in pngs] == ["accuracy_vs_k.png", "baseline_vs_reco.png"]
    assert all(Path(p).stat().st_size > 5000 for p in pngs)
    page = Path(cli_run("eval", "gallery", str(runs[0]["run"]), "--out", tmp_path / "g.html").stdout.strip())
    text = page.read_text()
    assert text.count("<tr>") == 65 and "data:image/png;base64," in text and "src=\"http" not in text
    _check_in_chromium(page, tmp_path)


def _check_in_chromium(page: Path, tmp_path: Path) -> None:
    """Open the gallery in headless Chromium: every <img> decoded, and the screenshot is not blank."""
    from tests.browser import chromium as find_chromium

    chromium = find_chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome'}"]
    check = page.with_name("check.html")
    check.write_text(page.read_text().replace(
        "</body>", "<script>window.onload=()=>{const i=[...document.images];document.title="
                   "'loaded '+i.filter(x=>x.complete&&x.naturalWidth>0).length+' of '+i.length;}</script></body>"))
    dom = subprocess.run([chromium, *flags, "--dump-dom", check.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    import re

    m = re.search(r"<title>loaded (\d+) of (\d+)</title>", dom)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) > 64, dom[:500]
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and (pixels < 200).mean() > 0.02  # text and pictures, not a blank page


def test_retrieval_eval_on_a_karpathy_split(rt, trained, tmp_path):
    images, entries = tmp_path / "kp" / "images", []
    images.mkdir(parents=True)
    for i in range(16):
        c, s = CONCEPTS[i]
        synthetic.render(c, s, seed=700_000 + i, jitter=JITTER).save(images / f"{i}.png")
        entries.append({"filepath": "images", "filename": f"{i}.png", "split": "test",
                        "sentences": [{"raw": f"a {c} {s}"}, {"raw": f"the {c} {s} shape"}]})
    entries.append({"filepath": "images", "filename": "0.png", "split": "train", "sentences": [{"raw": "x"}]})
    (tmp_path / "kp" / "dataset_toy.json").write_text(json.dumps({"images": entries}))
    run = evaluate_retrieval(rt, "m", f"karpathy:{tmp_path / 'kp' / 'dataset_toy.json'}", ks=[10])
    assert run["n_images"] == 16 and run["n_captions"] == 32
    for side in ("baseline", ):
        assert set(run[side]) >= {"image_to_text_R@1", "text_to_image_R@10"}
    assert run["reco"]["10"]["text_to_image_R@1"] >= run["baseline"]["text_to_image_R@1"]


def test_bad_inputs(rt, trained, tmp_path, tiny_config):
    with pytest.raises(RecoError, match="not found"):
        evaluate_classification(rt, "m", f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "few.txt").write_text("one\ntwo\n")
    with pytest.raises(RecoError, match="2 class names but .* 32 class folders"):
        evaluate_classification(rt, "m", f"imagefolder:{trained['data']}", classnames=str(tmp_path / "few.txt"))
    (trained["data"] / "99_empty").mkdir()
    with pytest.raises(RecoError, match="has no images"):
        evaluate_classification(rt, "m", f"imagefolder:{trained['data']}")
    (trained["data"] / "99_empty").rmdir()
    bad = sorted(trained["data"].rglob("*.png"))[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    run = evaluate_classification(rt, "m", f"imagefolder:{trained['data']}", classnames=trained["classnames"])
    assert run["skipped"] == {"corrupt_image": 1} and run["n_images"] == 63
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**synthetic.TINY_CONFIG, "vision_cfg": {**synthetic.TINY_CONFIG["vision_cfg"],
                                                                        "layers": 1}}))
    synthetic.write_wds(tmp_path / "o", 1, 16, seed=3)
    build(rt, "othermem", tmp_path / "o", str(other))
    with pytest.raises(RecoError, match="must share the backbone"):
        evaluate_classification(rt, "m", f"imagefolder:{trained['data']}", memory="othermem")
    with pytest.raises(NotFound, match="no evaluation run 999"):
        load_run(rt, 999)
    with pytest.raises(RecoError, match="larger than the model's k"):
        evaluate_classification(rt, "m", f"imagefolder:{trained['data']}", ks=[50])
