"""bench/gpu_check.sh stays runnable: its --tiny mode runs every section on CPU with the demo shape."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_tiny_runs_every_section(tmp_path):
    """Every section of the GPU check runs and reports (no section error), and greedy rows equal PEFT's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
    env.update(OUT=str(tmp_path), GPU_CHECK_ROOT=str(tmp_path / "models"))
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not [k for k in report if k.endswith(("_error", "_skipped"))], {k: v for k, v in report.items()
                                                                           if k.endswith(("_error", "_skipped"))}
    for key in ("native_mixed", "native_base_only", "native_one_adapter_merged", "engine_alone_text_lines",
                "transformers_mixed", "worker_text_lines"):
        assert report[key]["complete"] and report[key]["tok_s"] > 0, (key, report[key])
    assert report["decode_probe_5_adapters"]["rows"] == 8
    assert report["peft_static_batch_64"]["tok_s"] > 0
    agreement = report["agreement_float32"]
    assert agreement["identical"] == f"{agreement['of']}/{agreement['of']}", agreement
    assert "| native tok/s" in r.stdout
