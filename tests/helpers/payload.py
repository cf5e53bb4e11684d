"""A harmless pickle payload: unpickling ``Payload(marker)`` creates the file ``marker``.

Tests of loaders that must never run code pickle one into an input and check afterwards that
``marker`` does not exist.
"""

from __future__ import annotations

import os


class Payload:
    """Pickles as ``open(marker, "w")``: the file appears if and only if something unpickled it
    with an unrestricted unpickler."""

    def __init__(self, marker: str | os.PathLike) -> None:
        self.marker = os.fspath(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


REFUSED = f"{open.__module__}.{open.__qualname__}"  # the global a Payload pickle references
