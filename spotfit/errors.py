"""Exception raised for user mistakes (bad files, bad options).

The command line turns a :class:`SpotfitInputError` into a one-line message
and a non-zero exit status, without a traceback.  Anything else is a bug.
"""


class SpotfitInputError(ValueError):
    """A user-facing input problem; the message names the file or option."""
