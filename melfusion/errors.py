"""Errors the engine raises on purpose; callers map them to exit codes or HTTP statuses."""


class MelFusionError(Exception):
    """Base class of the engine's deliberate errors."""


class InputError(MelFusionError, ValueError):
    """A request the engine cannot serve; `field` names the offending input."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class BundleError(MelFusionError):
    """A model bundle that is unknown, incomplete, corrupt or inconsistent; the message names the piece."""


class GenerationCancelled(MelFusionError):
    """Raised between steps when the caller's cancel check says stop."""
