"""Errors that name the problem."""

import pickle


class QttaError(Exception):
    """Base of qtta-plugins' own errors."""


class UnknownMethodError(QttaError, ValueError):
    """No installed plugin provides the named method."""


class UnknownBackendError(QttaError, ValueError):
    """No installed plugin adapts the named backend, or recognises the model."""


class BadBatchError(QttaError, ValueError):
    """A batch that cannot be adapted on (shape, dtype, NaN / Inf, empty)."""


class SmallBatchError(BadBatchError):
    """A batch with fewer samples than the method needs (one image for a method that normalises
    with, or aligns, the statistics of the test batch); the message names the batch size and what
    to use instead (``adapt(..., window=N)``)."""


class BackendNotInstalledError(QttaError, ImportError):
    """The backend's package is missing; the message names the pip extra."""


class UnsafeStateError(QttaError, pickle.UnpicklingError):
    """A saved state that holds objects only arbitrary unpickling could rebuild: refused unless
    the caller says the file is trusted (:meth:`qtta_plugins.Adaptation.load`)."""
