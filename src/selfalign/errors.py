"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class SelfAlignError(Exception):
    """Base class: the message alone must tell the user what is wrong and where."""


class ConfigError(SelfAlignError):
    """A configuration file or ``--set`` override is invalid."""


class DataError(SelfAlignError):
    """An input data file is malformed; the message names the file, line and field."""


class ModelError(SelfAlignError):
    """A model spec cannot be resolved to local weights."""


class EngineError(SelfAlignError):
    """Generation failed for good (after any retries)."""


class RunError(SelfAlignError):
    """A run directory cannot be opened or resumed as asked."""


class TrainingError(SelfAlignError):
    """A training run in a child process (isolated or under ``accelerate launch``) failed."""
