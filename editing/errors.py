"""The one exception type of a user's mistake on the command line."""


class UserError(Exception):
    """A problem with the command's input: printed as one line, exit status 2."""
