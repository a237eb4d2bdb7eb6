"""The one base class of errors a user can fix: a bad config, data file, model folder,
reward function, run folder or cluster request.

Every such error names the file, row, field, key, worker or URL at fault and what was
expected. The CLI prints a ``UserError`` as one line and exits non-zero; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message tells the user what to change. Caught by the CLI."""
