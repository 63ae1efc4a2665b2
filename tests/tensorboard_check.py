#!/usr/bin/env python3
"""CTest `tensorboard_reader`: TensorBoard's own event reader reads every
scalar that `vitlab train` writes with train.tensorboard, with the values of
metrics.jsonl and metrics.csv, and a run stopped and resumed has each step
once. Exits 77 (CTest: skipped) where tensorboard is not installed.

  tensorboard_check.py VITLAB_BINARY
"""
import csv
import json
import os
import struct
import subprocess
import sys
import tempfile

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    print(f"skipped: tensorboard is not installed for {sys.executable} (scripts/install-deps.sh installs it)")
    sys.exit(77)

TINY = ["--set", "model.name=vit_tiny_patch16_224", "--set", "model.img_size=28", "--set", "model.patch_size=7",
        "--set", "model.in_chans=1", "--set", "model.embed_dim=32", "--set", "model.depth=2", "--set",
        "model.num_heads=2", "--set", "aug.mean=[0.5]", "--set", "aug.std=[0.5]", "--set", "aug.auto_augment=''",
        "--set", "train.batch_size=16", "--set", "data.train_limit=160", "--set", "data.workers=1",
        "--set", "train.epochs=2", "--set", "train.ema=true", "--set", "train.tensorboard=true",
        "--set", "train.log_interval=2", "--threads", "1"]


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def main():
    vitlab = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        subprocess.run([vitlab, "train", *TINY, "--stop-after", "1", "--out", run], check=True)
        subprocess.run([vitlab, "train", *TINY, "--resume", "--out", run], check=True)
        acc = EventAccumulator(run, size_guidance={"scalars": 0})
        acc.Reload()
        got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

        expected = {"train/loss": [], "train/lr": []}
        with open(os.path.join(run, "metrics.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                if row["step"] % 2 == 0:
                    expected["train/loss"].append((row["step"], f32(row["loss"])))
                    expected["train/lr"].append((row["step"], f32(row["lr"])))
        # metrics.csv rounds to 4-6 decimals: the event's float32 must round to it.
        with open(os.path.join(run, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        epoch_steps = [s for s, _ in got["eval/top1"]]
        columns = {"train/epoch_loss": "train_loss", "eval/loss": "eval_loss", "eval/top1": "eval_top1",
                   "eval/top5": "eval_top5", "eval_ema/loss": "ema_eval_loss", "eval_ema/top1": "ema_eval_top1",
                   "eval_ema/top5": "ema_eval_top5"}
        failures = []
        if sorted(got) != sorted([*expected, *columns]):
            failures.append(f"tags {sorted(got)}, expected {sorted([*expected, *columns])}")
        for tag, points in expected.items():
            if got.get(tag) != points:
                failures.append(f"{tag}: {got.get(tag)} != metrics.jsonl's {points}")
        if len(rows) != 2 or len(epoch_steps) != 2:
            failures.append(f"{len(rows)} epochs in metrics.csv, {len(epoch_steps)} eval events")
        for tag, column in columns.items():
            for (step, value), row in zip(got.get(tag, []), rows):
                if column not in row:
                    failures.append(f"metrics.csv has no column {column}: {list(row)}")
                    break
                if abs(value - float(row[column])) > 1e-4 * max(1.0, abs(value)):
                    failures.append(f"{tag} at step {step}: {value} != metrics.csv's {row[column]}")
        for tag, points in got.items():
            steps = [s for s, _ in points]
            if steps != sorted(set(steps)):
                failures.append(f"{tag}: steps repeat or go back after the resume: {steps}")
        if failures:
            print("\n".join(failures))
            sys.exit(1)
        print(f"tensorboard_reader: {sum(len(p) for p in got.values())} scalars in {len(got)} tags read back")


if __name__ == "__main__":
    main()
