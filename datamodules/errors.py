"""The suite's one-line data error, importable without the data pipeline's dependencies (nibabel, torch)."""


class DataError(Exception):
    """Bad input data. The message is one line naming the file and what to do; the CLI prints it without a traceback."""
