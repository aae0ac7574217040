"""The official UniAnimate code (ali-vilab/UniAnimate at 643c963) for parity tests, imported from a
checkout in the cache; nothing of it is copied into this repository.

The checkout is made once under `<cache>/third_party/<commit>/UniAnimate` from the URL template
`$IDA_PACK_URL` (as scripts/third_party.py does for the node packs; only that commit is fetched,
and its requirements are never installed). Tests that need it skip with 'third-party packs
unavailable' when no source is reachable.

The official UNet imports packages the test bed does not have. Only those imports are stubbed;
the model maths all run from the official files:
- `xformers.ops.memory_efficient_attention(q, k, v, attn_bias=None)` on [B*heads, L, d]: softmax
  attention with scale d^-0.5, computed here with torch's scaled_dot_product_attention;
- `fairscale.nn.checkpoint.checkpoint_wrapper`: the identity (fairscale runs the plain forward
  without gradients, which is how inference calls it);
- `open_clip` and `rotary_embedding_torch.RotaryEmbedding`: imported but unused by the UNet
  (the rotary path is dead: USE_TEMPORAL_TRANSFORMER is True).
The official `utils.registry_class` is loaded from the checkout itself.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import third_party  # noqa: E402

from support.checkout_import import load_file, namespace_package, visible_while_importing  # noqa: E402

OFFICIAL_REPO = "ali-vilab/UniAnimate"
OFFICIAL_COMMIT = "643c9637715888cea38818892bf1ef313a3dcfa9"  # head; last code change d7814fa (2024-07-23)
PACKAGE = "unianimate_official"  # the name the official files are imported under
ARCHIVED = ("tools", "utils", "configs", "run_align_pose.py", "dwpose")  # what parity tests read
UNET_FILES = ("tools/modules/unet/util.py", "tools/modules/unet/unet_unianimate.py")
VIDEO_COMPOSITIONS = ["image", "local_image", "dwpose", "randomref", "randomref_pose"]  # Y and YL

# The official effective UNet config: configs/UniAnimate_infer.yaml `UNet` merged (shallow
# update) over tools/modules/config.py `cfg.UNet`; attn_scales comes from the latter.
OFFICIAL_UNET_KWARGS: dict[str, Any] = dict(
    in_dim=4, dim=320, y_dim=1024, context_dim=1024, out_dim=4, dim_mult=[1, 2, 4, 4], num_heads=8,
    head_dim=64, num_res_blocks=2, attn_scales=[1 / 1, 1 / 2, 1 / 4], dropout=0.1, temporal_attention=True,
    num_tokens=4, temporal_attn_times=1, use_checkpoint=True, use_fps_condition=False, use_sim_mask=False)


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    return subprocess.run(["git", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)


def _archive(url: str, staging: Path, log: io.StringIO) -> bool:
    """The parts of the commit the tests read, by `git archive --remote` (local mirrors: they may
    lack the large media blobs that a fetch of the whole commit needs). The archive's embedded
    commit id must be OFFICIAL_COMMIT."""
    for ref in (OFFICIAL_COMMIT, "HEAD", "refs/heads/main"):
        result = subprocess.run(["git", "archive", f"--remote={url}", ref, *ARCHIVED], capture_output=True,
                                stdin=subprocess.DEVNULL, env=dict(os.environ, GIT_TERMINAL_PROMPT="0"))
        log.write(result.stderr.decode(errors="replace"))
        if result.returncode != 0:
            continue
        commit = subprocess.run(["git", "get-tar-commit-id"], input=result.stdout, capture_output=True).stdout
        if commit.decode().strip() != OFFICIAL_COMMIT:
            log.write(f"{url} {ref} is {commit.decode().strip()}, not {OFFICIAL_COMMIT}\n")
            continue
        with tarfile.open(fileobj=io.BytesIO(result.stdout)) as archive:
            archive.extractall(staging, filter="data")
        return True
    return False


def _fetch(url: str, staging: Path, log: io.StringIO) -> bool:
    """Only the pinned commit, no history (what scripts/third_party.py does for the node packs)."""
    for args in (("init", "--quiet"), ("fetch", "--quiet", "--depth", "1", url, OFFICIAL_COMMIT),
                 ("checkout", "--quiet", "--detach", "FETCH_HEAD")):
        result = _git(*args, cwd=staging)
        log.write(result.stdout + result.stderr)
        if result.returncode != 0:
            return False
    return True


def official_checkout(cache: Path) -> Path:
    """The official repository at OFFICIAL_COMMIT (made once); skips the test when unreachable."""
    dest = cache / "third_party" / OFFICIAL_COMMIT / "UniAnimate"
    if all((dest / f).is_file() for f in UNET_FILES):
        return dest
    owner, name = OFFICIAL_REPO.split("/")
    url = third_party.url_template().format(repo=OFFICIAL_REPO, owner=owner, name=name)
    staging = dest.with_name(f".UniAnimate.{os.getpid()}.partial")
    log = io.StringIO()
    made = False
    for method in (_archive, _fetch):
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if method(url, staging, log) and all((staging / f).is_file() for f in UNET_FILES):
            made = True
            break
    if not made:
        shutil.rmtree(staging, ignore_errors=True)
        last = [line for line in log.getvalue().splitlines() if line.strip()][-1:]
        pytest.skip(f"third-party packs unavailable (official UniAnimate: cannot fetch {OFFICIAL_COMMIT[:12]} "
                    f"from {url}: {last}): set {third_party.URL_VARIABLE} to a git URL template, "
                    "e.g. 'file:///srv/git/{owner}+{name}/repo'; see README 'Tests'")
    try:
        staging.rename(dest)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _memory_efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Any = None,
                                op: Any = None, **_: Any) -> torch.Tensor:
    """xformers' memory_efficient_attention on [B, L, d] (no bias): softmax(q k^T / sqrt(d)) v."""
    if attn_bias is not None:
        raise NotImplementedError("the stub covers attn_bias=None only (all the UniAnimate UNet uses)")
    return F.scaled_dot_product_attention(q, k, v)


def _stub_modules() -> dict[str, types.ModuleType]:
    xformers = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = _memory_efficient_attention
    xformers.ops = ops
    fairscale, fs_nn, fs_ckpt = (types.ModuleType(n) for n in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"))
    fs_ckpt.checkpoint_wrapper = lambda module, *a, **k: module
    fairscale.nn, fs_nn.checkpoint = fs_nn, fs_ckpt
    rotary = types.ModuleType("rotary_embedding_torch")

    class RotaryEmbedding(torch.nn.Module):  # never built: the rotary path is dead in the UNet
        def __init__(self, *a: Any, **k: Any) -> None:
            raise NotImplementedError("rotary embeddings are not part of the UniAnimate UNet")

    rotary.RotaryEmbedding = RotaryEmbedding
    return {"xformers": xformers, "xformers.ops": ops, "fairscale": fairscale, "fairscale.nn": fs_nn,
            "fairscale.nn.checkpoint": fs_ckpt, "open_clip": types.ModuleType("open_clip"),
            "rotary_embedding_torch": rotary}


UTILS = ("utils",)  # the checkout's `utils` package and its modules, visible only while importing


def load_checkout_utils(root: Path) -> None:
    """The checkout's own `utils.registry_class` (the official modules register through it); call
    inside `visible_while_importing(UTILS)`."""
    namespace_package("utils", root / "utils")
    load_file("utils.registry", root / "utils" / "registry.py")
    load_file("utils.registry_class", root / "utils" / "registry_class.py")


def official_unet_module(cache: Path) -> types.ModuleType:
    """The official `unet_unianimate` module (UNetSD_UniAnimate), imported once per process."""
    if f"{PACKAGE}.unet_unianimate" in sys.modules:
        return sys.modules[f"{PACKAGE}.unet_unianimate"]
    root = official_checkout(cache)
    namespace_package(PACKAGE, root / "tools" / "modules" / "unet")
    with visible_while_importing(UTILS, _stub_modules()):
        load_checkout_utils(root)
        load_file(f"{PACKAGE}.util", root / UNET_FILES[0])
        return load_file(f"{PACKAGE}.unet_unianimate", root / UNET_FILES[1])


def official_unet(cache: Path, resolution: tuple[int, int], zero_y: torch.Tensor | None = None,
                  **overrides: Any) -> torch.nn.Module:
    """`UNetSD_UniAnimate` built as the official inference builds it (effective config, eval mode),
    for pose images of `resolution` = (W, H) (the official [W, H] order)."""
    module = official_unet_module(cache)
    config = types.SimpleNamespace(resolution=list(resolution), video_compositions=list(VIDEO_COMPOSITIONS))
    kwargs = {**OFFICIAL_UNET_KWARGS, **overrides}
    unet = module.UNetSD_UniAnimate(config=config, zero_y=zero_y, **kwargs)
    return unet.eval()
