"""UniAnimate (ali-vilab/UniAnimate) in pure PyTorch/numpy: no ComfyUI imports in this package.

Sub-packages: `pose` (DWPose keypoints, the official pose alignment and drawing).
"""
