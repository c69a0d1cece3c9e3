"""DeepSpeed's CPU shared-memory all-reduce leaves a 69 MB /dev/shm file per rank behind;
ds-distil's process-group set-up unlinks them once every rank has mapped them.

Without that, each multi-rank CPU run leaked ranks x 69 MB of RAM until reboot (a full
test suite filled 19 GB of /dev/shm on a 24 GB machine).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env
from ds_distil.distributed import free_port

PROBE = Path(__file__).resolve().parent / "dist_probe.py"


@pytest.mark.distributed
def test_two_ranks_leave_no_shared_memory_buffer_behind(tmp_path):
    port = free_port()
    leftovers = lambda: sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))  # noqa: E731
    assert leftovers() == []
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(PROBE),
                           "--out", str(tmp_path)],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Both ranks ran the all-reduce through the shared-memory path...
    assert len((tmp_path / "ranks.jsonl").read_text().splitlines()) == 2
    assert "deepspeed_shm_comm" in proc.stdout + proc.stderr
    # ... and neither left its buffer.
    assert leftovers() == []
