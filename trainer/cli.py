"""What the command-line tools do with bad input: one line on stderr that names the problem (the flag,
field, file:line and the numbers are in the error's message), exit status 2, no traceback.

Bad input is a `configs.release.ConfigError` (a config value or flag) or a `data.errors.DataError` (a
file); any other exception is a bug and keeps its traceback. Wrap an absl `main` with `exits_on_bad_input`.
"""
import functools
import sys

from configs.release import ConfigError
from data.errors import DataError

BAD_INPUT = (ConfigError, DataError)
BAD_INPUT_STATUS = 2


def exits_on_bad_input(main):
    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except BAD_INPUT as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(BAD_INPUT_STATUS)
    return wrapped
