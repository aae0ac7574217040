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

from support.checkout_import import load_file, namespace_package, visible_while_importing
from support.unianimate_official import UTILS, load_checkout_utils, official_checkout

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
    namespace_package(PACKAGE, root / "tools" / "modules" / "diffusions")
    with visible_while_importing(UTILS):
        load_checkout_utils(root)
        for name in ("schedules", "losses"):
            load_file(f"{PACKAGE}.{name}", root / "tools" / "modules" / "diffusions" / f"{name}.py")
        return load_file(f"{PACKAGE}.diffusion_ddim", root / "tools" / "modules" / "diffusions" / "diffusion_ddim.py")


def official_ddim(cache: Path, long_video: bool = False):
    """DiffusionDDIM (or DiffusionDDIMLong) as the official configs build it."""
    module = official_diffusion_module(cache)
    return (module.DiffusionDDIMLong if long_video else module.DiffusionDDIM)(**DIFFUSION_KWARGS)
