"""Errors for user mistakes: the CLI prints them as one clear line, never a traceback."""


class FedrankError(Exception):
    """Base class for every error caused by input, data or configuration."""


class DataFormatError(FedrankError, ValueError):
    """A data file is malformed; the message names the file, line and what was expected."""


class ConfigError(FedrankError, ValueError):
    """A configuration key or value is invalid; the message names the key."""


class ScoreTableError(FedrankError, ValueError):
    """Teacher scores are missing, stale or do not match the local example sets."""


class CheckpointError(FedrankError, ValueError):
    """A checkpoint or exported model is corrupt, truncated or incompatible."""


class OutputError(FedrankError, OSError):
    """An output path cannot be written as asked (a device, a directory, a link loop)."""
