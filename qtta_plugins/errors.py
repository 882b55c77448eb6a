"""Errors that name the problem."""


class QttaError(Exception):
    """Base of qtta-plugins' own errors."""


class UnknownMethodError(QttaError, ValueError):
    """No installed plugin provides the named method."""


class UnknownBackendError(QttaError, ValueError):
    """No installed plugin adapts the named backend, or recognises the model."""


class BadBatchError(QttaError, ValueError):
    """A batch that cannot be adapted on (shape, dtype, NaN / Inf, empty)."""


class BackendNotInstalledError(QttaError, ImportError):
    """The backend's package is missing; the message names the pip extra."""
