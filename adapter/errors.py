"""Errors the pack raises on purpose: each message says what is wrong and what to do."""


class IDAnimatorError(Exception):
    """Base class: anything the user can fix (a wrong file, an image with no face...)."""


class CheckpointError(IDAnimatorError, ValueError):
    """A weights file that is not a valid ID-Animator (or CLIP vision) checkpoint."""


class NoFaceError(IDAnimatorError, ValueError):
    """No usable face in the given image(s)."""


class PoseError(IDAnimatorError, ValueError):
    """Pose extraction cannot go on: no person in the reference or in the first driving frame, a
    body part the alignment needs is not visible, or a DWPose ONNX file of the wrong kind."""


class TrainingError(IDAnimatorError, ValueError):
    """Bad training input: a missing or unreadable video, a wrong model file, an empty dataset."""


class MissingFileError(CheckpointError, FileNotFoundError):
    """A model file that is not there: a CheckpointError, and a FileNotFoundError for callers
    that handle missing files as OSErrors."""
