"""One exception type for problems the user can fix: the CLI prints its message as one line and exits non-zero."""


class RecoError(Exception):
    """A problem with input, configuration or a service, with a message that says what to fix."""


class NotFound(RecoError):
    """A named memory, version or item does not exist."""


class TransientError(RecoError):
    """A store or database hiccup worth retrying (the Celery task retries with backoff)."""
