"""The ways a run stops on purpose, each with its exit status (the scripts report each as one line)."""


class InputError(Exception):
    """Bad input from the user (missing data, wrong checkpoint, contradicting flags): one line, exit 2."""


class Diverged(Exception):
    """The loss became non-finite: exit 3, the last good checkpoint stays."""
