import pytest

from tests.support import CollectorProc, logs


def pytest_configure(config):
    config.addinivalue_line("markers", "log_allows(*regexes): tracebacks or ERROR lines this "
                            "test expects in the logs of the collector or host agent it starts")


@pytest.fixture(autouse=True)
def _check_logs(request):
    """Fails the test if a process it started logged a traceback or an ERROR it did not
    declare with @pytest.mark.log_allows. Autouse and outermost, so it reads the logs
    after every other fixture has stopped its processes."""
    logs.sources.clear()
    yield
    allowed = [regex for m in request.node.iter_markers("log_allows") for regex in m.args]
    problems = logs.problems(allowed)
    logs.sources.clear()
    if problems:
        pytest.fail("unexpected errors logged by the processes this test started (if the test "
                    "causes them, declare them with @pytest.mark.log_allows(regex)):\n\n"
                    + "\n\n".join(problems), pytrace=False)


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
