"""The one exception a user can cause; the CLIs print its message and exit with code 2."""


class KoGPT2Error(Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""
