"""The one exception type that entry points turn into a one-line message and exit code 2."""


class DareError(Exception):
    """A user-facing error: bad option, missing file, incompatible run. No traceback is shown."""
