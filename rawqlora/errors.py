"""The one exception type for problems with what the user gave us.

Library code raises `BadInput` with a message that says what was wrong and what to do;
the command-line tools print that message as one line on stderr and exit with code 2.
Anything else that escapes is a bug in rawqlora and keeps its traceback.
"""


class BadInput(Exception):
    """A problem with the user's input (a path, a flag, a file's contents)."""
