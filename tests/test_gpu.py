"""CUDA checks (skipped without a GPU): the fast path (bf16 autocast, channels-last, fused AdamW,
batched views on the device) computes what the CPU fp32 path computes, and the loop runs on the GPU."""

import os

import pytest
import torch

import data_declip as dd
import modeling_declip as md
import train_declip as td

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batch(cfg, b=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g)
    tokens = torch.randint(1, 49406, (b, 12), generator=g)
    tokens[:, 0], tokens[:, -1] = md.SOT_ID, md.EOT_ID
    return images, tokens


@cuda
@pytest.mark.parametrize("preset", ["tiny", "tiny-vit"])
def test_bf16_channels_last_loss_on_gpu_matches_fp32_on_cpu(preset):
    torch.manual_seed(0)
    model = md.build_model(preset).eval()  # eval: BatchNorm uses running statistics on both devices
    cfg = model.config
    images, tokens = _batch(cfg)
    x = dd.eval_transform(images, cfg.image_size, cfg.image_mean, cfg.image_std)
    w = md.LossWeights(nn=0.0)
    ref = model(x, tokens, x.flip(-1), tokens, weights=w)["loss"].item()
    gpu = model.cuda()
    if cfg.vision == "resnet":
        gpu = gpu.to(memory_format=torch.channels_last)
    xg = x.cuda().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = gpu(xg, tokens.cuda(), xg.flip(-1), tokens.cuda(), weights=w)["loss"].item()
    assert abs(got - ref) / abs(ref) < 3e-2, (got, ref)


@cuda
def test_augmentation_and_masking_on_gpu_equal_cpu_for_the_same_generator():
    images, tokens = _batch(md.get_config("tiny"), 64)
    aug = dd.GpuAugment(32)
    a = aug(images, torch.Generator().manual_seed(3))
    b = aug(images.cuda(), torch.Generator().manual_seed(3)).cpu()
    assert torch.allclose(a, b, atol=1e-4)
    m1 = dd.mask_tokens(tokens, torch.Generator().manual_seed(1))
    m2 = dd.mask_tokens(tokens.cuda(), torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v.cpu()) for u, v in zip(m1, m2))


@cuda
@pytest.mark.skipif(not os.path.isdir(dd.fashion_mnist_dir()), reason="Fashion-MNIST not available")
def test_training_loop_runs_on_the_gpu(tmp_path):
    args = td.parse_args(td.build_parser(), ["--out-dir", str(tmp_path / "run"), "--max-steps", "20",
                                             "--batch-size", "256", "--log-every", "10", "--templates", "1"])
    summary = td.train(args)
    assert summary["steps"] == 20 and summary["eval"]["clean"]["n"] == 10000
    model = md.load_model(str(tmp_path / "run" / "model.safetensors"), device="cuda")
    assert next(model.parameters()).is_cuda


class _NoSyncWindow(td.Extension):
    """Turns CUDA's sync debug mode to "error" from the middle of step 2 (after its inputs are built)
    to the middle of step 3: everything a step does in between (forward, loss, backward, optimizer,
    clamp, metrics, then the next batch, views, masking and transfers) must not make the host wait."""

    def __init__(self):
        self.calls = 0

    def extend_batch(self, inputs, batch, generator):
        if self.calls == 1:
            torch.cuda.set_sync_debug_mode("error")
        elif self.calls == 2:
            torch.cuda.set_sync_debug_mode("default")
        self.calls += 1
        return inputs


@cuda
@pytest.mark.skipif(not os.path.isdir(dd.fashion_mnist_dir()), reason="Fashion-MNIST not available")
def test_a_poisoned_declip_training_step_never_waits_for_the_gpu(tmp_path):
    args = td.parse_args(td.build_parser(), ["--out-dir", str(tmp_path / "run"), "--max-steps", "4",
                                             "--batch-size", "64", "--log-every", "100", "--no-eval",
                                             "--poison-rate", "0.05"])
    try:
        summary = td.train(args, _NoSyncWindow())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert summary["steps"] == 4
