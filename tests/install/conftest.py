"""The bootstrap's first run on an empty cache starts in the background when the browser tier
starts (support/bootstrap_run.py), when its test is selected, so its minutes overlap the browser
tests and the install test only waits for it. Not earlier: it writes about 6 GB, and on ext4 every
fsync of a test beside it waited for those writes (test_checkpoint.py, whose verified writes fsync,
took 41 s alone and 115 s beside it); the browser tests wait on their server and fsync nothing."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.bootstrap_run import BackgroundBootstrap

FIRST_RUN_TEST = "install/test_bootstrap.py::test_first_run_prints_only_the_paths_and_a_second_run_does_nothing"
TESTS = Path(__file__).resolve().parent.parent
_started: list[BackgroundBootstrap] = []
_start_before: list[pytest.Item] = []  # the item before which the background run starts


def _tier(item: pytest.Item) -> str:
    return Path(item.fspath).relative_to(TESTS).parts[0]


def pytest_collection_finish(session) -> None:
    if session.config.option.collectonly:
        return
    if any(item.nodeid.endswith(FIRST_RUN_TEST) for item in session.items):
        _start_before.append(next(item for item in session.items if _tier(item) in ("browser", "install")))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if _start_before and item is _start_before[0]:
        _start_before.clear()
        _started.append(BackgroundBootstrap.start())
    yield


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
