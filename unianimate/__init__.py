"""UniAnimate (ali-vilab/UniAnimate, arXiv 2406.01188) in pure PyTorch: no ComfyUI imports here.

Modules: `config` (the effective constructor values of the official release, one source of the
numbers), `blocks` (ResBlock, spatial/temporal transformers, pose adapters), `unet` (the
`UniAnimateUNet` with the official state-dict layout), `checkpoint` (the key/shape schema of the
official file and the strict check), `errors`. Sub-package `pose` (numpy, cv2 and onnxruntime:
DWPose keypoints, the official pose alignment and the pose drawing).
"""
