"""scripts/bootstrap.py run as the README's commands run it, on a cache folder of the test's own.

The first run on an empty cache takes minutes (it builds a whole environment, mostly pip writing
files, on one core), so tests/conftest.py starts it in the background with the first test of the
lane that will run the install test (at the session's start, beside the unit lane; in one
process, `-n 0`, after the unit tier), and the install test only waits for it. It runs at the
lowest CPU priority: it has until the install tier to finish, while the tests beside it run torch
on every core, and a core taken from one of torch's threads stalls all of them. (Started with
the browser tier instead, its 6 GB of writes evicted the workflows' models from the page cache:
unianimate_dance 27 s alone, 125 s beside it, and the whole command 35.7 minutes.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VALUES = ("python", "comfyui", "scrfd", "cache")
TIMEOUT_S = 1800
FIRST_RUN_TEST = "install/test_bootstrap.py::test_first_run_prints_only_the_paths_and_a_second_run_does_nothing"


def boot_python() -> str:
    """The interpreter the README's scripts bootstrap with (not this test's virtual environment)."""
    return shutil.which(os.environ.get("PYTHON_BOOT", "python3.11")) or sys.executable


def command() -> list[str]:
    return [boot_python(), str(REPO / "scripts" / "bootstrap.py"), *[a for name in VALUES for a in ("--print", name)]]


def bootstrap(cache: Path) -> subprocess.CompletedProcess:
    """One run in the foreground."""
    return subprocess.run(command(), env=dict(os.environ, IDA_CACHE=str(cache)), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=TIMEOUT_S)


@dataclass
class BackgroundBootstrap:
    """A first run on an empty cache, started now; `result()` waits for it."""
    folder: Path
    process: subprocess.Popen

    @property
    def cache(self) -> Path:
        return self.folder / "cache"

    @classmethod
    def start(cls) -> "BackgroundBootstrap":
        folder = Path(tempfile.mkdtemp(prefix="ida-bootstrap-"))
        with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
            process = subprocess.Popen(["nice", "-n", "19", *command()],
                                       env=dict(os.environ, IDA_CACHE=str(folder / "cache")), stdout=out,
                                       stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(folder, process)

    def result(self) -> subprocess.CompletedProcess:
        returncode = self.process.wait(TIMEOUT_S)
        return subprocess.CompletedProcess(self.process.args, returncode, (self.folder / "stdout").read_text(),
                                           (self.folder / "stderr").read_text())

    def remove(self) -> None:
        """Stop it if it still runs, and delete its ~6 GB (~50,000 files: 11 s of the heavy lane
        when it waited) at the lowest priority beside the next tests; `end_session` waits for it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            self.process.wait(60)
        _removing.append(subprocess.Popen(["nice", "-n", "19", "rm", "-rf", "--", str(self.folder)],
                                          stdin=subprocess.DEVNULL))


_started: list[BackgroundBootstrap] = []  # started early, not yet taken by the first-run test
_removing: list[subprocess.Popen] = []  # deletions of finished first runs
_start_tried = False


def start_early_if_selected(items) -> None:
    """Start the first run now, once per process, if its test is among `items`."""
    global _start_tried
    if not _start_tried and any(FIRST_RUN_TEST in item.nodeid for item in items):
        _started.append(BackgroundBootstrap.start())
    _start_tried = True


def take_started() -> BackgroundBootstrap:
    """The run started early, or (the test run alone, e.g. by node id) one started now."""
    return _started.pop() if _started else BackgroundBootstrap.start()


def end_session() -> None:
    """At the end of the session: a run started early whose test did not come (-x, an interrupt)
    is stopped, and every deletion is waited for."""
    while _started:
        _started.pop().remove()
    while _removing:
        _removing.pop().wait()
