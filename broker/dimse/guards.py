"""The DIMSE lock-out guards' counts, shared by every process listening on the DIMSE port.

With `dimse_receivers` > 0 the serving process and N receiver processes accept on one port
(SO_REUSEPORT). Each keeps its own counts for itself, but the limits are the node's: the
per-address connection cap and `dimse_max_associations` hold for all processes together, not N
times over. Dividing the limits by the process count would not do: the kernel spreads connections
by a hash of their addresses, so one host's eight connections may all land on one process.

Layout: one row per process (row 0 the serving process, row i receiver i) in an unlocked
shared-memory array. A process writes only its own row and reads all rows: a process killed with
SIGKILL cannot leave a lock held, and its row is zeroed by the supervisor before its successor
starts. The price of no lock: two processes admitting a connection in the same microsecond may
both see room for one, so a limit can be exceeded by at most the number of processes, briefly.

Addresses are counted in buckets (a CRC of the address, the same in every process; Python's
`hash` is salted per process): two addresses in one bucket share their cap, rare at 4,096 buckets
against the dozens of peers a node has.
"""

from __future__ import annotations

import zlib
from multiprocessing.sharedctypes import RawArray
from typing import Any

BUCKETS = 4096
# Per row: open connections, associations served since start (for tests and logs), the pid that
# is listening (0: not yet), then the per-address buckets.
_OPEN, _SERVED, _PID, _FIRST_BUCKET = 0, 1, 2, 3
_ROW = _FIRST_BUCKET + BUCKETS


class SharedCounts:
    """Rows of connection counts in shared memory; pass it to a spawned process as an argument."""

    def __init__(self, rows: int, array: Any = None) -> None:
        self.rows = rows
        self._a = array if array is not None else RawArray("q", rows * _ROW)

    def __reduce__(self) -> tuple[Any, ...]:
        return (SharedCounts, (self.rows, self._a))

    @staticmethod
    def bucket(ip: str) -> int:
        return zlib.crc32(ip.encode()) % BUCKETS

    def at_address(self, ip: str) -> int:
        """Connections `ip` holds open on all processes."""
        b = _FIRST_BUCKET + self.bucket(ip)
        return sum(self._a[r * _ROW + b] for r in range(self.rows))

    def open_elsewhere(self, row: int) -> int:
        """Connections open on the other processes."""
        return sum(self._a[r * _ROW + _OPEN] for r in range(self.rows) if r != row)

    def opened(self, row: int, ip: str) -> None:
        base = row * _ROW
        self._a[base + _OPEN] += 1
        self._a[base + _SERVED] += 1
        self._a[base + _FIRST_BUCKET + self.bucket(ip)] += 1

    def closed(self, row: int, ip: str) -> None:
        base = row * _ROW
        self._a[base + _OPEN] = max(0, self._a[base + _OPEN] - 1)
        b = base + _FIRST_BUCKET + self.bucket(ip)
        self._a[b] = max(0, self._a[b] - 1)

    def open_on(self, row: int) -> int:
        """Connections open on row `row`'s process now."""
        return int(self._a[row * _ROW + _OPEN])

    def served(self, row: int) -> int:
        """Connections row `row`'s process has accepted (since its row was last cleared)."""
        return int(self._a[row * _ROW + _SERVED])

    def set_listening(self, row: int, pid: int) -> None:
        self._a[row * _ROW + _PID] = pid

    def listening(self, row: int) -> int:
        """The pid of the process listening as `row` (0: none yet)."""
        return int(self._a[row * _ROW + _PID])

    def clear(self, row: int) -> None:
        """Forget a dead process's counts (the supervisor, before starting its successor)."""
        base = row * _ROW
        for i in range(_ROW):
            self._a[base + i] = 0
