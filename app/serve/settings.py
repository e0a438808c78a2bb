"""The service's settings, from the environment (the same variables in every uvicorn worker process)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..settings import _at_least, _positive_int


ENV_VARS = (
    "RECO_API_TOKEN",
    "RECO_SERVE_MODELS",
    "RECO_SERVE_MAX_BATCH",
    "RECO_SERVE_MAX_WAIT_MS",
    "RECO_SERVE_MAX_ITEMS",
    "RECO_SERVE_MAX_CLASSES",
    "RECO_SERVE_MAX_TEMPLATES",
    "RECO_SERVE_MAX_K",
    "RECO_SERVE_MAX_IMAGE_BYTES",
    "RECO_SERVE_CORS_ORIGINS",
)


@dataclass(frozen=True)
class ServeSettings:
    models: tuple[str, ...] = ()  # empty: every ready model
    max_batch: int = 32  # items in one backbone batch (1 turns batching off)
    max_wait_ms: float = 5.0  # how long a batch waits for more requests once its first one arrived
    max_items: int = 64  # images or texts in one request
    max_classes: int = 1000  # class names in one classification request
    max_templates: int = 100
    max_k: int = 100  # neighbours one search may ask for
    max_image_bytes: int = 10 * 1024 * 1024
    token: str | None = field(default=None, repr=False)  # RECO_API_TOKEN: bearer token; never printed or logged
    cors_origins: tuple[str, ...] = ()  # CORS is off unless origins are named

    @classmethod
    def from_env(cls, env: dict | None = None) -> "ServeSettings":
        env = os.environ if env is None else env
        return cls(
            models=tuple(m for m in (env.get("RECO_SERVE_MODELS") or "").split(",") if m),
            max_batch=_positive_int(env, "RECO_SERVE_MAX_BATCH", 32),
            max_wait_ms=_at_least(env, "RECO_SERVE_MAX_WAIT_MS", 0.0, 5.0, example=5.0, unit=" of milliseconds"),
            max_items=_positive_int(env, "RECO_SERVE_MAX_ITEMS", 64),
            max_classes=_positive_int(env, "RECO_SERVE_MAX_CLASSES", 1000),
            max_templates=_positive_int(env, "RECO_SERVE_MAX_TEMPLATES", 100),
            max_k=_positive_int(env, "RECO_SERVE_MAX_K", 100),
            max_image_bytes=_positive_int(env, "RECO_SERVE_MAX_IMAGE_BYTES", 10 * 1024 * 1024),
            token=env.get("RECO_API_TOKEN") or None,
            cors_origins=tuple(o for o in (env.get("RECO_SERVE_CORS_ORIGINS") or "").split(",") if o),
        )

    def to_env(self) -> dict[str, str]:
        """The same settings as variables, for uvicorn's worker processes."""
        env = {"RECO_SERVE_MODELS": ",".join(self.models), "RECO_SERVE_MAX_BATCH": str(self.max_batch),
               "RECO_SERVE_MAX_WAIT_MS": str(self.max_wait_ms), "RECO_SERVE_MAX_ITEMS": str(self.max_items),
               "RECO_SERVE_MAX_CLASSES": str(self.max_classes), "RECO_SERVE_MAX_TEMPLATES": str(self.max_templates),
               "RECO_SERVE_MAX_K": str(self.max_k), "RECO_SERVE_MAX_IMAGE_BYTES": str(self.max_image_bytes),
               "RECO_SERVE_CORS_ORIGINS": ",".join(self.cors_origins)}
        if self.token:
            env["RECO_API_TOKEN"] = self.token
        return env
