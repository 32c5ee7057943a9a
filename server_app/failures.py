"""When a round shows the federation itself is broken, so the run stops instead of going on empty.

One node failing only drops that node. The run stops when no node replied, when every reply is an
error, or when most of the nodes asked sent back the same error (a shared cause: the data, the
configuration, the model), with that error's own line as the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

MOST = 0.5  # the same error from more than this share of the nodes asked stops the run


class FederationError(RuntimeError):
    """The federation cannot go on; the message is the one-line reason."""


def round_failure(
    kind: str, server_round: int, asked: int, errors: Sequence[str], replied: int
) -> str | None:
    """Why this round shows the federation is broken, or None when it may go on.

    ``asked`` nodes were sent a ``kind`` message; ``replied`` answered, ``errors`` holds the one-line
    error of each reply that was an error.
    """
    if asked == 0:
        return None
    if replied == 0:
        return (
            f"round {server_round}: none of the {asked} nodes asked to {kind} replied within "
            "strategy.round-timeout; raise it, or check that the nodes are running"
        )
    if not errors:
        return None
    line, count = Counter(errors).most_common(1)[0]
    if len(errors) == replied or count > MOST * asked:
        who = "every node" if count == asked else f"{count} of {asked} nodes"
        return f"round {server_round}: {who} failed to {kind}: {line}"
    return None
