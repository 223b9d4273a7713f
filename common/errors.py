"""User-facing errors and the command-line wrapper that prints them in one line.

Every module raises a subclass of `UserError` for problems the user can fix (a bad path,
a bad config key, a checkpoint of the wrong kind). `run_cli` turns those into a single
line on stderr and exit code 2, with no traceback; anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


class ConfigError(UserError):
    pass


class CheckpointError(UserError):
    pass


class AudioError(UserError):
    pass


def run_cli(main: Callable[[], object]) -> None:
    """Run `main()`; a UserError becomes 'error: <message>' on stderr and exit code 2."""
    try:
        result = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


def umask_mode(directory: bool = False) -> int:
    """The mode a new file (0666) or folder (0777) gets under the process umask: what a temporary file, created
    0600/0700 for safety, should have once it is renamed into place."""
    import os
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask
