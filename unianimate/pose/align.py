"""The official pose alignment (`run_align_pose.mp_main`; reference §7 "Alignment"): the driving
poses are rescaled to the reference person's body, judged on the first driving frame.

1. Global scale about the image origin, for body, hands and face of every frame:
   x by the ratio of shoulder widths (points 5 - 2), y by the ratio of the vertical distances
   from the shoulder midpoint to the hip midpoint (2, 5 -> 8, 11), reference over frame 0.
2. Bone lengths, in the official order. For each bone parent -> child, frame 0's child and its
   dependants move by (child - parent) * (r - 1) with r = |reference bone| / |frame-0 bone|; r is
   measured on frame 0 as it stands at that moment (after the global scale and after the bones
   before it, because the official code corrects frame 0 in place). Every later frame gets the same
   r applied, in the same order, to its own current coordinates.
3. Translation: the offset taking frame 0's corrected neck onto the reference neck moves every frame.

The reference pose itself is drawn unaligned. Points the detector missed are (-1, -1) and take part
in the arithmetic as the official code lets them; with `keep_missing_bones` (the pack's default) a
bone whose end is missing in the reference or in frame 0 keeps its length (r = 1) instead of taking
a ratio made from (-1, -1), which the official code does and which bends that limb in every frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...adapter.errors import PoseError
from .keypoints import PoseKeypoints

LEFT, RIGHT = 0, 1  # hands: index 0 is the left hand (COCO-WholeBody 92..112), 1 the right


@dataclass(frozen=True)
class Bone:
    parent: int
    child: int
    moves: tuple[int, ...]  # body points moved with the child (the child first)
    hand: int | None = None  # the hand that moves with it


# Official order: neck, shoulders, arms, head, legs. The hip points and the face have no bone.
BONES = (
    Bone(1, 0, (0, 14, 15, 16, 17)),
    Bone(1, 2, (2, 3, 4), RIGHT), Bone(1, 5, (5, 6, 7), LEFT),
    Bone(2, 3, (3, 4), RIGHT), Bone(3, 4, (4,), RIGHT),
    Bone(5, 6, (6, 7), LEFT), Bone(6, 7, (7,), LEFT),
    Bone(0, 14, (14, 16)), Bone(0, 15, (15, 17)), Bone(14, 16, (16,)), Bone(15, 17, (17,)),
    Bone(8, 9, (9, 10, 19)), Bone(9, 10, (10, 19)), Bone(11, 12, (12, 13, 18)), Bone(12, 13, (13, 18)),
)
SCALE_POINTS = (2, 5, 8, 11)  # shoulders and hips: the global scale cannot be had without them
NECK = 1


@dataclass
class Alignment:
    """What frame 0 against the reference gives; applied to every driving frame."""
    x_ratio: float
    y_ratio: float
    bone_ratios: list[float] = field(default_factory=list)
    offset: np.ndarray = field(default_factory=lambda: np.zeros(2))
    kept_bones: list[str] = field(default_factory=list)  # bones left at r = 1 (an end missing)


def bone_length(body: np.ndarray, bone: Bone) -> float:
    return ((body[bone.child][0] - body[bone.parent][0]) ** 2
            + (body[bone.child][1] - body[bone.parent][1]) ** 2) ** 0.5


def scale_ratios(reference: PoseKeypoints, first: PoseKeypoints) -> tuple[float, float]:
    """Shoulder-width ratio (x) and shoulder-to-hip height ratio (y), reference over frame 0."""
    ref, zero = reference.body, first.body
    x_ratio = (ref[5][0] - ref[2][0]) / (zero[5][0] - zero[2][0])
    ref_top, ref_bottom = 0.5 * (ref[2] + ref[5]), 0.5 * (ref[8] + ref[11])
    zero_top, zero_bottom = 0.5 * (zero[2] + zero[5]), 0.5 * (zero[8] + zero[11])
    y_ratio = (ref_bottom[1] - ref_top[1]) / (zero_bottom[1] - zero_top[1])
    return x_ratio, y_ratio


def rescale(pose: PoseKeypoints, x_ratio: float, y_ratio: float) -> None:
    for points in (pose.body, pose.face, pose.hands):
        points[..., 0] *= x_ratio
        points[..., 1] *= y_ratio


def stretch_bone(pose: PoseKeypoints, bone: Bone, ratio: float) -> None:
    """Move the child (and what hangs on it) so the bone is `ratio` times as long, in place."""
    shift = (pose.body[bone.child] - pose.body[bone.parent]) * (ratio - 1.0)
    pose.body[list(bone.moves)] += shift
    if bone.hand is not None:
        pose.hands[bone.hand] += shift


def translate(pose: PoseKeypoints, offset: np.ndarray) -> None:
    for points in (pose.body, pose.face, pose.hands):
        points += offset


def fit_alignment(reference: PoseKeypoints, first: PoseKeypoints, keep_missing_bones: bool = True
                  ) -> tuple[Alignment, PoseKeypoints]:
    """Measure the alignment on frame 0; returns it and frame 0 aligned (a new object)."""
    first = first.copy()
    x_ratio, y_ratio = scale_ratios(reference, first)
    alignment = Alignment(x_ratio, y_ratio)
    rescale(first, x_ratio, y_ratio)
    for bone in BONES:
        ends = (bone.parent, bone.child)
        missing = not (reference.body_visible[list(ends)].all() and first.body_visible[list(ends)].all())
        if keep_missing_bones and missing:
            ratio = 1.0
            alignment.kept_bones.append(f"{bone.parent}-{bone.child}")
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = bone_length(reference.body, bone) / bone_length(first.body, bone)
        alignment.bone_ratios.append(ratio)
        stretch_bone(first, bone, ratio)
    alignment.offset = reference.body[NECK] - first.body[NECK]
    translate(first, alignment.offset)
    return alignment, first


def apply_alignment(pose: PoseKeypoints, alignment: Alignment) -> PoseKeypoints:
    """One later driving frame, aligned as frame 0 was (a new object)."""
    pose = pose.copy()
    rescale(pose, alignment.x_ratio, alignment.y_ratio)
    for bone, ratio in zip(BONES, alignment.bone_ratios):
        stretch_bone(pose, bone, ratio)
    translate(pose, alignment.offset)
    return pose


def align_poses(reference: PoseKeypoints, frames: list[PoseKeypoints | None], keep_missing_bones: bool = True
                ) -> tuple[list[PoseKeypoints | None], Alignment]:
    """Driving poses (frame 0 first; None where no person was found) -> aligned poses."""
    if not frames or frames[0] is None:
        raise PoseError("The first driving frame has no pose: the alignment is measured on it; start the video on a "
                        "frame that shows the whole person.")
    alignment, first = fit_alignment(reference, frames[0], keep_missing_bones)
    return [first] + [None if pose is None else apply_alignment(pose, alignment) for pose in frames[1:]], alignment
