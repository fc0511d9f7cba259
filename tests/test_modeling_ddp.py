"""Data-parallel equivalence of the DeCLIP objective: one step on 2 CPU processes (gloo, DDP) with
batch B each gives the same loss terms, the same updated weights and the same memory bank as one
process with batch 2B. BatchNorm statistics are per process by design, so the comparison uses a
ViT image tower and puts the SimSiam heads' BatchNorm1d layers in eval mode."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import modeling_declip as md

B = 4  # per process


def _model():
    torch.manual_seed(0)
    model = md.build_model("tiny-vit", nn_size=32)
    model.train()
    model.projector.eval()
    model.predictor.eval()
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    n = 2 * B
    im1, im2 = torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)
    tok = torch.randint(1, 49406, (n, 10), generator=g)
    tok[:, 0], tok[:, -1] = md.SOT_ID, md.EOT_ID
    tok_aug = tok.flip(0).clone()
    labels = torch.full_like(tok, -100)
    labels[:3, 2] = tok[:3, 2]  # masked tokens only in rank 0's half: exercises the global MLM mean
    tok[:3, 2] = md.MASK_ID
    return im1, im2, tok, tok_aug, labels


def _worker(rank, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    local = tuple(t[rank * B:(rank + 1) * B] for t in _batch())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = ddp(local[0], local[2], local[1], local[3], local[4])
    out["loss"].backward()
    opt.step()
    terms = {k: v.detach().clone() for k, v in out.items() if k != "logit_scale"}
    for v in terms.values():
        dist.all_reduce(v)
        v /= 2
    if rank == 0:
        torch.save({"terms": terms, "params": {k: v.detach() for k, v in model.named_parameters()},
                    "bank": model.nn_bank.bank_state()}, path)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    path = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(_free_port(), path), nprocs=2, join=True)
    got = torch.load(path)

    model = _model()
    im1, im2, tok, tok_aug, labels = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model(im1, tok, im2, tok_aug, labels)
    out["loss"].backward()
    opt.step()

    for k in ("clip", "ss", "mlm", "nn", "loss"):
        assert torch.allclose(got["terms"][k], out[k].detach(), atol=1e-5), k
    for k, v in model.named_parameters():
        assert torch.allclose(got["params"][k], v.detach(), atol=1e-5, rtol=1e-4), k
    # the bank saw the captions of both processes, in global batch order
    assert torch.allclose(got["bank"]["bank"], model.nn_bank.bank, atol=1e-5)
    assert int(got["bank"]["ptr"]) == int(model.nn_bank.ptr) == 4 * B
