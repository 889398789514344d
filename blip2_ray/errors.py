"""User errors: a bad path, key, input or request gets one clear sentence, not a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """An error the user can fix; its message is one sentence naming the thing and the fix."""


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a job's `main`: a UserError (a ConfigError is one) prints `error: <sentence>` and exits 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return int(rc or 0)

    return wrapper
