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
    "RECO_SERVE_MAX_IMAGE_PIXELS",
    "RECO_SERVE_MAX_TEXT_CHARS",
    "RECO_SERVE_MAX_PROMPTS",
    "RECO_SERVE_MAX_BODY_BYTES",
    "RECO_SERVE_BODY_TIMEOUT_S",
    "RECO_SERVE_KEEP_ALIVE_S",
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
    # work budgets: each bounds what one request can make the model thread (or the decoder) do
    max_image_pixels: int = 40_000_000  # width x height of one image, checked before it is decoded
    max_text_chars: int = 4096  # one text, class name or template (the tokenizer keeps ~77 tokens anyway)
    max_prompts: int = 10_000  # classes x templates of one classification (each prompt is one text to encode)
    max_body_bytes: int | None = None  # None: what max_items images of max_image_bytes take in base64, + 1 MiB
    body_timeout_s: float = 60.0  # time to receive a request's whole body (slow senders get a 408)
    keep_alive_s: float = 5.0  # uvicorn closes a connection idle this long between requests
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
            max_image_pixels=_positive_int(env, "RECO_SERVE_MAX_IMAGE_PIXELS", 40_000_000),
            max_text_chars=_positive_int(env, "RECO_SERVE_MAX_TEXT_CHARS", 4096),
            max_prompts=_positive_int(env, "RECO_SERVE_MAX_PROMPTS", 10_000),
            max_body_bytes=_positive_int(env, "RECO_SERVE_MAX_BODY_BYTES", 0) or None,
            body_timeout_s=_at_least(env, "RECO_SERVE_BODY_TIMEOUT_S", 0.001, 60.0, example=60, unit=" of seconds"),
            keep_alive_s=_at_least(env, "RECO_SERVE_KEEP_ALIVE_S", 0.001, 5.0, example=5, unit=" of seconds"),
            token=env.get("RECO_API_TOKEN") or None,
            cors_origins=tuple(o for o in (env.get("RECO_SERVE_CORS_ORIGINS") or "").split(",") if o),
        )

    @property
    def body_limit(self) -> int:
        """Bytes one request body may hold: by default what `max_items` images of `max_image_bytes` take in
        base64, plus 1 MiB for everything else."""
        return self.max_body_bytes or self.max_items * (4 * self.max_image_bytes // 3 + 4) + (1 << 20)

    def to_env(self) -> dict[str, str]:
        """The same settings as variables, for uvicorn's worker processes."""
        env = {"RECO_SERVE_MODELS": ",".join(self.models), "RECO_SERVE_MAX_BATCH": str(self.max_batch),
               "RECO_SERVE_MAX_WAIT_MS": str(self.max_wait_ms), "RECO_SERVE_MAX_ITEMS": str(self.max_items),
               "RECO_SERVE_MAX_CLASSES": str(self.max_classes), "RECO_SERVE_MAX_TEMPLATES": str(self.max_templates),
               "RECO_SERVE_MAX_K": str(self.max_k), "RECO_SERVE_MAX_IMAGE_BYTES": str(self.max_image_bytes),
               "RECO_SERVE_MAX_IMAGE_PIXELS": str(self.max_image_pixels),
               "RECO_SERVE_MAX_TEXT_CHARS": str(self.max_text_chars), "RECO_SERVE_MAX_PROMPTS": str(self.max_prompts),
               "RECO_SERVE_BODY_TIMEOUT_S": str(self.body_timeout_s), "RECO_SERVE_KEEP_ALIVE_S": str(self.keep_alive_s),
               "RECO_SERVE_CORS_ORIGINS": ",".join(self.cors_origins)}
        if self.max_body_bytes:
            env["RECO_SERVE_MAX_BODY_BYTES"] = str(self.max_body_bytes)
        if self.token:
            env["RECO_API_TOKEN"] = self.token
        return env
