"""open_clip's model names, configs and pretrained-weight table, read without importing torch.

`import open_clip` imports torch (3-8 s). A mistyped backbone or weights missing offline must fail in well under
2 s, so this reads open_clip's own files: the JSON configs in `model_configs/`, and `pretrained.py` executed under
a private package name with safetensors' torch bridge hidden. Where that ever fails (a new open_clip layout), it
falls back to importing open_clip: slower, same answers.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types
from functools import lru_cache
from pathlib import Path

_PRIVATE = "_reco_open_clip_registry"
_REQUIRED = ("embed_dim", "vision_cfg", "text_cfg")


@lru_cache(maxsize=1)
def _package_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def _configs() -> dict[str, dict]:
    out = {}
    for path in sorted((_package_dir() / "model_configs").glob("*.json")):
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if all(k in cfg for k in _REQUIRED):
            out[path.stem] = cfg
    return out


def model_names() -> list[str]:
    """The architectures `open_clip.list_models()` lists out of the box."""
    return list(_configs())


def model_config(name: str) -> dict | None:
    return _configs().get(name)


@lru_cache(maxsize=1)
def _pretrained_module():
    try:
        package = types.ModuleType(_PRIVATE)
        package.__path__ = [str(_package_dir())]  # a bare package: open_clip/__init__.py (and torch) never run
        sys.modules[_PRIVATE] = package
        hidden = {name: sys.modules.get(name) for name in ("safetensors.torch",)}
        sys.modules["safetensors.torch"] = None  # makes `import safetensors.torch` raise ImportError in there
        try:
            return importlib.import_module(f"{_PRIVATE}.pretrained")
        finally:
            for name, module in hidden.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
    except Exception:  # pragma: no cover - only on an open_clip whose layout changed
        import open_clip.pretrained

        return open_clip.pretrained


def pretrained_cfg(model: str, tag: str) -> dict:
    """open_clip's entry for MODEL:TAG ({} when unknown): hf_hub id, url, file, preprocessing."""
    return _pretrained_module().get_pretrained_cfg(model, tag) or {}


def pretrained_tags(model: str) -> list[str]:
    return list(_pretrained_module().list_pretrained_tags_by_model(model))


def cached_weights(cfg: dict) -> str | None:
    """The local file open_clip would load for this pretrained entry without the network, or None.

    Mirrors `open_clip.pretrained.download_pretrained`: the Hugging Face cache (the safetensors file first, as
    open_clip prefers it), else the URL's file in ~/.cache/clip.
    """
    if cfg.get("file"):
        return cfg["file"] if Path(cfg["file"]).is_file() else None
    module = _pretrained_module()
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        model_id, filename = os.path.split(cfg["hf_hub"])
        filename = filename or module.HF_WEIGHTS_NAME
        for candidate in [*module._get_safe_alternatives(filename), filename]:
            found = try_to_load_from_cache(model_id, candidate)
            if isinstance(found, str):
                return found
        return None
    if cfg.get("url"):
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        return str(cached) if cached.is_file() else None
    return None
