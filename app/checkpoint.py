"""Checkpoints as safetensors + JSON: nothing is unpickled, and the JSON records the tensors' sha256, so a
truncated or tampered file is refused with a clear error instead of loading garbage."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import RecoError


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(directory: Path, stem: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write STEM.safetensors then STEM.json (the JSON last: a checkpoint exists once its JSON does)."""
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    _atomic_write(directory / f"{stem}.safetensors", blob)
    meta = {**meta, "sha256": hashlib.sha256(blob).hexdigest()}
    _atomic_write(directory / f"{stem}.json", json.dumps(meta, indent=1, default=str).encode())


def remove(directory: Path, stem: str) -> None:
    """Delete a checkpoint if it is there (the JSON first: without it the checkpoint no longer exists)."""
    for suffix in (".json", ".safetensors"):
        (directory / f"{stem}{suffix}").unlink(missing_ok=True)


def exists(directory: Path, stem: str) -> bool:
    return (directory / f"{stem}.json").is_file() and (directory / f"{stem}.safetensors").is_file()


def load(directory: Path, stem: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load as st_load

    jpath, tpath = directory / f"{stem}.json", directory / f"{stem}.safetensors"
    if not jpath.is_file() or not tpath.is_file():
        raise RecoError(f"checkpoint {directory / stem} is missing ({jpath.name} and {tpath.name} are needed)")
    try:
        meta = json.loads(jpath.read_text())
    except ValueError as exc:
        raise RecoError(f"checkpoint metadata {jpath} is not valid JSON: {exc}") from exc
    blob = tpath.read_bytes()
    if meta.get("sha256") != hashlib.sha256(blob).hexdigest():
        raise RecoError(f"checkpoint {tpath} does not match the checksum in {jpath.name}: corrupt or tampered; "
                        "retrain or restore it from a backup")
    try:
        tensors = st_load(blob)
    except Exception as exc:
        raise RecoError(f"checkpoint {tpath} cannot be read as safetensors: {exc}") from exc
    return tensors, meta
