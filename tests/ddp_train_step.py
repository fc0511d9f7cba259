"""Two DeCLIP training steps through train_declip.train (further arguments are appended), launched by
tests/test_train_ddp.py with 1 or 2 processes. Augmentation is the deterministic evaluation view and MLM is off, so the per-process
random draws (a function of the rank) cannot differ between the two launches; EDA is seeded per
sample and stays on. The tiny ViT has no BatchNorm and the SimSiam heads are off (weight 0). Adam's
eps is large so that gradients that are zero up to rounding (the attention key bias) are not blown up
to full-size updates by Adam's normalisation."""

import os
import sys

import data_declip as dd
import train_declip as td


class FixedViews(td.Extension):
    """Deterministic views; writes the sample indices each process trained on to OUT/indices-RANK.txt."""
    name = "ddp-check"

    def setup(self, accelerator, model, args, dataset):
        self.path = os.path.join(args.out_dir, f"indices-{accelerator.process_index}.txt")

    def extend_batch(self, inputs, batch, generator):
        with open(self.path, "a") as f:
            f.write(" ".join(str(i) for i in batch["index"][:len(inputs["tokens"])].tolist()) + "\n")
        return inputs

    @staticmethod
    def augment(images, generator, trigger=None, poison_mask=None, sizes=None):
        return dd.eval_transform(images, 32, dd.IMAGENET_MEAN, dd.IMAGENET_STD)


def main():
    out, batch, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    evaluate = "--holdout" in extra  # evaluate on the held-out slice; no evaluation otherwise
    args = td.parse_args(td.build_parser(), [
        "--model", "tiny-vit", "--w-ss", "0", "--w-mlm", "0", "--batch-size", batch, "--max-steps", "2",
        "--lr", "5e-3", "--warmup-steps", "0", "--eps", "1e-3", "--precision", "no", "--log-every", "1",
        "--save-every", "0", "--out-dir", out, *([] if evaluate else ["--no-eval"]), *extra])
    td.train(args, FixedViews())
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo ranks occasionally abort at interpreter exit after all work is done (DESIGN.md)
    os._exit(0)


if __name__ == "__main__":
    main()
