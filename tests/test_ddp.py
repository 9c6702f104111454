"""Real DDP over gloo on CPU: every rank sees the all-reduced gradient, so the state is the same everywhere and
equals the single-process run over the same global batches."""

import json
import os
import socket
import subprocess
import sys

import pytest

_RANK_VARIABLES = {
    "LOCAL_RANK",
    "NODE_RANK",
    "WORLD_SIZE",
    "GLOBAL_RANK",
    "GROUP_RANK",
    "RANK",
    "MASTER_PORT",
    "LOCAL_WORLD_SIZE",
    "PL_GLOBAL_SEED",
}
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_run.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, devices: int, batch_size: int) -> list[dict]:
    out = str(tmp_path / f"d{devices}")
    for _attempt in range(3):  # another process may grab the free port between the check and the bind
        # a Trainer earlier in this process may have left its rank variables behind: the child must start clean
        base = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
        env = {
            **base,
            "PL_DISABLE_FORK": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "OMP_NUM_THREADS": "1",
        }
        proc = subprocess.run(
            [sys.executable, SCRIPT, out, str(devices), str(batch_size)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        if "EADDRINUSE" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = []
    for rank in range(devices):
        with open(f"{out}.rank{rank}") as f:
            records.append(json.load(f))
    return records


def test_ddp_ranks_agree_and_match_one_process(tmp_path):
    ddp = _run(tmp_path, devices=2, batch_size=8)  # 2 ranks x 8 samples = the global batch of 16
    single = _run(tmp_path, devices=1, batch_size=16)[0]
    assert ddp[0]["seen"] == ddp[1]["seen"] == single["seen"] == 6
    assert ddp[0]["ema"] == ddp[1]["ema"]
    assert ddp[0]["weights"] == ddp[1]["weights"]
    assert ddp[0]["ema"] == pytest.approx(single["ema"], rel=1e-5)
    assert ddp[0]["weights"] == pytest.approx(single["weights"], rel=1e-4, abs=1e-6)
