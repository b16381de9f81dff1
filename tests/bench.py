"""Benchmarks (not collected by pytest): `python tests/bench.py [--only SUBSTRING] [--threads N]`.

Prints the machine, then one Markdown table row per measured operation: the median of several
timed runs after a warm-up, with its unit. README > Performance quotes this output.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import ash  # noqa: E402
import data  # noqa: E402
import metrics  # noqa: E402
import robusta  # noqa: E402
import segment  # noqa: E402

ROWS = []


def report(name, value, unit):
    ROWS.append((name, value, unit))
    print(f"| {name} | {value:.4g} | {unit} |", flush=True)


def timeit(fn, runs=5, warmup=1):
    """Median wall-clock seconds of `runs` calls of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


BENCHES = []


def bench(fn):
    BENCHES.append(fn)
    return fn


# --------------------------------------------------------------------------------------------
# data.py
# --------------------------------------------------------------------------------------------

@bench
def bench_toycity_generation(report):
    """ToyCity scenes written per second at 256x512 (label maps, render, 4 PNGs), per domain."""
    with tempfile.TemporaryDirectory() as tmp:
        for domain in ("source", "target"):
            n = 10
            t = timeit(lambda: data.make_toycity(Path(tmp) / domain, n, (256, 512), domain, seed=0), runs=3)
            report(f"ToyCity generation 256x512, {domain}", n / t, "scenes/s")


@bench
def bench_cityscapes_reader(report):
    """Cityscapes reader throughput on a ToyCity tree at 256x512 (read image, labels, instances)."""
    with tempfile.TemporaryDirectory() as tmp:
        data.make_toycity(Path(tmp), 20, (256, 512), "target", seed=0)
        ds = data.Cityscapes(tmp, "train")
        t = timeit(lambda: [ds[i] for i in range(len(ds))], runs=3)
        report("Cityscapes reader 256x512 (ToyCity tree)", len(ds) / t, "images/s")


@bench
def bench_corruptions(report):
    """corrupt() throughput at 256x512, severity 3, per corruption."""
    with tempfile.TemporaryDirectory() as tmp:
        data.make_toycity(Path(tmp), 1, (256, 512), "target", seed=0)
        image = data.Cityscapes(tmp, "train")[0]["image"]
    for name in data.CORRUPTIONS:
        t = timeit(lambda: data.corrupt(image, name, 3, seed=0), runs=5)
        report(f"corrupt {name} 256x512 s3", 1 / t, "images/s")


# --------------------------------------------------------------------------------------------
# metrics.py
# --------------------------------------------------------------------------------------------

@bench
def bench_confusion_matrix(report):
    """ConfusionMatrix.update on 4 x 1024 x 2048 uint8 maps, 19 classes, 10% ignore pixels."""
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 19, (4, 1024, 2048), generator=g, dtype=torch.uint8)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.randint(0, 19, (4, 1024, 2048), generator=g, dtype=torch.uint8)
    cm = metrics.ConfusionMatrix(19)
    seconds = timeit(lambda: cm.update(pred, target), runs=7)
    report("confusion matrix update, 4x1024x2048 uint8", target.numel() / seconds / 1e6, "Mpx/s")


@bench
def bench_frechet_distance(report):
    """frechet_distance of two 2048-d statistics (full-rank covariances from 4096 samples)."""
    g = torch.Generator().manual_seed(0)
    stats = []
    for scale in (1.0, 1.3):
        feats = torch.randn(4096, 2048, generator=g, dtype=torch.float64) * scale + 0.1
        stats += [feats.mean(0), torch.cov(feats.T)]
    seconds = timeit(lambda: metrics.frechet_distance(*stats), runs=3)
    report("Frechet distance, 2048-d, float64", seconds, "s")


@bench
def bench_ood_meter(report):
    """OODMeter over 1e8 pixels (12 batches of 4 x 1024 x 2048 scores with 5% void), then compute()."""
    g = torch.Generator().manual_seed(0)
    shape = (4, 1024, 2048)
    is_ood = (torch.rand(shape, generator=g) < 0.02).to(torch.uint8)
    scores = torch.rand(shape, generator=g) + is_ood  # (float32, all distinct in practice)
    is_ood[torch.rand(shape, generator=g) < 0.05] = 255
    batches = -(-100_000_000 // is_ood.numel())  # 12

    def run():
        meter = metrics.OODMeter()
        for _ in range(batches):
            meter.update(scores, is_ood)
        return meter.compute()

    seconds = timeit(run, runs=3)
    report(f"OOD metrics (OODMeter), {batches * is_ood.numel() / 1e6:.0f} Mpx", seconds, "s")
    report("OOD metrics (OODMeter), peak memory added", metrics.peak_memory(run) / 2 ** 20, "MiB")


# --------------------------------------------------------------------------------------------
# segment.py
# --------------------------------------------------------------------------------------------

BENCH_MODELS = [("DeepLab-v2 R101", "deeplabv2-r101", {}),
                ("DeepLab-v3+ R101 OS8", "deeplabv3plus-r101", {"output_stride": 8}),
                ("SegFormer-B0", "segformer-b0", {})]
BENCH_SIZE = (256, 512)


def _train_step(name, kwargs, batch_size=2):
    model = segment.build_model(name, **kwargs).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.rand(batch_size, 3, *BENCH_SIZE)
    labels = torch.randint(0, 19, (batch_size, *BENCH_SIZE))

    def step():
        loss = F.cross_entropy(model(images), labels, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


@bench
def bench_segment_train(report):
    for title, name, kwargs in BENCH_MODELS:
        seconds = timeit(_train_step(name, kwargs), runs=3, warmup=1)
        report(f"segment: train {title} 256x512, batch 2 (CPU)", 2 / seconds, "images/s")


@bench
def bench_segment_infer(report):
    for title, name, kwargs in BENCH_MODELS:
        model = segment.build_model(name, **kwargs).eval()
        image = torch.rand(1, 3, *BENCH_SIZE)

        def infer():
            with torch.no_grad():
                model(image)
        report(f"segment: inference {title} 256x512, batch 1 (CPU)", 1 / timeit(infer, runs=5, warmup=1), "images/s")


@bench
def bench_segment_train_memory(report):
    for title, name, kwargs in BENCH_MODELS:
        step = _train_step(name, kwargs)
        step()  # optimizer state and allocator warm-up; the peak below is one steady-state step
        report(f"segment: peak memory of a training step, {title} 256x512, batch 2 (CPU)",
               metrics.peak_memory(step) / 2**20, "MiB")


# --------------------------------------------------------------------------------------------
# robusta.py
# --------------------------------------------------------------------------------------------

def _matmul_gflops(n=2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / timeit(lambda: a @ b) / 1e9


def _coarse_step(device):
    """A G_coarse + D update (Eq. A7 with L_VGG on random features) at 256x512, batch 1, SegFormer-B0,
    Table A1 widths (ngf 64, the Cityscapes preset's 3 SPADE blocks, Table A11), built on `device` ("meta": shapes only)."""
    args = robusta.options_from_preset("cityscapes")
    args.segformer = "b0"
    run = type("Run", (), {"autocast": lambda self: torch.autocast("cpu", enabled=False),
                           "scaler": torch.amp.GradScaler("cpu", enabled=False)})()
    with torch.device(device):
        g, d, _, _ = robusta.build_networks(args)
        vgg = robusta.VGGLoss()
    label = data.one_hot(torch.randint(0, 34, (1, 256, 512))).to(device)
    real = (torch.rand(1, 3, 256, 512) * 2 - 1).to(device)
    opt_g, opt_d = robusta.adam(g, args.lr, 0, args), robusta.adam(d, args.lr, 0, args)
    return lambda: robusta.gan_step(run, g, d, opt_g, opt_d, label, (label,), real, robusta.coarse_generator_loss,
                                    "ls", vgg, args)


@bench
def bench_gcoarse_training_step(report):
    """Time and achieved GFLOP/s of one G_coarse + D training step, against fp32 matmul GFLOP/s."""
    torch.manual_seed(0)
    counter = FlopCounterMode(display=False)  # forward + backward of G, D (three passes) and VGG
    with counter:
        _coarse_step("meta")()  # counted on the meta device: no time, no memory
    flops = counter.get_total_flops()
    seconds = timeit(_coarse_step("cpu"), runs=3, warmup=0)  # minutes a step: the median drops the cold one
    matmul = _matmul_gflops()
    report("robusta G_coarse+D training step 256x512 b1 (SegFormer-B0, ngf 64, 3 blocks)", seconds, "s")
    report("robusta G_coarse+D training step achieved", flops / seconds / 1e9, "GFLOP/s")
    report("robusta G_coarse+D step / fp32 matmul 2048^3 GFLOP/s", flops / seconds / 1e9 / matmul, "fraction")


def _label_map_1024x2048():
    """A ToyCity validation label map upsampled (nearest) to Cityscapes resolution."""
    path = next((data.toycity() / "source" / "gtFine" / "val").rglob("*_labelIds.png"))
    ids = data.read_label(path)[None, None].float()
    return torch.nn.functional.interpolate(ids, size=(1024, 2048), mode="nearest")[:, 0].long()


@bench
def bench_label_morphology(report):
    """dilate_labels / erode_labels (Appendix D) of a 1024x2048 label map."""
    labels = _label_map_1024x2048()
    for shape, size, text in (("square", 15, "15x15 square"), ("disk", 7, "radius-7 disk")):
        se = robusta.structuring_element(shape, size)
        for fn in (robusta.dilate_labels, robusta.erode_labels):
            seconds = timeit(lambda: fn(labels, se))
            report(f"robusta {fn.__name__} 1024x2048, {text}", seconds * 1e3, "ms")


@bench
def bench_generation(report):
    """generate(): render (G_coarse + G_fine of the ToyCity demo preset) and write a Cityscapes
    tree, 64x128, batch 4."""
    torch.manual_seed(0)
    args = robusta.options_from_preset("toycity")
    g_coarse, _, g_fine, _ = robusta.build_networks(args)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "last.pt"
        torch.save({"args": segment.jsonable(args), "stage": "done", "g_coarse": g_coarse.state_dict(),
                    "g_fine": g_fine.state_dict()}, checkpoint)
        source = torch.utils.data.Subset(data.Cityscapes(data.toycity() / "source", "val", size=args.size), range(16))
        outs = iter(range(100))
        seconds = timeit(lambda: robusta.generate(checkpoint, source, Path(tmp) / f"out{next(outs)}"), runs=3)
    report("robusta generation 64x128 (ToyCity demo networks, PNG writing included)", len(source) / seconds, "images/s")


# --------------------------------------------------------------------------------------------
# ash.py
# --------------------------------------------------------------------------------------------

def _algorithm1(depth, size, batch_size, width):
    torch.manual_seed(0)
    args = ash.parser().parse_args(["--mode", "ash", "--depth", str(depth), "--iters", "100000"])
    stylizer = ash.Stylizer(ash.random_vgg_normalised(0, width), ash.decoder(width)).requires_grad_(False)
    algo = ash.build(args, stylizer=stylizer)
    images = torch.rand(batch_size, 3, *size)
    labels = torch.randint(0, 19, (batch_size, *size))
    styles = torch.rand(batch_size, 3, *size)
    return lambda: algo.step(images, labels, styles, 0)


@bench
def bench_ash_iteration(report):
    step = _algorithm1(101, (256, 512), 1, 64)
    report("ash: Algorithm 1 iteration, DeepLab-v2 R101 + VGG19 AdaIN, 256x512, batch 1 (CPU)",
           timeit(step, runs=3, warmup=1), "s")
    report("ash: Algorithm 1 iteration peak memory, same setting (CPU)",
           metrics.peak_memory(step) / 2**20, "MiB")


@bench
def bench_ash_iteration_demo(report):
    step = _algorithm1(18, (64, 128), 4, 16)
    report("ash: Algorithm 1 iteration, ToyCity demo (DeepLab-v2 R18, width-16 VGG, 64x128, batch 4, CPU)",
           timeit(step, runs=5, warmup=1), "s")


@bench
def bench_ash_stylization(report):
    for title, width, size in (("VGG19 AdaIN, 256x512", 64, (256, 512)), ("demo width-16 VGG, 64x128", 16, (64, 128))):
        stylizer = ash.Stylizer(ash.random_vgg_normalised(0, width), ash.decoder(width)).eval()
        content, style = torch.rand(1, 3, *size), torch.rand(1, 3, *size)

        def stylize():
            with torch.no_grad():
                stylizer.stylize(stylizer.encode(content), stylizer.encode(style))
        report(f"ash: stylization Eq. (4), {title}, batch 1 (CPU)", 1 / timeit(stylize, runs=5, warmup=1), "images/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the benchmarks whose function name contains this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Machine: {segment.machine()}\n")
    print("| operation | median | unit |\n| --- | ---: | --- |", flush=True)
    for fn in BENCHES:
        if args.only in fn.__name__:
            fn(report)


if __name__ == "__main__":
    main()
