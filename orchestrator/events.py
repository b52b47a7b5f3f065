"""What the supervisor reports (started, healthy, exited, restarted, members, ...), as it keeps,
streams and prints them. Apart from the supervisor so that `nbdfabric events` prints them without
loading it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    time: float
    node: str
    kind: str
    message: str

    def __str__(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time))
        who = f"{self.node}: " if self.node else ""
        return f"{stamp} {who}{self.kind}{': ' + self.message if self.message else ''}"
