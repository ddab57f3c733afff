"""What the command-line tools do with bad input and with library logs.

Bad input gets one line on stderr that names the problem (the flag, field, file:line and the numbers
are in the error's message), exit status 2, no traceback; `--traceback` (defined here, so every tool
that imports this module has it) shows the traceback. Bad input is a `configs.release.ConfigError` (a
config value or flag), a `data.errors.DataError` (a file) or absl's `app.UsageError`; any other
exception is a bug and keeps its traceback. Library logs (Orbax's, absl's) stay at warnings unless
`--verbosity` is given (absl would show INFO). Wrap an absl `main` with `exits_on_bad_input`, and pass
`parse_flags` as `app.run`'s `flags_parser`: it answers a flag absl cannot parse (unknown, malformed, a
required one missing) as bad input and sets the verbosity.
"""

import functools
import sys

from absl import app, flags, logging

from configs.release import ConfigError
from data.errors import DataError

BAD_INPUT = (ConfigError, DataError, app.UsageError)
BAD_INPUT_STATUS = 2

_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "On bad input, raise the error with its traceback instead of printing one line."
)


def _refuse(error: Exception):
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(BAD_INPUT_STATUS)


def exits_on_bad_input(main):
    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except BAD_INPUT as error:
            if _TRACEBACK.value:
                raise
            _refuse(error)

    return wrapped


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a flag it cannot parse answered as bad input, and logs at warnings
    unless --verbosity (or a set_verbosity before app.run) says otherwise; -> the remaining argv."""
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:
        if "--traceback" in argv:
            raise
        _refuse(error)
    if flags.FLAGS["verbosity"].using_default_value:
        logging.set_verbosity(logging.WARNING)
    return remaining
