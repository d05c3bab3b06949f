"""The single exception type of the data pipeline."""


class DataError(Exception):
    """Bad or inconsistent input or prepared data; the message names the file (and field) at fault."""
