"""The bootstrap's first run on an empty cache starts in the background (support/bootstrap_run.py,
started by tests/conftest.py), so its minutes overlap the other tests."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from support import bootstrap_run


@pytest.fixture(scope="session")
def first_bootstrap() -> Iterator[bootstrap_run.BackgroundBootstrap]:
    run = bootstrap_run.take_started()
    try:
        yield run
    finally:
        run.remove()
