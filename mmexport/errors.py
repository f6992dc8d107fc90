"""Exceptions that the CLI's single error boundary turns into exit codes.

UserError: the user asked for something that cannot be done (bad recipe name, missing file, a prompt
longer than the context, a corrupt artifact); one line on stderr, exit 2.
VerificationFailed: the exported model does not answer like the original; exit 1.
"""


class UserError(Exception):
    exit_code = 2


class VerificationFailed(Exception):
    exit_code = 1


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so `finally` blocks remove temporary files."""

    exit_code = 143


class PromptTooLong(UserError):
    """The prompt does not fit the build's context (the server answers OpenAI's context_length_exceeded)."""
