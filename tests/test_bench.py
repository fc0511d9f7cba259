"""bench_declip.py measures real training steps and reports consistent figures (no timing asserts)."""

import json

import bench_declip as bench
import modeling_declip as md


def test_benchmark_rows_carry_the_model_flops_and_a_consistent_mfu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench.main(["--cpu", "--steps", "1", "--warmup", "1", "--batch-size", "8", "--precisions", "fp32",
                       "--peak-tflops", "1.0", "--profile", "--json", str(out)])
    assert json.load(open(out)) == rows
    assert [(r["mode"], r["precision"]) for r in rows] == [("clip", "fp32"), ("declip", "fp32")]
    cfg = md.get_config("tiny")
    for r in rows:
        flops = md.estimate_flops(cfg, r["mode"], training=True, text_len=cfg.context_length)["total"]
        assert r["gflop_per_img"] == round(flops / 1e9, 3)
        assert r["train_img_s"] > 0 and r["eval_img_s"] > 0
        # MFU = FLOPs per image x images/s / peak (1 TFLOP/s here)
        assert abs(r["mfu"] - 100 * r["train_img_s"] * flops / 1e12) < 0.05 + 1e-3 * r["mfu"]
    printed = capsys.readouterr().out
    assert "DeCLIP/CLIP time per image" in printed
    assert printed.count("-- profile: tiny") == 2 and "aten::" in printed
