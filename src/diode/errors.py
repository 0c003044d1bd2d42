"""The project's one error type for bad input.

Every problem a user can cause (missing file, malformed dataset, unknown name, out-of-range flag)
is raised as `DiodeError` with a one-line message naming the file or key and the problem; the CLI
prints it on stderr and exits with code 2, without a traceback.
"""


class DiodeError(ValueError):
    """Bad input: the message is one line that names the problem."""
