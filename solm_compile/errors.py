"""The one exception type for user mistakes.

A ``UserError`` is something the user can fix (a missing file, a flag out of range). The CLI prints its
message as one line and exits 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; ``str(err)`` is the whole message, one line, naming the file or flag."""
