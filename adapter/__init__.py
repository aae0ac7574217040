"""ID-Animator face adapter in pure PyTorch (no ComfyUI imports anywhere in this package).

Modules: `weights_file` (every model file: safe reading, naming a wrong file, the key rule,
verified writes; shared with train/ and the other model families), `checkpoint` (the
animator.ckpt schema), `convert` (animator.ckpt -> .safetensors), `clip_image` (CLIP
preprocessing), `files` (atomic writes, tolerant JSONL, settings guard), `resampler` (face tokens),
`layer_map` (the 16 cross-attention layers), `face_attention` (decoupled attention maths, for
inference and training), `lora` (attn2 LoRA as weight patches), `identity` (averaging, mixing,
per-frame schedules, which adapter made the tokens), `face_detection` (insightface detection and
official alignment), `face_recognition` (ArcFace identity scores), `curricularface` (the IR-101 recogniser of
OpenS2V-Eval's FaceSim), `score_plot` (their chart), `errors`.
"""
