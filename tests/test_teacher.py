"""The teacher as the trainer sees it: submit_score returns a future; the service's calls
run on a thread of their own, the in-process teacher's when and where they are asked for."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from student_trainer.config import TeacherConfig
from student_trainer.teacher import RemoteTeacher, TeacherOutage
from student_trainer.train import Trainer
from teacher_client import ScoreOptions
from teacher_service import scoring
from teacher_service.backend_api import ScoreItem
from tests.trainer_helpers import in_process, small_config


class GatedClient:
    """Stands in for TeacherClient: score() blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.gate, self.threads, self.closed = threading.Event(), [], False

    def score(self, sequences, score_from, options, *, candidates=None):
        self.threads.append(threading.current_thread())
        if not self.gate.wait(timeout=30):
            raise TimeoutError("the gate never opened")
        if options.top_k == -1:
            raise ValueError("top_k = -1")
        return [f"scored {list(s)} from {n}" for s, n in zip(sequences, score_from)]

    def close(self) -> None:
        self.closed = True


def test_the_remote_teacher_scores_on_its_own_thread_while_the_caller_goes_on():
    client = GatedClient()
    teacher = RemoteTeacher(client)
    future = teacher.submit_score([[1, 2, 3]], [1], ScoreOptions(top_k=4))
    assert not future.done()  # submit returned while the call is still in flight
    client.gate.set()
    assert future.result(timeout=30) == ["scored [1, 2, 3] from 1"]
    assert client.threads[0] is not threading.current_thread()
    assert future.latency_s > 0
    failing = teacher.submit_score([[1, 2]], [1], ScoreOptions(top_k=-1))
    with pytest.raises(ValueError, match="top_k = -1"):
        failing.result(timeout=30)
    teacher.close()
    assert client.closed


def test_the_in_process_teacher_scores_when_asked_in_the_asking_thread(backend, sequences):
    teacher = in_process(backend)
    calls = []
    real = teacher.teacher.score

    def spying(*args, **kwargs):
        calls.append(threading.current_thread())
        return real(*args, **kwargs)

    teacher.teacher.score = spying
    future = teacher.submit_score(sequences[:2], [1, 1], ScoreOptions(top_k=3))
    assert calls == [] and not future.done()  # nothing computed yet
    results = future.result()
    assert calls == [threading.current_thread()] and future.done()
    assert future.result() is results and len(calls) == 1  # computed once
    assert future.latency_s > 0
    direct = real(sequences[:2], [1, 1], ScoreOptions(top_k=3))
    for got, expected in zip(results, direct):
        np.testing.assert_array_equal(got.topk_logprobs, expected.topk_logprobs)


def test_the_in_process_teacher_scores_in_its_own_dtype_under_the_students_autocast(
    backend, sequences
):
    """The trainer takes a micro-batch's scores inside the student's autocast (bf16): the
    in-process teacher's log-probs are still those the service computes, in float32."""
    teacher = in_process(backend)
    options = ScoreOptions(top_k=3, full=True)
    plain = teacher.submit_score(sequences[:2], [1, 1], options).result()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        asked = teacher.submit_score(sequences[:2], [1, 1], options)
        under_autocast = asked.result()
        # the control: the same forward, autocast reaching it, gives other numbers
        item = ScoreItem(torch.tensor(sequences[0]), 1, scoring.ScoreOptions.from_client(options))
        reached = backend.score_batch([item]).scores[0]
    for got, expected in zip(under_autocast, plain):
        np.testing.assert_array_equal(got.full_logprobs, expected.full_logprobs)
        np.testing.assert_array_equal(got.topk_ids, expected.topk_ids)
    assert not np.array_equal(reached.full_logprobs.float().numpy(), plain[0].full_logprobs)


def test_in_process_scoring_counts_as_not_hidden(tmp_path, student_model_dir, backend):
    """Its time is all spent in the loop's own thread: latency, all of it waited for."""
    trainer = Trainer(small_config(tmp_path, student_model_dir), teacher=in_process(backend))
    record = trainer.train_step()
    trainer.close()
    assert record["teacher_latency_s"] > 0 and record["hidden_fraction"] == 0.0
    assert record["teacher_wait_s"] >= record["teacher_latency_s"]


def test_an_outage_names_the_teacher_sections_address_or_model_and_its_timeout(tmp_path):
    remote = TeacherConfig(address="teacher:50051", timeout_s=45)
    cause = "Score failed with UNAVAILABLE:\n  failed to connect"  # gRPC's details: 2 lines
    said = str(TeacherOutage(remote, cause, 44.5))
    assert said.startswith(
        f"the teacher service at {remote.address} did not answer within teacher.timeout_s "
        f"({remote.timeout_s:g} s; the call gave up after 44.5 s): "
        f"{' '.join(cause.split())}; no checkpoint was written"
    )
    local = TeacherConfig(in_process=str(tmp_path))
    said = str(TeacherOutage(local, "Score failed"))
    assert f"at {tmp_path} did not answer within teacher.timeout_s ({local.timeout_s:g} s)" in said
