import pytest

from tests.support import CollectorProc


@pytest.fixture
def collector(tmp_path):
    """A real agentgate-collector on 127.0.0.1, port 0, open mode (no tokens)."""
    c = CollectorProc(tmp=tmp_path, database=tmp_path / "collector.db")
    c.start()
    yield c
    c.stop()


@pytest.fixture
def collector_factory(tmp_path):
    """Start collectors with a given config file text."""
    started = []

    def make(config_text: str | None = None, name: str = "c") -> CollectorProc:
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        cfg = None
        if config_text is not None:
            cfg = d / "collector.toml"
            cfg.write_text(config_text)
        c = CollectorProc(tmp=d, config=cfg, database=d / "collector.db")
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()
