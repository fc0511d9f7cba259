"""Data parallelism through the real loop: two CPU processes (accelerate launch) with batch B each take
the same two steps as one process with batch 2B: same losses, same weights, same memory bank."""

import json
import os
import subprocess
import sys

import pytest
import torch

import data_declip as dd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(out, nproc, batch, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--main_process_port", "29517", "--mixed_precision", "no",
               "--dynamo_backend", "no"]
    else:
        cmd = [sys.executable]
    r = subprocess.run(cmd + [os.path.join(ROOT, "tests", "ddp_train_step.py"), str(out), str(batch)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def _read(out):
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    state = torch.load(os.path.join(out, "state", "custom_checkpoint_0.pkl"), weights_only=False)
    return load_file(os.path.join(out, "model.safetensors")), rows, state


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(dd.fashion_mnist_dir()), reason="Fashion-MNIST not installed")
def test_two_processes_train_like_one_process_with_the_concatenated_batch(tmp_path):
    _launch(tmp_path / "two", 2, 8, tmp_path)
    _launch(tmp_path / "one", 1, 16, tmp_path)
    w2, rows2, s2 = _read(tmp_path / "two")
    w1, rows1, s1 = _read(tmp_path / "one")
    for a, b in zip(rows1, rows2):
        for k in ("clip", "nn", "loss"):
            assert abs(a[k] - b[k]) < 1e-4, (k, a[k], b[k])
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-5, rtol=1e-4), k
    # the bank holds every process's captions, in global batch order, on every process
    assert torch.allclose(s1["bank_bank"], s2["bank_bank"], atol=1e-5)
    assert int(s1["bank_ptr"]) == int(s2["bank_ptr"]) == 2 * 2 * 16
    assert s2["seen"] == s1["seen"] == 32
