"""DWPose keypoints, the official UniAnimate pose alignment and pose drawing, in numpy, cv2 and
onnxruntime (no ComfyUI, no torch).

Modules: `detector` (YOLOX person boxes: letterbox, grid decoding, NMS), `keypoints` (RTMPose
SimCC whole-body keypoints, the OpenPose remap and the official selection), `dwpose` (the two
ONNX sessions, checked on load), `align` (run_align_pose's alignment), `draw` (the pose images),
`video` (reference + driving frames -> pose images, with the pack's decisions for bad input).
"""
