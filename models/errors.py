"""The project's one exception root, and the numeric layer's errors.

Every error sketchstream raises on purpose derives from :class:`SketchstreamError`, so a caller
can catch the project's errors without catching bugs. Each layer adds one-line subclasses.
"""

__all__ = [
    "ArtifactError",
    "ModelError",
    "NotFittedError",
    "SketchstreamError",
]


class SketchstreamError(Exception):
    """Root of every error sketchstream raises deliberately."""


class ModelError(SketchstreamError, ValueError):
    """Bad input to the numeric layer: a shape, a value or a configuration it cannot use."""


class NotFittedError(ModelError):
    """An estimator was used before ``fit``."""


class ArtifactError(SketchstreamError):
    """An artifact is missing, unreadable, tampered with or of an unknown format version."""
