"""Settings from the environment. Unset means the zero-config embedded profile under RECO_HOME."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

ENV_VARS = (
    "RECO_HOME",
    "RECO_DATABASE_URL",
    "RECO_QDRANT_URL",
    "RECO_QDRANT_API_KEY",
    "RECO_BROKER_URL",
    "RECO_RESULT_BACKEND",
    "RECO_DEVICE",
    "RECO_OFFLINE",
    "RECO_VISIBILITY_TIMEOUT",
)

_URL_PASSWORD = re.compile(r"(://[^:/@]*:)([^@]*)(@)")


def mask_url(url: str | None) -> str | None:
    """Hide the password part of a URL (`postgresql://u:secret@h/db` -> `postgresql://u:***@h/db`)."""
    if not url:
        return url
    return _URL_PASSWORD.sub(r"\1***\3", url)


def _positive_int(env, name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        from .errors import RecoError

        raise RecoError(f"{name}={raw!r}: use a whole number of seconds, e.g. {name}={default}")
    return int(raw)


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    qdrant_url: str | None = None
    qdrant_api_key: str | None = field(default=None, repr=False)
    broker_url: str | None = None
    result_backend: str | None = None
    device: str | None = None
    offline: str = "auto"
    visibility_timeout: int = 3600  # seconds before a dead worker's unacknowledged message is delivered again

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        env = os.environ if env is None else env
        home = Path(env.get("RECO_HOME") or "./.reco").expanduser().resolve()
        db = env.get("RECO_DATABASE_URL") or f"sqlite:///{home / 'reco.db'}"
        return cls(
            home=home,
            database_url=db,
            qdrant_url=env.get("RECO_QDRANT_URL") or None,
            qdrant_api_key=env.get("RECO_QDRANT_API_KEY") or None,
            broker_url=env.get("RECO_BROKER_URL") or None,
            result_backend=env.get("RECO_RESULT_BACKEND") or None,
            device=env.get("RECO_DEVICE") or None,
            offline=(env.get("RECO_OFFLINE") or "auto").lower(),
            visibility_timeout=_positive_int(env, "RECO_VISIBILITY_TIMEOUT", 3600),
        )

    @property
    def embedded_store(self) -> bool:
        return self.qdrant_url is None

    @property
    def in_process_tasks(self) -> bool:
        return self.broker_url is None

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def vectors_dir(self) -> Path:
        return self.home / "vectors"

    def describe(self) -> dict:
        """What `reco info` prints: every setting, secrets masked."""
        return {
            "home": str(self.home),
            "database_url": mask_url(self.database_url),
            "qdrant": mask_url(self.qdrant_url) or f"embedded ({self.vectors_dir})",
            "qdrant_api_key": "***" if self.qdrant_api_key else None,
            "broker_url": mask_url(self.broker_url) or "in-process",
            "device": self.device or "auto",
            "offline": self.offline,
            "visibility_timeout_s": self.visibility_timeout,
        }

    def __repr__(self) -> str:  # never print a password
        d = self.describe()
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in d.items()) + ")"
