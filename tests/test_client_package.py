"""The client distribution alone: installed into a venv of its own (`make client-venv`,
`pip install ./teacher-client[tokenizers]`, no torch), it scores against a running service,
and what it decodes equals an in-process forward of the same model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import reference_logprobs

ROOT = Path(__file__).resolve().parents[1]
CLIENT_PYTHON = ROOT / ".cache" / "client-venv" / "bin" / "python"
HEAVY = ("torch", "transformers", "fastapi", "teacher_service", "student_trainer")
TOP_K = 5

CLIENT_SCRIPT = """
import asyncio, json, sys
from teacher_client import AsyncTeacherClient, LocalTokenizer, TeacherClient

address, model_dir = sys.argv[1], sys.argv[2]
sequences, heavy, top_k = map(json.loads, sys.argv[3:])
tokenizer = LocalTokenizer.from_dir(model_dir)
out = {}
with TeacherClient(address, timeout=60) as client:
    client.wait_until_serving(timeout=30)
    out["model_id"] = client.check_tokenizer(tokenizer).model_id
    for dtype in ("float32", "float16", "bfloat16"):
        results = client.score(sequences, 2, top_k=top_k, dtype=dtype)
        out[dtype] = [
            {"target": r.target_logprobs.tolist(), "topk_ids": r.topk_ids.tolist(),
             "topk": r.topk_logprobs.tolist(), "numpy_dtype": str(r.target_logprobs.dtype)}
            for r in results
        ]
    generated = client.generate([sequences[0]], max_new_tokens=4, temperature=0.0)
    out["greedy"] = generated[0].token_ids


async def score_async():
    async with AsyncTeacherClient(address, timeout=60) as client:
        results = await client.score(sequences, 2, top_k=top_k)
        return [r.target_logprobs.tolist() for r in results]

out["async"] = asyncio.run(score_async())
out["heavy_modules"] = sorted({m.split(".")[0] for m in sys.modules} & set(heavy))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def from_client_venv(server, tiny_model_dir, sequences) -> dict:
    if not CLIENT_PYTHON.exists():
        pytest.fail(f"{CLIENT_PYTHON} is missing: run `make test` (or `make client-venv`)")
    completed = subprocess.run(
        [
            str(CLIENT_PYTHON),
            "-c",
            CLIENT_SCRIPT,
            server.address,
            str(tiny_model_dir),
            json.dumps(sequences),
            json.dumps(HEAVY),
            json.dumps(TOP_K),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd="/",  # nothing from the checkout on sys.path: only what the venv installed
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_the_client_venv_has_no_torch_transformers_or_fastapi_installed():
    listed = subprocess.run(
        [str(CLIENT_PYTHON), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "teacher-client" in installed
    assert not installed & {"torch", "transformers", "fastapi", "teacher-service"}


def test_the_client_alone_imports_nothing_heavy_while_scoring(from_client_venv):
    assert from_client_venv["heavy_modules"] == []


def test_the_handshake_without_transformers_accepts_the_teachers_tokenizer(
    from_client_venv, tiny_model_dir
):
    assert from_client_venv["model_id"] == tiny_model_dir.name


def test_the_client_alone_decodes_what_an_in_process_forward_computes(
    from_client_venv, backend, sequences
):
    for result, ids in zip(from_client_venv["float32"], sequences):
        reference = reference_logprobs(backend, ids)[1:-1]  # rows predicting tokens 2..L-1
        target = reference.gather(1, torch.tensor(ids[2:]).unsqueeze(1)).squeeze(1)
        np.testing.assert_allclose(result["target"], target.numpy(), atol=1e-5)
        top, top_ids = reference.topk(TOP_K, dim=-1)
        np.testing.assert_allclose(result["topk"], top.numpy(), atol=1e-5)
        assert result["topk_ids"] == top_ids.tolist()
        assert result["numpy_dtype"] == "float32"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_decodes_without_torch_to_the_rounded_float32_values(
    from_client_venv, dtype
):
    """Both come back as the float32 values rounded to the dtype (bfloat16 widened exactly)."""
    for half, full in zip(from_client_venv[dtype], from_client_venv["float32"]):
        rounded = torch.tensor(full["target"]).to(getattr(torch, dtype)).float().numpy()
        np.testing.assert_array_equal(np.asarray(half["target"], dtype=np.float32), rounded)
        expected = "float16" if dtype == "float16" else "float32"
        assert half["numpy_dtype"] == expected


def test_the_async_client_alone_agrees_with_the_blocking_one(from_client_venv):
    blocking = [r["target"] for r in from_client_venv["float32"]]
    assert from_client_venv["async"] == blocking


def test_the_client_alone_generates_what_the_model_decodes_greedily(
    from_client_venv, backend, sequences
):
    ids = list(sequences[0])
    for _ in range(4):
        with torch.inference_mode():
            logits = backend.model(torch.tensor([ids])).logits[0, -1, : backend.vocab_size]
        ids.append(int(logits.argmax()))
        if ids[-1] in backend.eos_ids:
            break
    assert from_client_venv["greedy"] == ids[len(sequences[0]) :]
