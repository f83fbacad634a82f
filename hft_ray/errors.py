"""Errors a user can fix: the command line prints them and exits 2, without a traceback."""


class UserError(ValueError):
    """Bad input (pipeline file, data, model, arguments). The message names every problem:
    the key, the value given and what would be valid."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
