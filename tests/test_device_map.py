"""Teachers larger than one GPU: `--device-map` loads the model with accelerate's placement.

This machine has one device, the CPU, so the split here is CPU + disk offload: the layers
that live on "disk" sit on the meta device until accelerate's hooks load them for their
forward, and the embedding's and output layer's devices come from those hooks, not from
their weights. Every path (rows, shared prefixes, packing, every position's logits,
sampling, the service) must give what a plain load of the same directory gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from causal_lm.sampling import SamplingOptions, new_generator
from teacher_client import TeacherClient
from teacher_service import cli
from teacher_service.backend import HFBackend
from teacher_service.config import ServerConfig
from teacher_service.server import BackgroundServer, load_backend
from tests.test_scored_rows import ATOL, check_against_whole_forwards, mixed_items, variant

# alternate: the embedding and the output layer offloaded too, so their devices can only
# come from accelerate's hooks (their weights are on the meta device)
SPLIT = {
    "model.embed_tokens": "disk",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def device_map_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("device-map") / "map.json"
    path.write_text(json.dumps(SPLIT))
    return path


@pytest.fixture(scope="module")
def split(tiny_model_dir: Path, device_map_file: Path) -> HFBackend:
    return HFBackend.load(tiny_model_dir, device_map=str(device_map_file))


def test_the_device_map_really_splits_the_model_and_its_load_time_checks_pass(split):
    model = split.model
    assert model.hf_device_map == SPLIT
    assert hasattr(model.model.layers[1], "_hf_hook")  # accelerate dispatches the forward
    assert model.lm_head.weight.device.type == "meta"  # loaded from disk for each forward
    assert model.model.embed_tokens.weight.device.type == "meta"
    assert split.device == split.body.device == torch.device("cpu")  # the hooks' device
    assert split.rows_only and split.share_prefixes and split.pack


@pytest.mark.parametrize(
    "flags",
    [
        {"share_prefixes": True},
        {"share_prefixes": False},  # packed
        {"share_prefixes": False, "pack": False},  # padded
        {"rows_only": False, "share_prefixes": False},  # every position's logits
    ],
    ids=["rows+shared", "rows+packed", "rows+padded", "all-logits"],
)
def test_a_split_model_scores_what_a_single_device_load_scores(backend, split, flags):
    on_one, across = variant(backend, **flags), variant(split, **flags)
    items = mixed_items(backend.vocab_size, seed=7)
    expected, got = on_one.score_batch(items), across.score_batch(items)
    for a, b in zip(got.scores, expected.scores):
        for name in ("target_logprobs", "topk_logprobs", "candidate_logprobs", "full_logprobs"):
            if getattr(b, name) is not None:
                torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=ATOL, rtol=0)
        assert torch.equal(a.topk_ids, b.topk_ids)
        assert torch.equal(a.target_ranks, b.target_ranks)
    # the same path ran (prefixes shared, rows packed), and it is right on its own terms
    assert got.forward_tokens == expected.forward_tokens
    check_against_whole_forwards(backend, items, got.scores)


def test_a_split_model_samples_what_a_single_device_load_samples(backend, split):
    prompts = [[1, 5, 9, 30], [1, 7], [1, 300, 2, 41, 8]]
    for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (0.8, 0.9)):
        options = SamplingOptions(10, temperature, top_p, seed=3, stop_at_eos=False)
        drawn = [
            b.generate(prompts, options, new_generator(options, b.device)) for b in (split, backend)
        ]
        assert drawn[0] == drawn[1]
    # and the token sampled after a scored sequence, from the scoring forward
    items = mixed_items(backend.vocab_size, seed=8)
    options = SamplingOptions(1, temperature=1.0, seed=5)
    nexts = []
    for scorer in (split, backend):
        for item in items:
            item.sample_next = (options, new_generator(options, scorer.device))
        nexts.append([s.next_token_id for s in scorer.score_batch(items).scores])
    assert nexts[0] == nexts[1]


def test_the_service_serves_a_split_model_as_it_serves_a_single_device_one(
    tiny_model_dir, backend, split, sequences
):
    config = ServerConfig(model=str(tiny_model_dir), port=0, max_wait_ms=2.0)
    results = []
    for served in (split, backend):
        with BackgroundServer(config, served) as server, TeacherClient(server.address) as client:
            scores = client.score(sequences, 2, top_k=8, candidates=[3, 4, 50])
            completions = client.generate(sequences[:3], max_new_tokens=6, seed=11)
            results.append((scores, [c.token_ids for c in completions], client.info().device))
    (split_scores, split_tokens, device), (scores, tokens, _) = results
    for a, b in zip(split_scores, scores):
        for name in ("target_logprobs", "topk_logprobs", "candidate_logprobs"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=ATOL, rtol=0)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    assert split_tokens == tokens
    assert device == "cpu"


def serve_config(monkeypatch, *flags: str) -> ServerConfig:
    """The ServerConfig `teacher-service serve FLAGS` builds (serving itself stubbed out)."""
    built = []
    monkeypatch.setattr("teacher_service.server.serve", built.append)
    cli.main(["serve", *flags])
    return built[0]


def test_the_device_map_flag_reaches_the_config_and_the_loaded_model(
    monkeypatch, tiny_model_dir, device_map_file
):
    config = serve_config(
        monkeypatch, "--model", str(tiny_model_dir), "--device-map", str(device_map_file)
    )
    assert config.device_map == str(device_map_file) and config.device == "auto"
    assert load_backend(config).model.hf_device_map == SPLIT
    plain = serve_config(monkeypatch, "--model", str(tiny_model_dir))
    assert plain.device_map == ""


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device-map", "auto", "--device", "cpu"], "with --device cpu"),
        (["--device-map", "auto", "--device", "cuda:1"], "with --device cuda:1"),
        (
            ["--device-map", "auto", "--backend", "openai", "--upstream", "http://x"],
            "--device-map places a local model",
        ),
        (["--device-map", "{missing}"], "neither auto, balanced, sequential nor a file"),
        (["--device-map", "{not_json}"], "not JSON"),
        (["--device-map", "{a_list}"], "must hold a JSON object of module name -> device"),
    ],
    ids=[
        "with-device-cpu",
        "with-device-cuda",
        "with-a-remote-backend",
        "missing",
        "not-json",
        "a-list",
    ],
)
def test_serve_refuses_a_bad_device_map_naming_the_flags(
    monkeypatch, tiny_model_dir, tmp_path, capsys, flags, message
):
    monkeypatch.setattr("teacher_service.server.serve", load_backend)  # load, never serve
    paths = {"missing": tmp_path / "nope.json", "not_json": tmp_path / "x.json"}
    paths["a_list"] = tmp_path / "list.json"
    paths["not_json"].write_text("{model.layers.0: 0")
    paths["a_list"].write_text('["cpu"]')
    flags = [flag.format(**paths) for flag in flags]
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--model", str(tiny_model_dir), *flags])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "--device-map" in error
