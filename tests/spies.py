"""Test doubles shared by several test files (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations


class Dies:
    """Wraps a backend, records what it is asked, and raises (like a kill) on its n-th batch."""

    def __init__(self, inner, die_at: int = -1) -> None:
        self.inner, self.die_at, self.batches, self.asked = inner, die_at, 0, []
        self.kind, self.simulated = inner.kind, inner.simulated

    def identity(self):
        return self.inner.identity()

    def generate(self, reqs):
        self.batches += 1
        if self.batches == self.die_at:
            raise KeyboardInterrupt("killed")
        self.asked += reqs
        return self.inner.generate(reqs)

    def close(self):
        pass
