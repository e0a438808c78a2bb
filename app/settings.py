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
    "RECO_LEASE_S",
    "RECO_MAX_ATTEMPTS",
    "RECO_TASK_RETRIES",
    "RECO_OVERSAMPLING",
    "RECO_SEARCH_THREADS",
    "RECO_DECODE_WORKERS",
    "RECO_ENCODE_BATCH",
    "RECO_DEVICE_SEARCH",
)

DEVICE_SEARCH = ("auto", "on", "off")

# query parameters that carry a secret (libpq's password=, sslpassword=; tokens and keys of other services)
_SECRET_PARAM = re.compile(r"(?i)^(ssl)?(password|passwd|pwd|pass|secret|token|api[_-]?key|access[_-]?key)$")


def url_secrets(url: str | None) -> list[str]:
    """The secret parts of a URL: the password of its userinfo (any characters, `@` included: the host starts
    after the last `@`) and the values of password-like query parameters, raw and percent-decoded."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    if not url or "://" not in url:
        return []
    out = []
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    userinfo = parts.netloc.rpartition("@")[0]
    if ":" in userinfo:
        out.append(userinfo.split(":", 1)[1])
    for chunk in parts.query.split("&"):
        key, eq, value = chunk.partition("=")
        if eq and value and _SECRET_PARAM.match(unquote(key)):
            out.append(value)
    out += [v for k, v in parse_qsl(parts.query) if v and _SECRET_PARAM.match(k)]
    out = {x for v in out for x in (v, unquote(v)) if x}
    # a raw `@` in a password splits it for a URL parser (SQLAlchemy reads `u:p@ss@h` as password `p`, host
    # `ss@h`), and a driver's message may quote either piece
    out |= {piece for v in out for piece in re.split(r"[@:]", v) if len(piece) >= 3}
    return sorted(out, key=len, reverse=True)


def mask_url(url: str | None) -> str | None:
    """The URL with every secret replaced by *** (`postgresql://u:s@cret@h/db?password=x` ->
    `postgresql://u:***@h/db?password=***`): what any output may show of a configured URL."""
    if not url or not url_secrets(url):
        return url
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    user, at, host = parts.netloc.rpartition("@")
    if at and ":" in user:
        user = user.split(":", 1)[0] + ":***"
    query = "&".join(
        f"{k}=***" if eq and v and _SECRET_PARAM.match(k) else f"{k}{eq}{v}"
        for k, eq, v in (c.partition("=") for c in parts.query.split("&"))) if parts.query else ""
    return urlunsplit((parts.scheme, f"{user}{at}{host}", parts.path, query, parts.fragment))


def scrub(text: str, *urls: str | None) -> str:
    """`text` (an error message, a log line) with the secrets of `urls` replaced by ***: a driver's message may
    quote the connection string or the password itself."""
    for url in urls:
        if url:
            text = text.replace(url, mask_url(url))
            for secret in url_secrets(url):
                text = text.replace(secret, "***")
    return text


def _positive_int(env, name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        from .errors import RecoError

        raise RecoError(f"{name}={raw!r}: use a whole number above 0, e.g. {name}={default}")
    return int(raw)


def _whole_or_auto(env, name: str, minimum: int, example: int) -> int | None:
    """A whole-number setting of `minimum` or more; unset or `auto`: None (the code picks by device and cores)."""
    raw = (env.get(name) or "").strip().lower()
    if not raw or raw == "auto":
        return None
    if not raw.isdigit() or int(raw) < minimum:
        from .errors import RecoError

        raise RecoError(f"{name}={raw!r}: use a whole number of {minimum} or more, or auto, e.g. {name}={example}")
    return int(raw)


def _choice(env, name: str, choices: tuple[str, ...]) -> str:
    raw = (env.get(name) or choices[0]).strip().lower()
    if raw not in choices:
        from .errors import RecoError

        raise RecoError(f"{name}={raw!r}: use one of {', '.join(choices)}")
    return raw


def _at_least(env, name: str, minimum: float, default: float | None, example: float, unit: str = "") -> float | None:
    """A number setting of `minimum` or more (NaN and words refused); unset: `default`."""
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum:
        from .errors import RecoError

        raise RecoError(f"{name}={raw!r}: use a number{unit} of {minimum:g} or more, e.g. {name}={example:g}")
    return value


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
    # a worker renews its shard's lease every lease_s / 3 seconds; a lease not renewed for lease_s seconds is stale
    # and the sweeper gives the shard to another worker (app/leases.py)
    lease_s: int = 30
    max_attempts: int = 5  # a shard taken this many times without finishing ends failed
    # a task's retries on a transient error (backoff 2, 4, 8 ... 60 s: 8 retries ride out about 2 minutes); past
    # them the sweeper sends the shard again once the outage is over
    task_retries: int = 8
    oversampling: float | None = None  # quantized versions: candidates rescored per result (None: 2 int8, 8 binary)
    search_threads: int = 1  # long query batches are split across this many threads
    # image decode + preprocess processes feeding ingestion (None: by device and cores, app/decode.py)
    decode_workers: int | None = None
    encode_batch: int | None = None  # items per backbone call in ingestion (None: by device)
    # exact kNN on a device-resident copy of a memory version: auto = when the model runs on CUDA and the version
    # fits; on = also on the CPU (tests, small memories); off = always the store (app/device_search.py)
    device_search: str = "auto"

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
            lease_s=_positive_int(env, "RECO_LEASE_S", 30),
            max_attempts=_positive_int(env, "RECO_MAX_ATTEMPTS", 5),
            task_retries=_positive_int(env, "RECO_TASK_RETRIES", 8),
            oversampling=_at_least(env, "RECO_OVERSAMPLING", 1.0, None, example=2),
            search_threads=_positive_int(env, "RECO_SEARCH_THREADS", min(8, os.cpu_count() or 1)),
            decode_workers=_whole_or_auto(env, "RECO_DECODE_WORKERS", 0, example=8),
            encode_batch=_whole_or_auto(env, "RECO_ENCODE_BATCH", 1, example=512),
            device_search=_choice(env, "RECO_DEVICE_SEARCH", DEVICE_SEARCH),
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
            "lease_s": self.lease_s,
            "max_attempts": self.max_attempts,
            "task_retries": self.task_retries,
            "oversampling": self.oversampling or "auto (int8 2, binary 8)",
            "search_threads": self.search_threads,
            "decode_workers": "auto" if self.decode_workers is None else self.decode_workers,
            "encode_batch": self.encode_batch or "auto",
            "device_search": self.device_search,
        }

    def __repr__(self) -> str:  # never print a password
        d = self.describe()
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in d.items()) + ")"
