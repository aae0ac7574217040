"""The bootstrap's first run on an empty cache starts in the background as the session starts
(support/bootstrap_run.py), when its test is selected, so its minutes overlap the other tiers."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.bootstrap_run import BackgroundBootstrap

FIRST_RUN_TEST = "install/test_bootstrap.py::test_first_run_prints_only_the_paths_and_a_second_run_does_nothing"
_started: list[BackgroundBootstrap] = []


def pytest_collection_finish(session) -> None:
    if session.config.option.collectonly:
        return
    if any(item.nodeid.endswith(FIRST_RUN_TEST) for item in session.items):
        _started.append(BackgroundBootstrap.start())


@pytest.fixture(scope="session")
def first_bootstrap() -> Iterator[BackgroundBootstrap]:
    """The background first run (started here when the test runs alone, e.g. by node id)."""
    run = _started.pop() if _started else BackgroundBootstrap.start()
    try:
        yield run
    finally:
        run.remove()


def pytest_sessionfinish(session) -> None:
    while _started:  # the session ended before the test (-x, an interrupt): do not leave it running
        _started.pop().remove()
