"""Demosaicking with unrolled graph-smoothness priors (Do et al., NeurIPS 2024) vs classics.

Trains, on random patches of scikit-image's astronaut, rocket and stereo_motorcycle (left
view), plain residual CNNs (5 conv layers, widths 8, 16, 32) and the unrolled GLR network of
``bilevel.demosaic`` (layers that learn a sparse graph by windowed softmax attention and
interpolate by a few CG steps on the graph Laplacian regulariser), then evaluates on the full
test images chelsea, coffee and immunohistochemistry, Bayer RGGB, beside bilinear, Malvar
(2004) and Menon (2007) (``colour-demosaicing``): PSNR (dB, 8 border pixels left out) at test
noise σ ∈ {0, 5/255, 10/255} (training at ``--train-sigma``, default 0), parameter counts,
and the unrolled vs implicit backward of the GLR solve (time, saved-tensor memory, gradient
agreement). Needs the ``demosaic`` extra. Run from the repository root:

    python examples/demosaic.py [--steps 1600] [--layers 6] [--json FILE] [--png FILE]

It prints the tables and writes the JSON summary and a PNG of a test crop (ground truth,
mosaic, each method). With ``--validation`` it trains only the GLR network, exactly as
above, and prints its PSNR on the validation images (``bilevel.demosaic.VALIDATION_IMAGES``:
the right view of stereo_motorcycle, the centre of retina), never touching the test images:
the protocol by which the configuration was chosen (docs/demosaicking.md).
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from bilevel import demosaic as dm

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=1600, help="Adam steps of every network")
parser.add_argument("--batch", type=int, default=8, help="patches per step")
parser.add_argument("--size", type=int, default=48, help="patch side (even)")
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--train-sigma", type=float, default=0.0, help="training noise (0-1 scale)")
parser.add_argument("--layers", type=int, default=6, help="GLR layers")
parser.add_argument("--window", type=int, default=3, help="graph window (odd)")
parser.add_argument("--cg-steps", type=int, default=8, help="CG steps per GLR layer")
parser.add_argument("--guide", type=int, default=5, help="guide filter size (odd)")
parser.add_argument("--features", type=int, default=12)
parser.add_argument("--rank", type=int, default=6, help="rank of the Mahalanobis metric")
parser.add_argument("--cnn-widths", default="8,16,32", help="comma-separated CNN widths")
parser.add_argument("--test-crop", type=int, default=0,
                    help="evaluate on the top-left N×N of each test image (0: full images)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--json", metavar="FILE", help="write the results here")
parser.add_argument("--png", metavar="FILE", default="runs/demosaic/demosaic.png",
                    help="figure of a test crop ('' for none)")
parser.add_argument("--no-progress", action="store_true")
parser.add_argument("--validation", action="store_true",
                    help="train only the GLR network and print its validation PSNR (no test)")
args = parser.parse_args()
# every setting is checked before any work (a bad one would otherwise surface minutes in)
for name, value, low in [("--steps", args.steps, 1), ("--batch", args.batch, 1),
                         ("--layers", args.layers, 1), ("--cg-steps", args.cg_steps, 1),
                         ("--features", args.features, 1), ("--rank", args.rank, 1),
                         ("--threads", args.threads, 1), ("--test-crop", args.test_crop, 0)]:
    if value < low:
        parser.error(f"{name} must be >= {low}, got {value}")
for name, value in [("--window", args.window), ("--guide", args.guide)]:
    if value < 1 or value % 2 == 0:
        parser.error(f"{name} must be an odd positive integer, got {value}")
if args.size < 8 or args.size % 2:
    parser.error(f"--size must be an even number >= 8, got {args.size}")
if 0 < args.test_crop < 2 * 8 + 2:
    parser.error(f"--test-crop must be 0 (full images) or >= 18 (PSNR drops an 8-pixel "
                 f"border), got {args.test_crop}")
if not 0 <= args.train_sigma < 1 or not args.lr > 0:
    parser.error("--train-sigma must be in [0, 1) and --lr positive")
try:
    CNN_WIDTHS = [int(w) for w in args.cnn_widths.split(",") if w.strip()]
except ValueError:
    parser.error(f"--cnn-widths must be comma-separated integers, got {args.cnn_widths!r}")
if any(w < 1 for w in CNN_WIDTHS):
    parser.error(f"--cnn-widths must be positive, got {args.cnn_widths!r}")
torch.set_num_threads(args.threads)
start = time.perf_counter()
SIGMAS = (0.0, 5 / 255, 10 / 255)

train_images = dm.load_images(dm.TRAIN_IMAGES)
common = dict(steps=args.steps, batch=args.batch, size=args.size, sigma=args.train_sigma,
              seed=args.seed, progress=not args.no_progress)


def train_glr():
    """The GLR network of these settings, trained (the same in both modes)."""
    torch.manual_seed(args.seed)
    net = dm.UnrolledGLRNet(args.layers, features=args.features, rank=args.rank,
                            window=args.window, steps=args.cg_steps, guide=args.guide)
    return net, dm.train(net, train_images, lr=args.lr, **common)


if args.validation:  # the configuration choice: validation images only
    glr, res = train_glr()
    glr.eval()
    val = dm.evaluate({"bilinear": dm.bilinear_demosaic,
                       "Menon 2007": lambda y, m: dm.classical_demosaic(y, "menon"),
                       "GLR-unrolled": glr}, dm.load_validation_images(), SIGMAS[:2],
                      border=8, seed=args.seed)
    print(f"\nvalidation PSNR (dB) on {', '.join(dm.VALIDATION_IMAGES)} (per image; mean)")
    for name, sc in val.items():
        print(f"{name:16s} " + "  ".join(
            f"σ={s * 255:g}/255: " + " ".join(f"{sc[f'sigma={s:.4f}/{i}']:.2f}" for i in (0, 1))
            + f"; {sc[f'sigma={s:.4f}']:.2f}" for s in SIGMAS[:2]))
    print(f"train {res.seconds:.0f} s, total {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"validation_images": list(dm.VALIDATION_IMAGES), "args": vars(args),
             "psnr_db": val, "train_seconds": res.seconds}, indent=1))
        print("results:", args.json)
    raise SystemExit

test_images = dm.load_images(dm.TEST_IMAGES)
if args.test_crop:
    test_images = [im[:, :args.test_crop, :args.test_crop] for im in test_images]

# --- training ------------------------------------------------------------------------------
models, trained = {}, {}
for width in CNN_WIDTHS:
    torch.manual_seed(args.seed)
    cnn = dm.PlainCNN(5, width)
    models[f"CNN-5x{width}"] = cnn
    trained[f"CNN-5x{width}"] = dm.train(cnn, train_images, lr=args.lr, **common)
glr, trained["GLR-unrolled"] = train_glr()
models["GLR-unrolled"] = glr
for model in models.values():
    model.eval()

# --- evaluation ----------------------------------------------------------------------------
methods = {"bilinear": dm.bilinear_demosaic,
           "Malvar 2004": lambda y, m: dm.classical_demosaic(y, "malvar"),
           "Menon 2007": lambda y, m: dm.classical_demosaic(y, "menon"),
           **models}
t0 = time.perf_counter()
scores = dm.evaluate(methods, test_images, SIGMAS, border=8, seed=args.seed)
t_eval = time.perf_counter() - t0
params = {name: (dm.count_parameters(models[name]) if name in models else 0)
          for name in methods}

keys = [f"sigma={s:.4f}" for s in SIGMAS]
print(f"\nPSNR (dB) on {', '.join(dm.TEST_IMAGES)} (mean; trained at σ = "
      f"{args.train_sigma * 255:g}/255)")
print(f"{'method':16s} {'params':>7s} " + " ".join(f"σ={s * 255:>4.0f}/255" for s in SIGMAS))
for name in methods:
    print(f"{name:16s} {params[name]:7d} " + " ".join(f"{scores[name][k]:10.2f}" for k in keys))
best_classic = max(scores[n][keys[0]] for n in ("bilinear", "Malvar 2004", "Menon 2007"))
glr_psnr = scores["GLR-unrolled"][keys[0]]
matching = [n for n in models if n.startswith("CNN") and scores[n][keys[0]] >= glr_psnr]
smallest_match = min(matching, key=lambda n: params[n]) if matching else None
target = {
    "glr_beats_every_classical_baseline_at_sigma0": glr_psnr > best_classic,
    "glr_minus_best_classical_db": glr_psnr - best_classic,
    "smallest_cnn_matching_glr": smallest_match,
    "glr_fewer_params_than_that_cnn": (smallest_match is not None
                                       and params["GLR-unrolled"] < params[smallest_match]),
}
print("target:", target)

# --- unrolled vs implicit backward of the GLR solve ---------------------------------------


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for the backward while running fn (storage
    counted once)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def backward_cost(backward, steps, layer, x, repeats=3):
    y, m = dm.mosaic(x)
    xhat = dm.bilinear_demosaic(y, m)
    times = []
    for _ in range(repeats):
        layer.zero_grad()
        t = time.perf_counter()
        out, nbytes = saved_bytes(lambda: layer(xhat, y, m, backward) if steps is None else
                                  _with_steps(layer, steps, xhat, y, m, backward))
        ((out - x) ** 2).mean().backward()
        times.append(time.perf_counter() - t)
    grads = torch.cat([p.grad.flatten() for p in layer.parameters()])
    return min(times), nbytes, grads


def _with_steps(layer, steps, xhat, y, m, backward):
    old = layer.steps
    layer.steps = steps
    try:
        return layer(xhat, y, m, backward)
    finally:
        layer.steps = old


gen = torch.Generator().manual_seed(args.seed + 100)
layer = glr.layers[0]
side = min(96, *(min(im.shape[-2:]) for im in test_images)) // 2 * 2
xb = dm.random_patches(test_images, 4, side, gen)
comparison = {"setting": f"first trained GLR layer, 4 test patches {side}x{side}, float32, "
                         "loss MSE; "
                         "time = forward + backward (best of 3); memory = bytes of the "
                         "tensors autograd saves", "runs": []}
for backward, steps in (("unrolled", args.cg_steps), ("unrolled", 50), ("unrolled", 200),
                        ("implicit", None)):
    sec, nbytes, _ = backward_cost(backward, steps, layer, xb)
    comparison["runs"].append({"backward": backward, "cg_steps": steps or "to tol 1e-6",
                               "seconds": sec, "saved_MiB": nbytes / 2 ** 20})
# gradient agreement at convergence, float64
layer64 = dm.GLRLayer(features=args.features, rank=args.rank, window=args.window,
                      guide=args.guide).double()
layer64.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
x64 = xb[:2, :, :32, :32].double()
_, _, g_imp = backward_cost("implicit", None, layer64, x64, repeats=1)
for k in (args.cg_steps, 50, 200):
    _, _, g_unr = backward_cost("unrolled", k, layer64, x64, repeats=1)
    comparison[f"rel_grad_diff_unrolled{k}_vs_implicit_float64"] = float(
        (g_unr - g_imp).norm() / g_imp.norm())
print("\nbackward of the GLR solve (first layer):")
for r in comparison["runs"]:
    print(f"  {r['backward']:9s} CG {str(r['cg_steps']):>12s}: {r['seconds'] * 1e3:8.1f} ms, "
          f"saved {r['saved_MiB']:7.2f} MiB")
for k, v in comparison.items():
    if k.startswith("rel_grad"):
        print(f"  {k}: {v:.2e}")

# --- figure --------------------------------------------------------------------------------
if args.png:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = test_images[0]  # chelsea: eye and whiskers
    r0, c0 = min(100, full.shape[1] - 64) // 2 * 2, min(180, full.shape[2] - 64) // 2 * 2
    im = full[None, :, r0:r0 + 64, c0:c0 + 64]
    y, m = dm.mosaic(im)
    panels = [("ground truth", im), ("mosaic", y)]
    with torch.no_grad():
        for name in ("bilinear", "Malvar 2004", "Menon 2007", "CNN-5x32", "GLR-unrolled"):
            if name in methods:
                est = methods[name](y, m).clamp(0, 1)
                panels.append((f"{name}\n{dm.psnr(est, im):.1f} dB", est))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6))
    for ax, (title, t) in zip(axes, panels, strict=True):
        ax.imshow(t[0].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print("figure:", args.png)

total = time.perf_counter() - start
summary = {
    "command": "python examples/demosaic.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("json", "png", "no_progress", "validation")),
    "train_images": list(dm.TRAIN_IMAGES), "test_images": list(dm.TEST_IMAGES),
    "psnr_border_px": 8, "train_sigma": args.train_sigma,
    "test_sigmas": list(SIGMAS),
    "psnr_db": {n: {k: scores[n][k] for k in keys} for n in methods},
    "psnr_db_per_image": {n: {k: v for k, v in scores[n].items() if "/" in k}
                          for n in methods},
    "params": params,
    "train_seconds": {n: r.seconds for n, r in trained.items()},
    "final_train_loss": {n: sum(r.losses[-50:]) / len(r.losses[-50:])
                         for n, r in trained.items()},
    "eval_seconds": t_eval, "target": target, "backward_comparison": comparison,
    "total_seconds": total, "torch": torch.__version__, "threads": args.threads,
    "machine": platform.processor() or platform.machine(),
}
print(f"total {total:.0f} s")
if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print("results:", args.json)
