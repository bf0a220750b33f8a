"""Errors the engine raises for its caller's mistakes (bad model reference, invalid plan, bad option).

They carry a message that says what to fix; the CLI prints it as one line and the service maps it to a 4xx
or a non-retryable job error.
"""


class HippError(Exception):
    """Base class: the caller can fix this by changing its input."""

    code = "invalid_input"


class ModelNotFoundError(HippError):
    code = "model_not_found"


class UnsupportedModelError(HippError):
    code = "unsupported_model"


class ModelNotLoadableError(HippError):
    """The model was found but cannot be loaded as it is (missing or broken files, a processor that cannot be
    built here): retrying will fail the same way, so the service does not retry it."""

    code = "model_not_loadable"


class PlanError(HippError):
    code = "invalid_plan"


class OptionError(HippError):
    code = "invalid_option"
