"""What the command-line tools (train.py, merge.py, generate.py) share: one-line errors.

A user mistake (`BadInput`, an unknown flag, a missing file) becomes one line on stderr
and exit code 2; `--debug` keeps the full traceback for bug reports.
"""

import argparse
import sys

from rawqlora.errors import BadInput


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit code 2, like every other bad input."""

    def error(self, message):
        raise BadInput(message)


def run(main, argv=None):
    """Call `main(argv)` and turn `BadInput` into `error: ...` on stderr with exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        return main(argv)
    except BadInput as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
