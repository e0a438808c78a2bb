"""The frozen backbone: any open_clip model, encoding images and texts to L2-normalised float32.

Spec strings (`--backbone`):
  MODEL:TAG                      open_clip pretrained tag, e.g. ViT-B-32:laion2b_s34b_b79k
  MODEL:/path/weights            a local weights file for an open_clip architecture
  MODEL                          random weights (seeded, so every process builds the same model): tests, benchmarks
  /path/config.json[:/path/w]    a custom open_clip model config (embed_dim, vision_cfg, text_cfg), optional weights
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from . import openclip_registry
from .errors import RecoError

RANDOM_SEED = 0
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _looks_like_path(s: str) -> bool:
    return "/" in s or os.sep in s or s.startswith(".") or s.endswith(WEIGHT_SUFFIXES) or Path(s).exists()


def hash_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MB blocks (weights, export parts: files larger than one wants in RAM)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=64)
def _sha256(path: str, _mtime: float, _size: int) -> str:
    return hash_file(path)


def file_sha256(path: str | Path) -> str:
    st = os.stat(path)
    return _sha256(str(path), st.st_mtime, st.st_size)


@dataclass(frozen=True)
class BackboneSpec:
    """A parsed `--backbone` string. `canonical` and `fingerprint` are what a memory version records."""

    model: str | None = None  # open_clip architecture name (None for a custom config)
    tag: str | None = None  # pretrained tag
    weights: str | None = None  # local weights file
    config: str | None = None  # custom config JSON

    @classmethod
    def parse(cls, spec: str) -> "BackboneSpec":
        spec = (spec or "").strip()
        if not spec:
            raise RecoError("empty backbone spec: use MODEL, MODEL:TAG, MODEL:/path/weights or /path/config.json")
        if ".json" in spec and (spec.endswith(".json") or ".json:" in spec):
            cut = spec.index(".json") + len(".json")
            config, weights = spec[:cut], spec[cut + 1 :] or None
            if not Path(config).is_file():
                raise RecoError(f"backbone config file {config} not found")
            if weights and not Path(weights).is_file():
                raise RecoError(f"backbone weights file {weights} not found")
            return cls(config=str(Path(config).resolve()), weights=str(Path(weights).resolve()) if weights else None)
        model, _, rest = spec.partition(":")
        _check_model_name(model)
        if not rest:
            return cls(model=model)
        if _looks_like_path(rest):
            if not Path(rest).is_file():
                raise RecoError(f"backbone weights file {rest} not found")
            return cls(model=model, weights=str(Path(rest).resolve()))
        if not openclip_registry.pretrained_cfg(model, rest):
            tags = openclip_registry.pretrained_tags(model)
            raise RecoError(
                f"unknown pretrained tag {rest!r} for {model}; known tags: {', '.join(tags) or 'none'}"
                " (or pass MODEL:/path/to/weights)"
            )
        return cls(model=model, tag=rest)

    @property
    def canonical(self) -> str:
        if self.config:
            return self.config + (f":{self.weights}" if self.weights else "")
        return self.model + (f":{self.tag}" if self.tag else f":{self.weights}" if self.weights else "")

    @property
    def fingerprint(self) -> str:
        """Identity of the embedding space: architecture (or config content) + weights (tag, file hash or seed)."""
        parts = []
        if self.config:
            parts.append("config:" + hashlib.sha256(_canonical_json(self.model_config())).hexdigest())
        else:
            parts.append("model:" + self.model)
        if self.tag:
            parts.append("tag:" + self.tag)
        elif self.weights:
            parts.append("weights:" + file_sha256(self.weights))
        else:
            parts.append(f"random:{RANDOM_SEED}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def model_config(self) -> dict:
        if self.config:
            try:
                cfg = json.loads(Path(self.config).read_text())
            except (OSError, ValueError) as exc:
                raise RecoError(f"cannot read backbone config {self.config}: {exc}") from exc
            if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                raise RecoError(f"backbone config {self.config} needs the keys embed_dim, vision_cfg and text_cfg")
            return cfg
        return copy.deepcopy(openclip_registry.model_config(self.model))

    @property
    def dim(self) -> int:
        """Embedding dimension, read from the config without building the model."""
        return int(self.model_config()["embed_dim"])


def _canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _check_model_name(model: str) -> None:
    if model not in openclip_registry.model_names():
        raise RecoError(
            f"unknown backbone {model!r}: not an open_clip model name (list them with "
            "`python -c 'import open_clip; print(open_clip.list_models())'`) nor a config .json path"
        )


# -- weights resolution, fast offline --------------------------------------------------------------------
def hub_reachable(timeout: float = 1.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def is_offline(setting: str = "auto") -> bool:
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    return not hub_reachable()


def resolve_pretrained(model: str, tag: str, offline_setting: str = "auto") -> str:
    """Local path of the weights for MODEL:TAG: from the local caches, else downloaded (when online).

    huggingface_hub retries for most of a minute when the network is absent; we look in the caches first (without
    importing torch or touching the network), and only go to the network when it answers within a second.
    """
    cfg = openclip_registry.pretrained_cfg(model, tag)
    cached = openclip_registry.cached_weights(cfg)
    if cached:
        return cached
    if is_offline(offline_setting):
        raise RecoError(
            f"pretrained weights {model}:{tag} are not in the local cache and the model hub cannot be reached "
            f"(offline). Download them once on a connected machine (python -c \"import open_clip; "
            f"open_clip.create_model('{model}', pretrained='{tag}')\") and copy the Hugging Face cache "
            f"(~/.cache/huggingface) here, or pass the file directly: --backbone {model}:/path/to/weights"
        )
    from open_clip.pretrained import download_pretrained

    return download_pretrained(cfg)


# -- the model ---------------------------------------------------------------------------------------------
def pick_device(requested: str | None = None) -> str:
    import torch

    if requested and requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise RecoError(f"RECO_DEVICE={requested} but no CUDA device is available; use cpu")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


class Backbone:
    """A frozen open_clip model: eval mode, no gradients, batched encoding, autocast on CUDA."""

    def __init__(self, spec: BackboneSpec, model, preprocess, tokenizer, device: str):
        self.spec = spec
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.dim = spec.dim

    @classmethod
    def load(cls, spec: str | BackboneSpec, device: str | None = None, offline: str = "auto") -> "Backbone":
        spec = BackboneSpec.parse(spec) if isinstance(spec, str) else spec
        pretrained = spec.weights
        if spec.tag:  # before torch is imported: weights missing offline fail in well under 2 s
            pretrained = resolve_pretrained(spec.model, spec.tag, offline)
        import open_clip
        import torch

        device = pick_device(device)
        name = _register_config(spec) if spec.config else spec.model
        with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
            torch.manual_seed(RANDOM_SEED)  # random-weight backbones are identical in every process
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, device=device
                )
            except RecoError:
                raise
            except Exception as exc:
                raise RecoError(f"cannot build backbone {spec.canonical}: {exc}") from exc
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        tokenizer = open_clip.get_tokenizer(name)
        return cls(spec, model, preprocess, tokenizer, device)

    def _autocast(self):
        import contextlib

        import torch

        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def preprocess_images(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        import torch

        return torch.stack([self.preprocess(im) for im in images])

    def _on_device(self, x):
        """Every entry point moves its input here, so a CPU tensor never meets CUDA weights. Towards CUDA the copy
        is asynchronous from page-locked memory (ingestion pins its batches); the other way it must not be."""
        return x.to(self.device, non_blocking=str(self.device).startswith("cuda"))

    def encode_image_tensor(self, pixels) -> np.ndarray:
        import torch

        with torch.inference_mode(), self._autocast():
            z = self.model.encode_image(self._on_device(pixels), normalize=True)
        return _to_unit_f32(z)

    def encode_images(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        out = [self.encode_image_tensor(self.preprocess_images(images[i : i + batch_size]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def tokenize(self, texts: Sequence[str]) -> "torch.Tensor":  # noqa: F821
        """Token ids on the CPU (ingestion tokenizes ahead, off the device's critical path)."""
        return self.tokenizer(list(texts))

    def encode_tokens(self, tokens, batch_size: int | None = None) -> np.ndarray:
        """Encode pre-tokenized captions (`tokenize`'s output), batch_size rows per call (None: all at once)."""
        import torch

        step = batch_size or max(1, len(tokens))
        out = []
        for i in range(0, len(tokens), step):
            with torch.inference_mode(), self._autocast():
                out.append(_to_unit_f32(self.model.encode_text(self._on_device(tokens[i : i + step]),
                                                               normalize=True)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = [self.encode_tokens(self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextmanager
def _quiet_random_init_warning():
    """open_clip warns when no weights are loaded; for a bare MODEL spec that is the point."""
    f = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def _to_unit_f32(z) -> np.ndarray:
    z = z.float().cpu().numpy()
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return z.astype(np.float32, copy=False)


_register_lock = threading.Lock()


def _register_config(spec: BackboneSpec) -> str:
    """Register a custom config with open_clip under a content-derived name (two configs never collide)."""
    import tempfile

    import open_clip

    cfg = spec.model_config()
    name = f"reco-{Path(spec.config).stem}-{hashlib.sha256(_canonical_json(cfg)).hexdigest()[:12]}"
    with _register_lock:
        if name not in open_clip.list_models():
            d = Path(tempfile.gettempdir()) / "reco-model-configs"
            d.mkdir(exist_ok=True)
            path = d / f"{name}.json"
            path.write_text(json.dumps(cfg))
            open_clip.add_model_config(path)
    return name


_cache: dict[tuple, Backbone] = {}
_cache_lock = threading.Lock()


def get_backbone(spec: str, device: str | None = None, offline: str = "auto") -> Backbone:
    """Process-wide cache: a worker loads each backbone once, not once per shard."""
    key = (spec, device)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = Backbone.load(spec, device=device, offline=offline)
        return _cache[key]
