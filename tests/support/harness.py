"""A real ComfyUI 0.30.0 for tests: a base folder with this pack installed, an in-process
executor (validate_prompt + PromptExecutor) and an HTTP server (`main.py --cpu`)."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

PACK_FOLDER = "id_animator"


def make_base(base: Path, repo: Path, models: dict[str, dict[str, Path]]) -> Path:
    """Create a ComfyUI base directory: custom_nodes/<pack> -> checkout, models/<folder>/<name> -> file."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(repo, target_is_directory=True)
    for folder, files in models.items():
        d = base / "models" / folder
        d.mkdir(parents=True, exist_ok=True)
        for name, target in files.items():
            dest = d / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                dest.symlink_to(target, target_is_directory=target.is_dir())
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir(exist_ok=True)
    return base


@dataclass
class RunResult:
    success: bool
    outputs: dict[str, Any]
    messages: list[tuple[str, dict]]
    node_errors: dict[str, Any] = field(default_factory=dict)
    error: dict | None = None

    @property
    def error_message(self) -> str:
        return (self.error or {}).get("exception_message", "")


class _StubServer:
    """What PromptExecutor needs from PromptServer: a client id and message sinks."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class InProcessComfy:
    """ComfyUI imported into this process, custom nodes loaded from `base`. `release()` frees its
    models and cached outputs (ComfyUI's modules stay imported); a later `run` reloads them."""

    def __init__(self, comfyui_dir: Path, base: Path) -> None:
        self.loop = asyncio.new_event_loop()
        if str(comfyui_dir) not in sys.path:
            sys.path.insert(0, str(comfyui_dir))
        import comfy.options

        comfy.options.enable_args_parsing()
        saved_argv = sys.argv
        sys.argv = ["main.py", "--cpu", "--base-directory", str(base), "--disable-api-nodes",
                    "--output-directory", str(base / "output")]
        try:
            import comfy.cli_args  # noqa: F401  (parses sys.argv once)
            import execution
            import folder_paths
            import nodes
        finally:
            sys.argv = saved_argv
        self.execution, self.nodes, self.folder_paths = execution, nodes, folder_paths
        self.import_failed = self.loop.run_until_complete(
            nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        gc.collect()  # ComfyUI's modules and node classes live as long as the process: left out of
        gc.freeze()  # every later collection (tests/conftest.py, pytest_collection_finish)
        self.server = _StubServer()
        self.executor = self._new_executor()

    def _new_executor(self):
        return self.execution.PromptExecutor(self.server, cache_type=self.execution.CacheType.CLASSIC,
                                             cache_args={"lru": 0, "ram": 2.0, "ram_inactive": 8.0})

    def release(self) -> None:
        import comfy.model_management

        self.executor = None  # its output cache holds the loaded models
        comfy.model_management.unload_all_models()
        gc.collect()
        comfy.model_management.cleanup_models_gc()
        gc.collect()
        return_freed_memory()

    def run(self, prompt: dict[str, Any]) -> RunResult:
        if self.executor is None:
            self.executor = self._new_executor()
        prompt_id = str(uuid.uuid4())
        ok, error, outputs, node_errors = self.loop.run_until_complete(
            self.execution.validate_prompt(prompt_id, prompt, None))
        if not ok:
            return RunResult(False, {}, [], node_errors, error)
        self.server.messages = []
        self.loop.run_until_complete(self.executor.execute_async(prompt, prompt_id, {}, outputs))
        messages = list(self.executor.status_messages)
        err = next((d for e, d in messages if e == "execution_error"), None)
        return RunResult(self.executor.success, self.executor.history_result.get("outputs", {}),
                         messages, {}, err)


def return_freed_memory() -> None:
    """Give freed heap pages back to the system (glibc keeps them otherwise), so a later suite's
    ComfyUI does not start on top of this one's peak."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(comfyui_dir: Path, base: Path, keep_log: Callable[[], bool], kept: Path,
            extra_args: tuple[str, ...] = ()) -> Iterator["HttpComfy"]:
    """A started HttpComfy, stopped on exit; its log is copied to `kept` when keep_log() is true."""
    server = HttpComfy(comfyui_dir, base, extra_args=extra_args)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        if keep_log():
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(server.log_path, kept)
            print(f"\nComfyUI log kept at {kept}")


class OnDemandServer:
    """An HTTP ComfyUI started on first use and stopped by `release()` (after its last test, so
    that the next suite's ComfyUI does not run beside it); used again, it starts again."""

    def __init__(self, comfyui_dir: Path, base: Path, keep_log: Callable[[], bool], kept: Path) -> None:
        self._args = (comfyui_dir, base, keep_log, kept)
        self._running: contextlib.ExitStack | None = None
        self._server: HttpComfy | None = None

    def __getattr__(self, name: str) -> Any:  # url, get, post, run, wait, log, ...
        if self._server is None:
            self._running = contextlib.ExitStack()
            self._server = self._running.enter_context(serving(*self._args))
        return getattr(self._server, name)

    def release(self) -> None:
        if self._running is not None:
            self._running.close()
        self._running = self._server = None


class HttpComfy:
    """`main.py --cpu` on a free loopback port, with the log kept in `base/comfyui.log`."""

    def __init__(self, comfyui_dir: Path, base: Path, python: str = sys.executable,
                 extra_args: tuple[str, ...] = (), port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / f"comfyui-{self.port}.log"
        self._log = open(self.log_path, "w")
        cmd = [python, str(comfyui_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(base), "--disable-api-nodes",
               "--disable-auto-launch", *extra_args]
        self.proc = subprocess.Popen(cmd, cwd=comfyui_dir, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return json.loads(body) if body else {}  # e.g. /interrupt answers 200 with no body
        except urllib.error.HTTPError as e:
            return {"http_status": e.code, **json.loads(e.read() or b"{}")}

    def queue(self, prompt: dict) -> str:
        reply = self.post("/prompt", {"prompt": prompt, "client_id": "tests"})
        if "prompt_id" not in reply:
            raise AssertionError(f"prompt refused: {json.dumps(reply)[:2000]}")
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                status = hist[prompt_id]["status"]
                if status.get("status_str") in ("success", "error"):
                    return hist[prompt_id]
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

