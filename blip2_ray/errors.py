"""The error type of every user mistake: a bad path, key, input or resource request gets one clear
sentence, not a traceback. A job's `main` prints it as `error: <sentence>` and exits 2
(`runtime.cli.cli_main`); raised inside a Ray worker, `runtime.user_errors` carries it to the driver.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message is one sentence naming the thing and the fix."""
