"""The base of vlkit's user-facing errors: the CLI prints their message without a traceback."""


class VlkitError(Exception):
    """An error caused by input (a config, a file, a checkpoint) whose message says how to fix it."""


class DataNotFoundError(VlkitError, FileNotFoundError):
    """A data file or folder is missing; the message names it and the layout that was expected."""


class DataFormatError(VlkitError, ValueError):
    """A data file exists but does not hold what its format promises; the message names it."""


class CompressError(VlkitError, ValueError):
    """Bad input to a compression command (a key's value, a calibration source, an output folder)."""
