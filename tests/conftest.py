import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("RECO_OFFLINE", "1")

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from app import synthetic  # noqa: E402
from app.runtime import Runtime  # noqa: E402
from app.settings import ENV_VARS, Settings  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    return str(synthetic.write_tiny_config(tmp_path_factory.mktemp("model") / "tiny.json"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_config):
    from app.backbone import get_backbone

    return get_backbone(tiny_config)


@pytest.fixture
def reco_env(tmp_path, monkeypatch):
    """A clean embedded profile under tmp_path (no RECO_* settings leak in from the environment)."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RECO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECO_OFFLINE", "1")
    return tmp_path / "home"


@pytest.fixture
def rt(reco_env):
    r = Runtime(Settings.from_env())
    yield r
    r.close()


@pytest.fixture
def cli_run(reco_env):
    """Run a `reco` command in-process; returns the click Result."""
    from app.cli import cli

    runner = CliRunner()

    def run(*args, ok=True):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        if ok and result.exit_code != 0:
            raise AssertionError(f"reco {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}")
        return result

    return run


@pytest.fixture
def wds_corpus(tmp_path):
    return synthetic.write_wds(tmp_path / "wds", n_shards=3, per_shard=8)[0].parent


@pytest.fixture(scope="session")
def private_pg():
    """One PostgreSQL cluster of the test session's own (tests/services.py): the machine's is never touched."""
    from tests.services import private_postgres

    pg = private_postgres()
    yield pg
    pg.remove()


@pytest.fixture(scope="session")
def private_redis_server(tmp_path_factory):
    """One redis-server of the test session's own, with an append-only file."""
    from tests.services import private_redis

    r = private_redis(tmp_path_factory.mktemp("redis"))
    yield r
    r.stop()


JITTER = 0.3  # how much the synthetic drawings of one concept vary in the trained fixture


@pytest.fixture
def trained(rt, tmp_path, tiny_config):
    """Model `m` trained on memory `mem` (coloured shapes), and an image folder of the 32 concepts to classify."""
    from app.build import build_in_process
    from app.train import TrainConfig, create_job, run_training

    synthetic.write_wds(tmp_path / "mem", 4, 64, seed=1, jitter=JITTER)
    build_in_process(rt, "mem", tmp_path / "mem", backbone=tiny_config, activate=True)
    create_job(rt, "m", "mem", "mem", TrainConfig(k=10, epochs=30, batch_size=64, lr=3e-3, dedup_threshold=None,
                                                  val_by="item", checkpoint_every=1000))
    run_training(rt, "m", progress=False)
    root = synthetic.write_imagefolder(tmp_path / "eval", per_class=2, seed=500_000, jitter=JITTER)
    return {"data": root / "images", "classnames": str(root / "classnames.txt")}
