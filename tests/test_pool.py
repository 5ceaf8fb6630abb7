"""A pool of teacher replicas: calls spread over them, a replica killed mid-run costs the
trainer nothing (every step once, the same losses as against one healthy replica), and a
replica that comes back gets calls again."""

from __future__ import annotations

import json
import time

import pytest

from student_trainer.train import Trainer, train
from teacher_client import TeacherClient
from teacher_client.pool import channel_target
from tests.replicas import Replica
from tests.trainer_helpers import small_config


@pytest.fixture
def replicas(tiny_model_dir):
    pool = [Replica(tiny_model_dir).start() for _ in range(2)]
    yield pool
    for replica in pool:
        if replica.process.poll() is None:
            replica.kill()


def test_pool_targets():
    assert channel_target("127.0.0.1:5001") == ("127.0.0.1:5001", False)
    assert channel_target("127.0.0.1:1, 127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", True)
    assert channel_target(["localhost:7"])[1] is False
    assert channel_target("dns:///teacher-headless:50051") == (
        "dns:///teacher-headless:50051",
        True,
    )
    with pytest.raises(ValueError, match="expected host:port"):
        channel_target("127.0.0.1:1,nohost")


def test_a_replica_killed_mid_run_changes_nothing(
    replicas, student_model_dir, tmp_path, monkeypatch
):
    first, second = replicas
    pool = f"{first.address},{second.address}"
    steps = 6
    original_step = Trainer.train_step

    def step_then_kill(self):
        record = original_step(self)
        if self.step == 2:
            first.kill()  # the next calls routed to it fail and are retried on the other
        return record

    monkeypatch.setattr(Trainer, "train_step", step_then_kill)
    overrides = [f"optim.steps={steps}", "run.save_every=0"]
    survived = train(small_config(tmp_path / "pool", student_model_dir, *overrides,
                                  f"teacher.address={pool}"))  # fmt: skip
    monkeypatch.setattr(Trainer, "train_step", original_step)
    assert first.process.poll() is not None and survived.steps == steps
    logged = [json.loads(x) for x in (tmp_path / "pool" / "metrics.jsonl").open()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, steps + 1))  # once each
    healthy = train(small_config(tmp_path / "one", student_model_dir, *overrides,
                                 f"teacher.address={second.address}"))  # fmt: skip
    assert survived.losses == pytest.approx(healthy.losses, rel=1e-5, abs=1e-7)


def test_calls_spread_and_a_returning_replica_is_used_again(replicas, sequences):
    first, second = replicas
    with TeacherClient([first.address, second.address], timeout=30) as client:
        for _ in range(8):
            client.score(sequences, 1, top_k=3)
        assert first.requests() >= 2 and second.requests() >= 2  # round robin
        first.kill()
        for _ in range(4):
            client.score(sequences, 1, top_k=3)  # all on the survivor
        first.start()  # same port: the channel reconnects to it after its backoff (<= 5 s)
        deadline = time.monotonic() + 30
        while first.requests() == 0 and time.monotonic() < deadline:
            client.score(sequences, 1, top_k=3)
            time.sleep(0.05)
        assert first.requests() > 0


def test_aged_connections_are_replaced_without_failing_a_call(tiny_model_dir, backend, sequences):
    """--max-connection-age-s: the server closes each connection after that long (this is
    what makes dns:/// clients re-resolve and find new replicas); calls carry on unharmed."""
    from tests.conftest import start_background_server

    server = start_background_server(
        tiny_model_dir, backend, max_connection_age_s=0.3, grace_seconds=2.0
    )
    try:
        with TeacherClient(server.address, timeout=30) as client:
            states = []
            client._channel.subscribe(states.append)
            expected = client.score(sequences, [1] * len(sequences), top_k=4)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                results = client.score(sequences, [1] * len(sequences), top_k=4)
                assert [r.topk_ids.tolist() for r in results] == [
                    r.topk_ids.tolist() for r in expected
                ]
            # READY, then IDLE once the server sent GOAWAY, then READY again: reconnected
            ready = [i for i, state in enumerate(states) if state.name == "READY"]
            assert len(ready) >= 2, states
    finally:
        server.stop()
