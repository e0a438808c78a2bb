from pathlib import Path

from app.names import check_name
from app.settings import Settings, mask_url, scrub

import pytest
from app.errors import RecoError


def test_zero_config_is_the_embedded_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({})
    assert s.home == (tmp_path / ".reco").resolve()
    assert s.database_url == f"sqlite:///{tmp_path.resolve() / '.reco' / 'reco.db'}"
    assert s.embedded_store and s.in_process_tasks and s.is_sqlite
    assert s.vectors_dir == s.home / "vectors"


def test_distributed_settings_and_secrets_are_masked():
    s = Settings.from_env({
        "RECO_HOME": "/data/reco",
        "RECO_DATABASE_URL": "postgresql+psycopg://reco:pgsecret@db:5432/reco",
        "RECO_QDRANT_URL": "https://qdrant.example:6333",
        "RECO_QDRANT_API_KEY": "qdrant-key-123",
        "RECO_BROKER_URL": "redis://:brokersecret@redis:6379/0",
        "RECO_DEVICE": "cuda:1",
    })
    assert s.home == Path("/data/reco") and s.device == "cuda:1"
    assert not s.embedded_store and not s.in_process_tasks and not s.is_sqlite
    shown = repr(s) + str(s.describe())
    for secret in ("pgsecret", "qdrant-key-123", "brokersecret"):
        assert secret not in shown
    assert "postgresql+psycopg://reco:***@db:5432/reco" in shown


def test_mask_url():
    assert mask_url("amqp://guest:guest@localhost:5672//") == "amqp://guest:***@localhost:5672//"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert mask_url("sqlite:////tmp/reco.db") == "sqlite:////tmp/reco.db"
    assert mask_url(None) is None


@pytest.mark.parametrize("url, secret, shown", [
    ("postgresql+psycopg://reco@db/reco?password=s3cret&sslmode=require", "s3cret",
     "postgresql+psycopg://reco@db/reco?password=***&sslmode=require"),
    ("postgresql://reco:p@ss@w0rd@db:5432/reco", "p@ss@w0rd", "postgresql://reco:***@db:5432/reco"),
    ("postgresql://reco:p%40ss-w0rd@db/reco", "p%40ss-w0rd", "postgresql://reco:***@db/reco"),
    ("redis://:rd-secret@127.0.0.1:6379/0", "rd-secret", "redis://:***@127.0.0.1:6379/0"),
    ("postgresql://reco@db/reco?sslpassword=k3y&PASSWORD=up", "k3y", "postgresql://reco@db/reco?sslpassword=***&PASSWORD=***"),
])
def test_secrets_are_masked_wherever_they_sit_in_a_url(url, secret, shown):
    assert mask_url(url) == shown and secret not in mask_url(url)
    s = Settings.from_env({"RECO_DATABASE_URL": url, "RECO_BROKER_URL": url})
    assert secret not in repr(s) + str(s.describe())


def test_scrub_removes_secrets_a_driver_message_quotes():
    url = "postgresql+psycopg://postgres:p@ss-Xy9z@127.0.0.1:5432/reco?password=q%40w-77"
    msg = (f'could not translate host name "ss-Xy9z@127.0.0.1" to address; dsn {url}; password "q@w-77" '
           "rejected")
    out = scrub(msg, url)
    assert "Xy9z" not in out and "q@w-77" not in out and "q%40w-77" not in out
    assert "could not translate host name" in out and scrub("nothing secret", url) == "nothing secret"


@pytest.mark.parametrize("name", ["a", "flags_v2", "cc12m-2026", "0abc"])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "Flags", "a b", "../x", "x/y", "-lead", "a" * 64, "é"])
def test_invalid_names(name):
    with pytest.raises(RecoError, match=r"\[a-z0-9_-\]"):
        check_name(name)


def test_visibility_timeout_setting():
    assert Settings.from_env({}).visibility_timeout == 3600
    assert Settings.from_env({"RECO_VISIBILITY_TIMEOUT": "60"}).visibility_timeout == 60
    with pytest.raises(RecoError, match="RECO_VISIBILITY_TIMEOUT='soon': use a whole number above 0"):
        Settings.from_env({"RECO_VISIBILITY_TIMEOUT": "soon"})
