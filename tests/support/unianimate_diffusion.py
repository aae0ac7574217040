"""The official UniAnimate sampler (`tools/modules/diffusions/diffusion_ddim.py`: DiffusionDDIM,
DiffusionDDIMLong, with `schedules.py` and `losses.py`) imported from the checkout that
support.unianimate_official makes; nothing of it is copied here. Its only foreign import is the
checkout's own `utils.registry_class`, visible only while it imports (ComfyUI has a `utils` too).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

from support.unianimate_official import _load, official_checkout

PACKAGE = "unianimate_official_diffusions"
# configs/UniAnimate_infer.yaml `Diffusion` (the long config has the same values)
DIFFUSION_KWARGS: dict[str, Any] = dict(
    schedule="linear_sd", schedule_param=dict(num_timesteps=1000, init_beta=0.00085, last_beta=0.0120,
                                              zero_terminal_snr=True),
    mean_type="v", loss_type="mse", var_type="fixed_small", rescale_timesteps=False, noise_strength=0.1)


def official_diffusion_module(cache: Path) -> types.ModuleType:
    if f"{PACKAGE}.diffusion_ddim" in sys.modules:
        return sys.modules[f"{PACKAGE}.diffusion_ddim"]
    root = official_checkout(cache)
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(root / "tools" / "modules" / "diffusions")]
    sys.modules[PACKAGE] = package
    names = ("utils", "utils.registry", "utils.registry_class")
    saved = {n: sys.modules.get(n) for n in names}
    try:
        utils = types.ModuleType("utils")
        utils.__path__ = [str(root / "utils")]
        sys.modules["utils"] = utils
        _load("utils.registry", root / "utils" / "registry.py")
        _load("utils.registry_class", root / "utils" / "registry_class.py")
        for name in ("schedules", "losses"):
            _load(f"{PACKAGE}.{name}", root / "tools" / "modules" / "diffusions" / f"{name}.py")
        return _load(f"{PACKAGE}.diffusion_ddim", root / "tools" / "modules" / "diffusions" / "diffusion_ddim.py")
    finally:
        for n, module in saved.items():
            if module is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = module


def official_ddim(cache: Path, long_video: bool = False):
    """DiffusionDDIM (or DiffusionDDIMLong) as the official configs build it."""
    module = official_diffusion_module(cache)
    return (module.DiffusionDDIMLong if long_video else module.DiffusionDDIM)(**DIFFUSION_KWARGS)
