"""Schemathesis fuzzes the public API of a real server (local Ray, a tiny bundle)
from its own /openapi.json, with every check: no 5xx, status codes, content types and
bodies as declared, schema-invalid bodies refused, schema-valid ones accepted
(tests/schemathesis.toml and tests/schemathesis_hooks.py say how)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coinfer import Bundle, Code, build_model, encode

from .conftest import local_ray_server

pytestmark = pytest.mark.ray

TESTS = Path(__file__).resolve().parent
# a small input (4 numbers, batches of at most 4) keeps the generated bodies small and quick
ARCH = {"name": "mlp", "kwargs": {"in_features": 4, "hidden": [8], "num_classes": 3}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("schemathesis")
    torch.manual_seed(0)
    models = [build_model(ARCH) for _ in range(2)]
    code = Code(2, 1)
    coded = encode(models, code, torch.randn(32, 4), method="average")
    path = tmp_path_factory.mktemp("fuzz-bundle")
    Bundle(ARCH, code, models, list(coded), (4,), ["a", "b", "c"], coded.info).save(path)
    with local_ray_server(path, timeout_s=5.0, max_batch=4, max_body_bytes=100_000) as srv:
        yield srv


def test_schemathesis_finds_no_problem_in_the_public_api(server, tmp_path):
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert exe, "schemathesis is in the dev extra: pip install -e '.[dev]'"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(TESTS)}
    cmd = [
        exe,
        "--config-file",
        str(TESTS / "schemathesis.toml"),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "30",
        "--seed",
        "0",
        "--workers",
        "2",
        "--report-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "No issues found" in out, out[-6000:]
    assert "/v1/predict" in out or "4 selected" in out
    # the fuzzer's valid inputs really reached the workers
    assert 'coinfer_requests_total{mode="' in server.runtime.metrics.render()
