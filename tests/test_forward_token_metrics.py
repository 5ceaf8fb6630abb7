"""The forward tokens /metrics counts are what the service's own batches ran, as the backend
returns them with the scores: padding included, and nothing that another caller of the same
backend ran meanwhile (an in-process teacher sharing the model, say)."""

from __future__ import annotations

import threading

import pytest
import torch

from teacher_client import TeacherClient
from teacher_service.backend_api import ScoreItem
from teacher_service.scoring import ScoreOptions
from tests.conftest import start_background_server
from tests.test_http_native import metric
from tests.test_scored_rows import variant


class SharedBackend:
    """The served backend, which another caller in this process also scores with: while
    each of the service's batches runs, a second thread scores `others` on the same backend,
    and that batch's call returns only after both have finished. `batches`: the forward
    lengths of every batch the service ran."""

    def __init__(self, backend, others: list[ScoreItem]) -> None:
        self._backend = backend
        self.others = others
        self.batches: list[list[int]] = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def score_batch(self, items):
        self.batches.append([item.forward_len for item in items])
        beside = threading.Thread(target=self._backend.score_batch, args=(self.others,))
        beside.start()
        try:
            return self._backend.score_batch(items)
        finally:
            beside.join()


def test_metrics_count_what_the_services_padded_forwards_ran_and_not_a_concurrent_callers(
    tiny_model_dir, backend, sequences
):
    padded = variant(backend, share_prefixes=False, pack=False)  # rows x the longest
    others = [ScoreItem(torch.tensor(ids * 3), 1, ScoreOptions()) for ids in sequences]
    shared = SharedBackend(padded, others)
    # no warm-up: every forward of this backend through the service is a request's
    running = start_background_server(
        tiny_model_dir, shared, http_port=0, max_wait_ms=2.0, warm_up=False
    )
    try:
        with TeacherClient(running.address, timeout=60) as client:
            client.score(sequences, 1, top_k=3)
            client.score(sequences[1:3], 2, top_k=3)
        computed = metric(running.http_url, "teacher_tokens_computed_total")
        fractions = metric(running.http_url, "teacher_batch_padding_fraction_sum")
        forwards = metric(running.http_url, "teacher_batch_padding_fraction_count")
    finally:
        running.stop()
    assert len(shared.batches) >= 2
    positions = [len(lengths) * max(lengths) for lengths in shared.batches]  # rows x width
    padding = [ran - sum(lengths) for ran, lengths in zip(positions, shared.batches)]
    assert computed == sum(positions)
    assert forwards == len(shared.batches)
    assert fractions == pytest.approx(sum(p / ran for p, ran in zip(padding, positions)))
    assert any(padding)  # the sequences' lengths differ: padding was counted, and is exact
