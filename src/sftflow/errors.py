"""The one exception type for mistakes a user can fix (bad config, bad data, missing files)."""


class SftflowError(Exception):
    """A user-fixable error. The CLI prints its message without a traceback.

    Messages say what is wrong, where (file, row, key) and how to fix it.
    """
