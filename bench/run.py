#!/usr/bin/env python3
"""`make bench`: vitlab beside timm (PyTorch eager, and as a stretch row
torch.compile) on this machine, in one run.

Each row runs `vitlab bench` and bench/torch_bench.py alternately (A B A B ...),
each a fresh process with the same threads, batch and steps; the table gives
the medians of images/s and the median of the pairs' ratios. The Python side
runs in the bench environment (scripts/install-deps.sh --bench: torch,
torchvision and timm from PyPI). The section of docs/BENCHMARKS.md between
the `make bench` markers is rewritten.

  bench/run.py [--reps 3] [--threads N] [--quick] [--only SUBSTRING] [--doc docs/BENCHMARKS.md]
  bench/run.py --kernels [--reps 3] [--threads N]

--kernels measures instead what each of vitlab's own CPU kernels gains over
LibTorch's own ops in the same binary: `vitlab bench` with the kernels
against VITLAB_CPU_KERNELS=0 (and the caching allocator against glibc's
malloc), alternating, into the section between the `make bench kernels`
markers.
"""
import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"
KERNELS_BEGIN, KERNELS_END = "<!-- make bench kernels: begin -->", "<!-- make bench kernels: end -->"

# label, `vitlab bench` arguments, the environment that switches the kernel off.
NO_KERNELS = {"VITLAB_CPU_KERNELS": "0"}
# Any glibc.malloc tunable leaves malloc as configured (common/runtime.h);
# perturb=0 is glibc's default, so this changes nothing else.
NO_ALLOCATOR = {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}
KERNEL_ROWS = [
    ("attention kernel (against matmul + softmax): vit_small_patch16_224 inference keeping the maps, as "
     "`vitlab analyze`", ["--model", "vit_small_patch16_224", "--mode", "infer", "--batch", "32", "--steps", "4",
                          "--warmup", "1", "--attention"], NO_KERNELS),
    ("re-attention (fused Functions, head mixing): deepvit_patch16_224_re_attn_16b training",
     ["--model", "deepvit_patch16_224_re_attn_16b", "--mode", "train", "--batch", "32", "--steps", "3", "--warmup",
      "1"], NO_KERNELS),
    ("re-attention (mixed apply): deepvit_patch16_224_re_attn_16b inference",
     ["--model", "deepvit_patch16_224_re_attn_16b", "--mode", "infer", "--batch", "32", "--steps", "4", "--warmup",
      "1"], NO_KERNELS),
    ("caching allocator: vit_small_patch16_224 training",
     ["--model", "vit_small_patch16_224", "--mode", "train", "--batch", "32", "--steps", "4", "--warmup", "1"],
     NO_ALLOCATOR),
    ("caching allocator: vit_small_patch16_224 inference",
     ["--model", "vit_small_patch16_224", "--mode", "infer", "--batch", "32", "--steps", "6", "--warmup", "2"],
     NO_ALLOCATOR),
]

# configs/fashion_mnist_vit.yaml's model (average pooling, no class token).
FMNIST_MODEL = ["model.img_size=28", "model.patch_size=4", "model.in_chans=1", "model.embed_dim=64",
                "model.depth=6", "model.num_heads=4", "model.mlp_ratio=2", "model.num_classes=10",
                "model.class_token=false", "model.global_pool=avg"]


def rows(quick):
    s = 2 if quick else 1  # fewer steps with --quick
    return [
        # label, preset, --set keys, mode, batch, steps, warmup, torch.compile on the Python side
        ("vit_tiny_patch16_224 train", "vit_tiny_patch16_224", [], "train", 32, 6 // s, 2, False),
        ("vit_tiny_patch16_224 infer", "vit_tiny_patch16_224", [], "infer", 32, 10 // s, 2, False),
        ("vit_tiny_patch16_224 infer b1", "vit_tiny_patch16_224", [], "infer", 1, 40 // s, 5, False),
        ("vit_small_patch16_224 train", "vit_small_patch16_224", [], "train", 32, 4 // s, 1, False),
        ("vit_small_patch16_224 infer", "vit_small_patch16_224", [], "infer", 32, 6 // s, 2, False),
        ("vit_small_patch16_224 infer b1", "vit_small_patch16_224", [], "infer", 1, 30 // s, 5, False),
        ("vit_base_patch16_224 train", "vit_base_patch16_224", [], "train", 32, 2, 1, False),
        ("vit_base_patch16_224 infer", "vit_base_patch16_224", [], "infer", 32, 4 // s, 1, False),
        ("vit_base_patch16_224 infer b1", "vit_base_patch16_224", [], "infer", 1, 20 // s, 3, False),
        ("fashion_mnist_vit.yaml model train", "vit_tiny_patch16_224", FMNIST_MODEL, "train", 128, 20 // s, 3, False),
        ("deepvit_patch16_224_re_attn_16b train (PyTorch: the official DeepViT's code)",
         "deepvit_patch16_224_re_attn_16b", [], "train", 32, 4 // s, 1, False),
        ("vit_small_patch16_224 train (timm under torch.compile)", "vit_small_patch16_224", [], "train", 32,
         4 // s, 3, True),
        ("vit_small_patch16_224 infer (timm under torch.compile)", "vit_small_patch16_224", [], "infer", 32,
         6 // s, 3, True),
    ]


def run_json(cmd, env=None):
    """The JSON object a command prints: its last line, or all of it (vitlab info)."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=None if env is None else {**os.environ, **env})
    if done.returncode != 0:
        hint = ""
        if "No module named" in done.stderr:
            hint = "\n(`make bench` installs the Python side: scripts/install-deps.sh --bench)"
        sys.exit(f"bench: {' '.join(cmd[:3])} ... failed with exit status {done.returncode}:\n"
                 f"{done.stderr.strip()[-2000:]}{hint}")
    out = done.stdout.strip()
    last = out.splitlines()[-1]
    return json.loads(last if last.startswith("{") else out)


def make_jpeg_folder(root, classes=10, per_class=48):
    """An ImageFolder of 320x256 JPEGs (smooth random colour fields with noise)."""
    from PIL import Image, ImageFilter
    if os.path.isdir(os.path.join(root, "train")):
        return
    rng = random.Random(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class if split == "train" else 4):
                small = Image.frombytes("RGB", (20, 16), bytes(rng.randrange(256) for _ in range(20 * 16 * 3)))
                img = small.resize((320, 256), Image.BICUBIC).filter(ImageFilter.DETAIL)
                img.save(os.path.join(d, f"{i}.jpg"), quality=90)


def ratio(a, b):
    """The pairs' ratios a/b as 'median× (min–max)'."""
    r = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(r):.2f}× ({min(r):.2f}–{max(r):.2f})"


def replace_section(doc, begin, end, lines, heading):
    """Rewrites the part of doc between the markers (appended under heading when absent), atomically."""
    text = open(doc).read() if os.path.exists(doc) else "# Benchmarks\n"
    block = "\n".join([begin, *lines, end])
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + block + "\n"
    tmp = doc + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, doc)


ATTENTION_OP_MODELS = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]


def attention_op_table(args):
    """`vitlab bench --attention-op` at batch 32: the kernel, SDPA and the explicit op, medians over reps."""
    rows = []
    for model in ATTENTION_OP_MODELS:
        for mode in ("infer", "train"):
            runs = [run_json([args.vitlab, "bench", "--model", model, "--attention-op", "--mode", mode, "--batch",
                              "32", "--steps", "5", "--warmup", "1", "--threads", str(args.threads)])
                    for _ in range(args.reps)]
            ms = {k: statistics.median(r[k + "_ms_median"] for r in runs) for k in ("vitlab", "sdpa", "explicit")}
            print(f"attention op {model} {mode}: {ms}", file=sys.stderr)
            rows.append(f"| {model} | {mode} | {runs[0]['shape']} | {ms['vitlab']:.1f} | {ms['sdpa']:.1f} | "
                        f"{ms['explicit']:.1f} | {ms['sdpa'] / ms['vitlab']:.2f}× |")
    return ["The attention op alone (`vitlab bench --attention-op --batch 32`, the three run in turn, median ms "
            f"of {args.reps} runs of 5 rounds):", "",
            "| model | mode | q, k, v shape | vitlab kernel ms | SDPA ms | matmul + softmax ms | kernel vs SDPA |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def kernels(args):
    """Each kernel on against off in the same binary, alternating; ratios of images/s."""
    t = str(args.threads)
    op_lines = attention_op_table(args) if args.only in "attention op" else []
    table = []
    for label, bench_args, off_env in KERNEL_ROWS:
        if args.only not in label:
            continue
        cmd = [args.vitlab, "bench", *bench_args, "--threads", t]
        on, off, rss_on, rss_off = [], [], [], []
        for _ in range(args.reps):
            a, b = run_json(cmd), run_json(cmd, off_env)
            on.append(a["images_per_sec"])
            off.append(b["images_per_sec"])
            rss_on.append(a["peak_rss_mb"])
            rss_off.append(b["peak_rss_mb"])
            print(f"{label}: on {on[-1]:.2f} img/s, off {off[-1]:.2f} img/s", file=sys.stderr)
        switch = " ".join(f"{k}={v}" for k, v in off_env.items())
        table.append(f"| {label} | `{switch}` | {statistics.median(on):.2f} | {statistics.median(off):.2f} | "
                     f"{ratio(on, off)} | {statistics.median(rss_on):.0f} / "
                     f"{statistics.median(rss_off):.0f} |")
    libtorch = run_json([args.vitlab, "bench", "--gemm", "--threads", t])["libtorch"]
    lines = ["", f"Written by `bench/run.py --kernels --reps {args.reps} --threads {t}`, {datetime.date.today()}: "
             f"{os.cpu_count()} logical CPUs, {platform.processor() or platform.machine()}; LibTorch {libtorch}; "
             "batch 32, float32. Each row runs the same `vitlab bench` command with the kernel and with it "
             "switched off, alternating; the gain is the median of the pairs' ratios of images/s (range in "
             "brackets).", "",
             "| kernel: workload | switched off by | img/s with | img/s without | gain | peak RSS with / without (MB) |",
             "|---|---|---|---|---|---|", *table, "", *op_lines]
    replace_section(args.doc, KERNELS_BEGIN, KERNELS_END, lines, "## Why each kernel exists")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vitlab", default=os.path.join(ROOT, "build", "bin", "vitlab"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--quick", action="store_true", help="half the steps")
    p.add_argument("--only", default="", help="rows whose label contains this")
    p.add_argument("--doc", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"))
    p.add_argument("--data", default=os.path.join(ROOT, "runs", "bench", "jpeg"))
    p.add_argument("--kernels", action="store_true", help="each CPU kernel against LibTorch's own ops instead")
    args = p.parse_args()
    if args.kernels:
        return kernels(args)
    py = [sys.executable, os.path.join(ROOT, "bench", "torch_bench.py")]
    t = str(args.threads)
    gemm = run_json([args.vitlab, "bench", "--gemm", "--threads", t])
    table = []
    for label, preset, sets, mode, batch, steps, warmup, compiled in rows(args.quick):
        if args.only not in label:
            continue
        set_args = [a for s in sets for a in ("--set", s)]
        config = run_json([args.vitlab, "info", "--model", preset] + set_args)["config"]
        common = ["--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--threads", t]
        a_cmd = [args.vitlab, "bench", "--model", preset, "--mode", mode] + set_args + common
        b_cmd = py + ["model", "--config", json.dumps(config), "--mode", mode] + common + (["--compile"] if compiled else [])
        a, b, mfu, rss_a, rss_b = [], [], [], [], []
        pairs = min(args.reps, 2) if compiled else args.reps  # inductor compiles for minutes on a small machine
        for _ in range(pairs):
            ja = run_json(a_cmd)
            jb = run_json(b_cmd)
            a.append(ja["images_per_sec"])
            b.append(jb["images_per_sec"])
            mfu.append(ja["achieved_gflops"] / gemm["gflops"])
            rss_a.append(ja["peak_rss_mb"])
            rss_b.append(jb["peak_rss_mb"])
            print(f"{label}: vitlab {a[-1]:.2f} img/s, timm {b[-1]:.2f} img/s", file=sys.stderr)
        table.append((label, mode, batch, pairs, statistics.median(a), statistics.median(b), ratio(a, b),
                      statistics.median(mfu), statistics.median(rss_a), statistics.median(rss_b)))
    loader_row = None
    if args.only in "data loader":
        make_jpeg_folder(args.data)
        la, lb = [], []
        common = ["--batch", "32", "--steps", "10", "--workers", "1", "--img-size", "224"]
        for _ in range(args.reps):
            la.append(run_json([args.vitlab, "bench", "--loader", "--data", "imagefolder:" + args.data] + common)[
                "images_per_sec_per_worker"])
            lb.append(run_json(py + ["loader", "--data", args.data] + common)["images_per_sec_per_worker"])
            print(f"loader: vitlab {la[-1]:.1f} img/s, pytorch {lb[-1]:.1f} img/s", file=sys.stderr)
        loader_row = (statistics.median(la), statistics.median(lb), ratio(la, lb))

    peer = run_json(py + ["model", "--config", json.dumps(
        run_json([args.vitlab, "info", "--model", "vit_tiny_patch16_224", "--set", "model.img_size=32",
                  "--set", "model.depth=1"])["config"]), "--batch", "1", "--steps", "1", "--warmup", "0"])
    lines = ["",
             f"Written by `make bench` (`bench/run.py --reps {args.reps} --threads {t}"
             f"{' --quick' if args.quick else ''}`), {datetime.date.today()}: {platform.node() or 'this machine'}, "
             f"{os.cpu_count()} logical CPUs, {platform.processor() or platform.machine()}; vitlab with LibTorch "
             f"{gemm['libtorch']}, PyTorch {peer['torch']} (Python {platform.python_version()}) with timm "
             f"{peer['timm']}'s `VisionTransformer` (DeepViT: the official code's re-attention); {t} threads both "
             f"sides; float32; sgemm peak measured by `vitlab bench --gemm`: {gemm['gflops']:.0f} GFLOP/s.",
             "",
             "| row | mode | batch | pairs | vitlab img/s | peer img/s | vitlab / peer (range) | vitlab MFU | "
             "peak RSS vitlab / peer (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, mode, batch, pairs, a, b, r, mfu, ra, rb in table:
        lines.append(f"| {label} | {mode} | {batch} | {pairs} | {a:.2f} | {b:.2f} | {r} | {100 * mfu:.0f}% | "
                     f"{ra:.0f} / {rb:.0f} |")
    if loader_row:
        a, b, r = loader_row
        lines.append(f"| data loader, ImageFolder of 320×256 JPEGs, RandomResizedCrop 224 + flip + normalise, "
                     f"per worker (peer: torchvision + PIL + DataLoader) | — | 32 | {args.reps} | {a:.1f} | {b:.1f} | "
                     f"{r} | — | — |")
    lines += ["", "Medians of alternating runs, `pairs` per side; the ratio is the median of the pairs' ratios, "
              "with their range. The `torch.compile` rows time steps after inductor's compilation (in warm-up).",
              ""]
    replace_section(args.doc, BEGIN, END, lines, "## vitlab vs timm")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
