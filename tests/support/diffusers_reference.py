"""Independent implementations the tests compare with: diffusers' names for the official weights."""
from __future__ import annotations

import torch


def official_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official Resampler keys to diffusers' IPAdapterPlusImageProjection keys."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            renamed[key] = value
            continue
        layer, block, rest = parts[1], parts[2], ".".join(parts[3:])
        prefix = f"layers.{layer}"
        if block == "0":
            if rest.startswith("norm1."):
                renamed[f"{prefix}.ln0.{rest[6:]}"] = value
            elif rest.startswith("norm2."):
                renamed[f"{prefix}.ln1.{rest[6:]}"] = value
            elif rest == "to_q.weight":
                renamed[f"{prefix}.attn.to_q.weight"] = value
            elif rest == "to_kv.weight":
                k, v = value.chunk(2, dim=0)  # first half of the rows is K, second V
                renamed[f"{prefix}.attn.to_k.weight"] = k
                renamed[f"{prefix}.attn.to_v.weight"] = v
            elif rest == "to_out.weight":
                renamed[f"{prefix}.attn.to_out.0.weight"] = value
            else:
                raise AssertionError(key)
        else:
            ff_names = {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}
            index, param = parts[3], parts[4]
            renamed[f"{prefix}.{ff_names[index]}.{param}"] = value
    return renamed
