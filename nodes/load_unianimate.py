"""LoadUniAnimate: the UniAnimate UNet (`models/unianimate/`) as a MODEL that KSampler samples."""
from __future__ import annotations

import logging
import time

import folder_paths
import torch
from comfy_api.latest import io

from ..unianimate.checkpoint import config_of, load_unianimate_checkpoint
from ..unianimate.config import OFFICIAL
from . import folders
from .unianimate_model import build_model

WEIGHT_DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DOWNLOAD_HINT = ("unianimate_16f_32f_non_ema_223000.pth comes from ModelScope iic/unianimate (research and "
                 "non-commercial use only) and goes in models/unianimate/.")


class LoadUniAnimate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadUniAnimate",
            display_name="Load UniAnimate",
            category="id_animator/unianimate",
            description="Loads the UniAnimate video UNet (pose-driven animation of a reference photo) as a "
                        "MODEL: v-prediction with zero-terminal SNR, sampled by KSampler.",
            search_aliases=["unianimate", "pose video", "dance", "animate photo"],
            inputs=[
                io.Combo.Input("unet_name", options=folders.unianimate_files(),
                               tooltip="unianimate_16f_32f_non_ema_223000.pth (read with weights_only, never "
                                       "run) or its .safetensors conversion, in models/unianimate/."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Dtype of the weights in memory: default = ComfyUI's choice for the "
                                       "device (fp16 on most GPUs: 2.8 GB; fp32: 5.7 GB)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="For KSampler, with the positive/negative "
                                                                   "and latent of UniAnimateConditioning.")],
        )

    @classmethod
    def validate_inputs(cls, unet_name: str) -> bool | str:
        if folder_paths.get_full_path(folders.UNIANIMATE_FOLDER, unet_name) is None:
            return (f"UniAnimate model '{unet_name}' is not in "
                    f"{' or '.join(folder_paths.get_folder_paths(folders.UNIANIMATE_FOLDER))}. {DOWNLOAD_HINT}")
        return True

    @classmethod
    def execute(cls, unet_name: str, weight_dtype: str) -> io.NodeOutput:
        started = time.perf_counter()
        path = folder_paths.get_full_path_or_raise(folders.UNIANIMATE_FOLDER, unet_name)
        state = load_unianimate_checkpoint(path)  # safe read, every key and shape checked
        config = config_of(state)
        if config != OFFICIAL:
            logging.warning("UniAnimate: %s is not the official size (base width %d, %d ResBlocks per level, "
                            "%d heads after the input conv): built at its own size", unet_name, config.dim,
                            config.num_res_blocks, config.num_heads)
        patcher = build_model(state, config, WEIGHT_DTYPES[weight_dtype])
        logging.info("UniAnimate: loaded %s (%d tensors) in %.1f s", unet_name, len(state),
                     time.perf_counter() - started)
        return io.NodeOutput(patcher)
