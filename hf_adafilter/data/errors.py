"""The error every data check raises."""


class DataError(ValueError):
    """Bad input data; the message names the column, file or label at fault and how to fix it."""
