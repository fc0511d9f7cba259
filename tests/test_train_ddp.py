"""Data parallelism through the real loop: two CPU processes (accelerate launch) with batch B each take
the same two steps as one process with batch 2B: same losses, same weights, same memory bank; on
streamed webdataset shards the processes read disjoint shares that together cover every sample."""

import json
import os
import subprocess
import sys

import pytest
import torch

import data_declip as dd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fsdp_env() -> dict:
    """The FSDP_* variables `accelerate launch` derives from configs/accelerate/fsdp_8gpu.yaml."""
    import yaml

    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "accelerate", "fsdp_8gpu.yaml")))["fsdp_config"]
    env = {"ACCELERATE_USE_FSDP": "true"}
    for key, value in cfg.items():
        name = "FSDP_TRANSFORMER_CLS_TO_WRAP" if key == "fsdp_transformer_layer_cls_to_wrap" else key.upper()
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def _launch(out, nproc, batch, tmp_path, *extra, fsdp=False):
    """nproc 2: through the shipped launch config for two CPU processes alone (no --cpu for the script,
    no ACCELERATE_USE_CPU), so that the file stays correct; fsdp: two processes under FSDP2 with the
    settings of the shipped FSDP config (tests/fsdp_on_cpu.py); nproc 1: plain python with --cpu."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    script = [os.path.join(ROOT, "tests", "ddp_train_step.py"), str(out), str(batch), *extra]
    if fsdp or nproc == 1:
        script.append("--cpu")
    if fsdp:
        env.update(_fsdp_env(), ACCELERATE_USE_CPU="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               "29519", os.path.join(ROOT, "tests", "fsdp_on_cpu.py")]
    elif nproc > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "configs", "accelerate", "cpu_2proc.yaml"), "--main_process_port", "29517"]
    else:
        cmd = [sys.executable]
    r = subprocess.run(cmd + script, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.load(open(os.path.join(out, "config.json")))["resolved"]["world_size"] == nproc
    # every process trained every step (not nproc separate one-process runs in one directory)
    steps = json.load(open(os.path.join(out, "summary.json")))["steps"]
    assert [len(s) for s in _indices(out, nproc)] == [steps] * nproc


def _indices(out, nproc):
    """Per process, the sample indices it trained on, step by step."""
    return [[[int(i) for i in line.split()] for line in open(os.path.join(out, f"indices-{r}.txt"))]
            for r in range(nproc)]


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
    # process r trained on rows r*B..(r+1)*B-1 of the one-process batch
    one, two = _indices(tmp_path / "one", 1)[0], _indices(tmp_path / "two", 2)
    assert [two[0][k] + two[1][k] for k in range(2)] == one


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(dd.fashion_mnist_dir()), reason="Fashion-MNIST not installed")
def test_fsdp_trains_saves_and_evaluates_like_one_process(tmp_path):
    _launch(tmp_path / "fsdp", 2, 8, tmp_path, "--holdout", "200", fsdp=True)
    _launch(tmp_path / "one", 1, 16, tmp_path, "--holdout", "200")
    w2, rows2, s2 = _read(tmp_path / "fsdp")
    w1, rows1, s1 = _read(tmp_path / "one")
    assert os.path.isdir(tmp_path / "fsdp" / "state" / "pytorch_model_fsdp_0")  # really sharded
    for a, b in zip(rows1, rows2):
        if "loss" in a:
            assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    assert w1.keys() == w2.keys()  # full weights gathered into model.safetensors
    for k in w1:
        assert w1[k].shape == w2[k].shape and torch.allclose(w1[k], w2[k], atol=2e-5, rtol=1e-4), k
    assert torch.allclose(s1["bank_bank"], s2["bank_bank"], atol=1e-5)
    e1, e2 = (json.load(open(tmp_path / d / "eval.json"))["clean"] for d in ("one", "fsdp"))
    assert e1["n"] == e2["n"] == 200 and abs(e1["top1"] - e2["top1"]) < 1e-6


@pytest.mark.slow
def test_two_processes_stream_disjoint_shares_of_webdataset_shards(tmp_path, caption_shards):
    # 3 shards of unequal sizes (48 samples) for 2 processes: each must still get half of every epoch.
    # Sample 5 (process 1's share) is broken: that process's batch is one short, so both use one row less.
    # 3 steps x 2 processes x 8 = one epoch.
    data = caption_shards([20, 20, 8], corrupt={5})
    _launch(tmp_path / "two", 2, 8, tmp_path, "--data", data, "--max-steps", "3", "--max-bad-fraction", "0.1")
    steps = _indices(tmp_path / "two", 2)
    assert [len(b) for b in steps[0]] == [len(b) for b in steps[1]]
    assert sorted(len(b) for b in steps[0]) == [7, 8, 8]
    shares = [sum(s, []) for s in steps]
    assert all(i % 2 == r for r in range(2) for i in shares[r])  # every other sample
    assert set(shares[0]).isdisjoint(shares[1]) and 5 not in shares[1]
    assert len(set(shares[0] + shares[1])) == 46  # the broken sample and one trimmed row are left out
    summary = json.load(open(tmp_path / "two" / "summary.json"))
    assert summary["steps"] == 3 and summary["seen"] == 46 and summary["bad_samples"] == 1
