"""Errors the pack raises on purpose: each message says what is wrong and what to do."""


class IDAnimatorError(Exception):
    """Base class: anything the user can fix (a wrong file, an image with no face...)."""


class CheckpointError(IDAnimatorError, ValueError):
    """A weights file that is not a valid ID-Animator (or CLIP vision) checkpoint."""


class NoFaceError(IDAnimatorError, ValueError):
    """No usable face in the given image(s)."""


class TrainingError(IDAnimatorError, ValueError):
    """Bad training input: a missing or unreadable video, a wrong model file, an empty dataset."""


class MissingFileError(CheckpointError, FileNotFoundError):
    """A model file that is not there: a CheckpointError, and a FileNotFoundError for callers
    that handle missing files as OSErrors."""
