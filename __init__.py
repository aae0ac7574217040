"""ID-Animator for ComfyUI: identity-preserving video as native MODEL patches.

ComfyUI loads this folder as a custom node package and calls `comfy_entrypoint`.
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
