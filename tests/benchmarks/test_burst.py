"""benchmarks/burst.py against the real server and the floor app: stalled uploads get their 408 from the
server within body_timeout_s plus a little, never from the floor app, and the probe keeps answering."""

from __future__ import annotations

import asyncio
from pathlib import Path

from benchmarks.burst import burst
from benchmarks.null_model import make_null_model
from benchmarks.server_process import FloorAppProcess, ServerProcess

BODY_TIMEOUT_S = 1.0


def test_a_small_burst_is_answered_408_by_the_server_and_probes_keep_answering(tmp_path: Path) -> None:
    model_dir = make_null_model(tmp_path / "null")
    env = {"EAD_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}
    with ServerProcess(model_dir, log_path=tmp_path / "server.log", env=env) as server:
        result = asyncio.run(burst(server.url, clients=50, hold_s=BODY_TIMEOUT_S + 5))
    assert result["statuses"] == {"408": 50}
    assert BODY_TIMEOUT_S <= result["answer_max_s"] < BODY_TIMEOUT_S + 3
    assert result["probe_count"] > 5 and result["probe_failures"] == 0

    with FloorAppProcess(model_dir, log_path=tmp_path / "floor.log") as floor:
        result = asyncio.run(burst(floor.url, clients=20, hold_s=1.0))
    assert result["statuses"] == {"None": 20}  # the floor app waits for the rest of the body forever
    assert result["probe_failures"] == 0
