"""Exception and warning classes for user-facing problems (bad files, bad options, doubtful data).

The command line turns a :class:`SpotfitInputError` into a one-line message
and a non-zero exit status, without a traceback; when the error names a
Python parameter (``parameter``), the command line names its option instead
(``sigma`` -> ``--sigma``).  Anything else is a bug.
"""


class SpotfitInputError(ValueError):
    """A user-facing input problem; the message names the file or parameter.

    Parameters
    ----------
    message : str
        One line.  When it is about a parameter of the Python API, it
        starts with that parameter's name (``"sigma must be > 0 ..."``);
        other parameters it names are quoted with backticks (```gain```),
        which the command line replaces by their options.
    parameter : str, optional
        The Python parameter the message is about (e.g. ``"sigma"``), so
        that the command line can name its option instead.
    """

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter

    def __reduce__(self):  # keep ``parameter`` across processes (batch workers)
        return type(self), (str(self), self.parameter)


class SpotfitWarning(UserWarning):
    """Results were computed, but the input makes them doubtful (one line each)."""
