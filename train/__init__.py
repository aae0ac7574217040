"""Training ID-Animator (the paper's §3.3-§4.1, never released by its authors) on diffusers + accelerate.

Never imports ComfyUI or `nodes/`; shares the attention maths and the checkpoint rules with
`adapter/`. Command line: `python -m id_animator.train <command> --help` (see TRAINING.md).

Shared modules:
- `cli` (and `__main__`): the command line, one sub-command per step;
- `sd15`: the frozen models, read offline from the users' files: SD1.5 VAE, text encoder and UNet
  joined with an AnimateDiff motion module, and the CLIP ViT-H/14 image encoder.

The steps, in the order data flows through them:
- `video`: finding and reading the training videos;
- `face_pool`: per video, up to 5 aligned single-face crops (random face extraction, §3.3.2);
- `caption`: attribute and action captions from local VLMs (or an OpenAI-compatible server),
  merged by an LLM (§3.3.1; models in `caption_models`);
- `captions`: attribute + action captions merged into one unified caption (§3.3.1); both measure
  caption length against CLIP's 77 tokens (`caption_length`);
- `latents`: clips of N frames encoded once with the SD1.5 VAE, stored in safetensors shards;
- `data`: the training set: a clip, its caption (or null text), a reference face from its pool;
- `model`: the trainable adapter (Resampler, face K/V, LoRA), which drives the frozen UNet from
  `sd15` through attention processors (the UNet is never one of its modules);
- `loop`: random reference training with accelerate (one GPU to many machines);
- `export`: the trained adapter as `animator.ckpt` and `.safetensors`, verified on re-read;
- `score`: identity scores of generated videos (face similarity, CLIP-I); `opens2v`: OpenS2V-Eval's
  FaceSim protocol (`score --protocol opens2v`).
"""
