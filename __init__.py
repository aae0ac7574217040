"""ID-Animator for ComfyUI: identity-preserving video as native MODEL patches.

ComfyUI loads this folder as a custom node package and calls `comfy_entrypoint`. ComfyUI
imports happen inside it, so `python -m <pack>.adapter.convert` works without ComfyUI.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import extension

    return extension()


__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
