"""The one error type of datastore writing: a user-fixable problem, mapped by the CLI to exit code 2.

Each message names the problem and the fix, so the CLI only prints `error: <message>`.
"""

from __future__ import annotations


class DatastoreToolError(Exception):
    """Bad input or a failed datastore operation that the user can fix; the message says how."""
