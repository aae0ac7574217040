"""The captioning models of `caption` (paper §3.3.1): image/video VLMs and the merging LLM.

Each model is either a local transformers folder (loaded by path, `local_files_only`: nothing is
downloaded) or a model served by an OpenAI-compatible endpoint (`/v1/chat/completions`, e.g. a
vLLM server). Local classes, chosen by the folder's `config.json` `model_type`:
- `llava` -> `LlavaForConditionalGeneration` (LLaVA-1.5: ShareGPT4V's architecture), images only;
- `video_llava` -> `VideoLlavaForConditionalGeneration` (Video-LLaVA), images and videos;
- `qwen2_vl` / `qwen2_5_vl` -> `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`,
  images and videos;
- any other `model_type`: a causal LM (`AutoModelForCausalLM`), for the merge only.
Generation is greedy (`do_sample=False`), so a re-run gives the same captions.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..adapter.errors import TrainingError

logger = logging.getLogger(__name__)

Frames = Sequence[np.ndarray]  # RGB uint8 (H, W, 3) frames: one frame = an image, several = a video

VLM_CLASSES = {"llava": "LlavaForConditionalGeneration", "video_llava": "VideoLlavaForConditionalGeneration",
               "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
VIDEO_FAMILIES = ("video_llava", "qwen2_vl", "qwen2_5_vl")
# The prompt layouts of the models' cards, used when the processor has no chat template
_LLAVA = "USER: {visual}\n{prompt} ASSISTANT:"
_QWEN = "<|im_start|>user\n<|vision_start|>{visual}<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
_VISUAL_TOKENS = {"llava": ("<image>", None), "video_llava": ("<image>", "<video>"),
                  "qwen2_vl": ("<|image_pad|>", "<|video_pad|>"), "qwen2_5_vl": ("<|image_pad|>", "<|video_pad|>")}


class Describer(Protocol):
    """What the command needs from a model: one text per item, in order."""

    name: str
    can_see: bool
    can_see_video: bool

    def describe(self, items: Sequence[Frames], prompt: str) -> list[str]: ...

    def complete(self, prompts: Sequence[str]) -> list[str]: ...


def clean(text: str) -> str:
    """A model's answer as a caption: its first paragraph, whitespace collapsed."""
    text = text.strip().split("\n\n", 1)[0]
    return " ".join(text.split())


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class LocalModel:
    """A transformers model folder: a VLM (images, maybe videos) or a causal LM (text)."""

    def __init__(self, path: Path, device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 77) -> None:
        import transformers

        path = Path(path)
        if not (path / "config.json").is_file():
            raise TrainingError(f"{path} is not a transformers model folder (no config.json); give the folder "
                                f"of a downloaded model, e.g. llava-hf/llava-1.5-7b-hf or Qwen/Qwen2-VL-7B-Instruct.")
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        self.name, self.family, self.device = path.name, config.model_type, device
        self.max_new_tokens = max_new_tokens
        self.can_see = self.family in VLM_CLASSES
        self.can_see_video = self.family in VIDEO_FAMILIES
        model_class = (getattr(transformers, VLM_CLASSES[self.family]) if self.can_see
                       else transformers.AutoModelForCausalLM)
        try:
            self.model = model_class.from_pretrained(path, local_files_only=True, dtype=_torch_dtype(dtype))
        except (OSError, ValueError) as error:
            raise TrainingError(f"Cannot load {path} as {getattr(model_class, '__name__', model_class)}: {error}") from error
        self.model.to(device).eval()
        if self.can_see:
            self.processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
            self.tokenizer = self.processor.tokenizer
        else:
            self.processor = None
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _chat(self, prompt: str, visual: str | None) -> str:
        """The prompt in the model's own chat layout (its template, else its card's layout)."""
        template_owner = self.processor if self.processor is not None else self.tokenizer
        if getattr(template_owner, "chat_template", None):
            content = ([{"type": visual}] if visual else []) + [{"type": "text", "text": prompt}]
            messages = [{"role": "user", "content": content if visual else prompt}]
            return template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if visual is None:
            return prompt
        image_token, video_token = _VISUAL_TOKENS[self.family]
        token = video_token if visual == "video" else image_token
        return (_QWEN if self.family.startswith("qwen") else _LLAVA).format(visual=token, prompt=prompt)

    def _generate(self, inputs) -> list[str]:
        import torch

        inputs = inputs.to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]  # (B, new tokens): the answers without the prompts
        return [clean(text) for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def describe(self, items: Sequence[Frames], prompt: str) -> list[str]:
        """One caption per item: an image (one frame) or a video (its frames)."""
        is_video = len(items[0]) > 1
        if is_video and not self.can_see_video:
            raise TrainingError(f"{self.name} ({self.family}) reads images only; give a video model "
                                f"({', '.join(VIDEO_FAMILIES)}) for the action captions.")
        texts = [self._chat(prompt, "video" if is_video else "image")] * len(items)
        visuals = ({"videos": [np.stack(list(frames)) for frames in items]} if is_video
                   else {"images": [frames[0] for frames in items]})
        return self._generate(self.processor(text=texts, padding=True, return_tensors="pt", **visuals))

    def complete(self, prompts: Sequence[str]) -> list[str]:
        texts = [self._chat(prompt, None) for prompt in prompts]
        tokenizer = self.processor if self.processor is not None else self.tokenizer
        return self._generate(tokenizer(text=texts, padding=True, return_tensors="pt"))


def _data_url(frame: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Endpoint:
    """A model served by an OpenAI-compatible chat completions endpoint (vLLM, llama.cpp, ...).
    Images go as data URLs; a video as its frames, one image each (servers of video VLMs such as
    vLLM with Qwen2-VL accept several images per message). The key, if the server wants one, is
    read from $OPENAI_API_KEY and never stored."""

    can_see = can_see_video = True

    def __init__(self, url: str, model: str, max_new_tokens: int = 77, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.name, self.max_new_tokens, self.timeout = model, max_new_tokens, timeout

    def _ask(self, content: str | list) -> str:
        body = {"model": self.name, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_new_tokens, "temperature": 0}
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
            return clean(answer["choices"][0]["message"]["content"] or "")
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode("utf-8", "replace")
            raise TrainingError(f"The endpoint {self.url} refused the request for model {self.name!r}: "
                                f"HTTP {error.code} {detail}") from error
        except (urllib.error.URLError, OSError) as error:
            raise TrainingError(f"Cannot reach the endpoint {self.url}: {error}; start the server "
                                f"(e.g. `vllm serve MODEL`) or fix the URL.") from error
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise TrainingError(f"The endpoint {self.url} gave no chat completion: {error}.") from error

    def describe(self, items: Sequence[Frames], prompt: str) -> list[str]:
        return [self._ask([*({"type": "image_url", "image_url": {"url": _data_url(frame)}} for frame in frames),
                           {"type": "text", "text": prompt}]) for frames in items]

    def complete(self, prompts: Sequence[str]) -> list[str]:
        return [self._ask(prompt) for prompt in prompts]


def open_model(model: str, endpoint: str | None, *, device: str, dtype: str, max_new_tokens: int) -> Describer:
    """A served model when an endpoint is given, else the local folder `model`."""
    if endpoint:
        return Endpoint(endpoint, model, max_new_tokens)
    path = Path(model)
    if not path.is_dir():
        raise TrainingError(f"No model folder at {path}: give the local folder of the model (nothing is "
                            f"downloaded), or --*-endpoint URL to use a served model of that name.")
    logger.info("loading %s", path)
    return LocalModel(path, device, dtype, max_new_tokens)
