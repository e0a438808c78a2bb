"""docker-compose.yml checked against the code, without a Docker engine: every RECO_* variable the code reads is
set for the services that run it, every service the settings point at exists with a health check, and no secret
is written into the file."""

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from app.serve.settings import ENV_VARS as SERVE_VARS
from app.serve.settings import ServeSettings
from app.settings import ENV_VARS, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
RECO_SERVICES = ("migrate", "worker-ingest", "worker-train", "api", "admin")


def _vars_read_by_code() -> set[str]:
    found = set()
    for path in list((ROOT / "app").rglob("*.py")) + list((ROOT / "workers").rglob("*.py")):
        found |= set(re.findall(r"\bRECO_[A-Z_]+\b", path.read_text()))
    return found


def _resolve(value: str) -> str:
    """${VAR:?msg} / ${VAR:-default} -> a placeholder or the default, as compose would with VAR unset."""
    value = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: f"<{m.group(1)}>", value)
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), value)


def test_settings_module_lists_every_variable_the_code_reads():
    assert _vars_read_by_code() <= set(ENV_VARS) | set(SERVE_VARS) | {"RECO_BENCH_CACHE", "RECO_BENCH_HOME"}


@pytest.mark.parametrize("service", RECO_SERVICES)
def test_reco_services_set_every_setting(service):
    env = SERVICES[service]["environment"]
    missing = set(ENV_VARS) - set(env)
    assert not missing, f"{service} lacks {missing}"
    settings = Settings.from_env({k: _resolve(str(v)) for k, v in env.items()})
    # the distributed profile throughout: server database, Qdrant server, broker
    assert not settings.is_sqlite and settings.qdrant_url and settings.broker_url and settings.qdrant_api_key
    for url in (settings.database_url, settings.qdrant_url, settings.broker_url, settings.result_backend):
        host = urlparse(url.replace("postgresql+psycopg", "postgresql")).hostname
        assert host in SERVICES, f"{url} points at {host}, which is not a service"
        assert "healthcheck" in SERVICES[host], f"{host} needs a health check"
        assert SERVICES[service]["depends_on"].get(host, {}).get("condition") == "service_healthy" or \
            SERVICES[service]["depends_on"].get("migrate") or service == "migrate"


def test_services_and_dependencies():
    assert {"postgres", "redis", "qdrant", "migrate", "worker-ingest", "worker-train", "admin"} <= set(SERVICES)
    assert SERVICES["migrate"]["command"] == ["reco", "db", "upgrade"]
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker-ingest", "worker-train", "admin"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "ingest" in SERVICES["worker-ingest"]["command"] and "train" in SERVICES["worker-train"]["command"]
    assert "container_name" not in SERVICES["worker-ingest"]  # `--scale worker-ingest=N` needs no fixed name
    gpu = SERVICES["worker-train"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert SERVICES["admin"]["entrypoint"] == ["reco"]
    # pinned images: no floating tags
    for name in ("postgres", "redis", "qdrant"):
        image = SERVICES[name]["image"]
        assert ":" in image and not image.endswith(":latest"), image
    assert SERVICES["qdrant"]["environment"]["QDRANT__SERVICE__API_KEY"].startswith("${RECO_QDRANT_API_KEY:?")


def test_api_service_serves_with_every_setting_and_a_readiness_check():
    api = SERVICES["api"]
    assert api["command"][:2] == ["reco", "serve"] and "0.0.0.0" in api["command"]
    assert set(SERVE_VARS) <= set(api["environment"])
    settings = ServeSettings.from_env({k: _resolve(str(v)) for k, v in api["environment"].items()})
    assert settings.token is None and settings.max_batch == 32 and not settings.cors_origins  # off by default
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "container_name" not in api and "-" in _resolve(api["ports"][0]).split(":")[0]  # scalable: a port range
    assert api["environment"]["RECO_API_TOKEN"] == "${RECO_API_TOKEN:-}"  # from the environment, never written


def test_no_secret_in_the_compose_file():
    text = (ROOT / "docker-compose.yml").read_text()
    for key in ("RECO_DB_PASSWORD", "RECO_QDRANT_API_KEY"):
        # every use is a required reference to the environment, never a literal value
        for m in re.finditer(rf"{key}[^\n]*", text):
            assert "${" + key + ":?" in m.group(0) or m.group(0).startswith(key + ":"), m.group(0)
    assert "password" not in re.sub(r"\$\{[^}]*\}", "", text).lower().replace("postgres_password", "")
