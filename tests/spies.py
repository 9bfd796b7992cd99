"""Test doubles and launch helpers shared by several test files (pytest puts tests/ on sys.path)."""

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


def two_process_launch(module_args: list[str]) -> list[str]:
    """`accelerate launch` of ``python -m eval.icl_end2end ...`` with 2 CPU processes on a free port
    (run it with CUDA_VISIBLE_DEVICES="")."""
    import socket
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            "-m", "eval.icl_end2end", *module_args]
