"""bench_declip.py measures real training steps and reports consistent figures (no timing asserts)."""

import json

import pytest

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


def test_loader_benchmark_times_the_training_loader_on_generated_jpeg_photos(tmp_path, capsys):
    from PIL import Image

    photos = tmp_path / "photos"
    argv = ["--cpu", "--steps", "1", "--warmup", "1", "--batch-size", "8", "--precisions", "fp32", "--loader",
            "--loader-images", "24", "--loader-workers", "0", "1", "--loader-dir", str(photos)]
    rows = bench.main(argv)
    loader = [r for r in rows if r["mode"].startswith("loader-")]
    assert [(r["mode"], r["workers"]) for r in loader] == [("loader-clip", 0), ("loader-clip", 1),
                                                           ("loader-declip", 0), ("loader-declip", 1)]
    for r in loader:  # one pass: 3 whole batches of 8, the first untimed
        assert r["images"] == 24 and r["loader_img_s"] > 0
        assert abs(r["per_worker_img_s"] - r["loader_img_s"] / max(1, r["workers"])) <= 0.1
    sizes = [Image.open(p).size for p in sorted(photos.glob("*.jpg"))]
    assert len(sizes) == 24 and all(224 <= s <= 500 for wh in sizes for s in wh)
    assert Image.open(photos / "00000.jpg").format == "JPEG"
    printed = capsys.readouterr().out
    assert "wrote 24 JPEG photos" in printed and printed.count("the loader needs") == 2
    bench.main(argv[:-2] + ["--loader-dir", str(photos), "--modes", "clip"])  # a directory with meta.jsonl is reused
    assert "wrote" not in capsys.readouterr().out


@pytest.mark.slow
def test_open_clip_comparison_trains_open_clips_own_rn50_beside_ours(capsys):
    import open_clip

    # the comparison is of the same architecture: open_clip's RN50 image tower has our rn50's parameters
    ours = md.build_model("rn50").visual
    theirs = bench.open_clip_model("rn50").visual
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert isinstance(bench.open_clip_model("vitb32"), open_clip.model.CLIP)
    rows = bench.main(["--cpu", "--presets", "rn50", "--modes", "clip", "--steps", "1", "--warmup", "0",
                       "--batch-size", "2", "--precisions", "fp32", "--compare-open-clip"])
    row = next(r for r in rows if r["mode"] == "clip-vs-open_clip")
    assert row["preset"] == "rn50" and row["batch"] == 2 and row["open_clip_img_s"] > 0

    def consistent(ratio, ours, theirs):  # ratio of the unrounded figures; each figure is rounded to 0.1
        return (ours - 0.05) / (theirs + 0.05) - 1e-3 <= ratio <= (ours + 0.05) / (theirs - 0.05) + 1e-3

    assert consistent(row["ratio"], row["ours_img_s"], row["open_clip_img_s"])
    assert consistent(row["eval_ratio"], row["ours_eval_img_s"], row["open_clip_eval_img_s"])
    assert "rn50 CLIP fp32 batch 2: train ours" in capsys.readouterr().out
