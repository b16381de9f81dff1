"""Segmentation networks, their training and their robustness / OOD evaluation.

Both papers end in a segmentation network. ASH (Tjio et al., Sec. 4) trains DeepLab-v2 with a
ResNet-101 backbone (Algorithm 1). Robusta (Hariat et al., supplementary F.1, Table A4) trains
DeepLab-v3+ on real + generated data with a mean teacher, and uses a SegFormer inside its
generator G_coarse (Fig. A1, Table A7). This file holds, in reading order:

1. Run helpers shared by every trainer of the project: `add_run_args`, `Run` (device, torchrun/DDP,
   AMP, channels_last, fsynced atomic checkpoints, `--resume auto`, `restore` (modules to the device
   before optimizer state), `update_scaler` (did the optimizer step?), log.jsonl, progress line,
   index.html), `seed_everything`, `poly_lr`, `save_grid`, and `Experiment` / `mean_std` (the seeded,
   resumable experiments of ash.py and robusta.py: one JSON record per run, mean +- std tables).
2. Networks: `resnet` (torchvision names, dilation for output stride 8/16; style="caffe" for the
   DeepLab-v2 of AdaptSegNet / CLAN / ASH), `DeepLabV2` (ASPP classifier of four dilated 3x3 convs,
   summed; optional second classifier as in CLAN; AdaptSegNet's init file), `DeepLabV3Plus`,
   `SegFormer` (MiT-B0..B5 with the official checkpoint names + all-MLP decoder), `build_model`;
   the fixed evaluators of Robusta Table A5 (`load_evaluator`: DRN-D-105, UPerNet-101, DeepLab-v2
   COCO-Stuff, published SegFormers).
3. Training: `GeneratedDataset`, the benchmark protocols `StreetHazardsBenchmark` and `BDDAnomaly`,
   `MeanTeacher` and `pseudo_label_loss` (Robusta F.1), `PRESETS` (Table A4), `train_segmenter`.
4. Evaluation: `predict` (whole image / sliding window, multi-scale), `evaluate`,
   `evaluate_corruptions` (Table A10 protocol), `evaluate_ood` (AUROC / AUPR / FPR95, pooled and per image).

Run:
    python segment.py                                   # demo on ToyCity (CPU, minutes)
    python segment.py --dataset cityscapes --data-root PATH --preset cityscapes \
        --pretrained resnet101-63fe2227.pth --generated runs/robusta/generated --mean-teacher
    torchrun --nproc_per_node 4 segment.py ...          # DistributedDataParallel, same code
"""
import argparse
import base64
import contextlib
import copy
import functools
import io
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import metrics

# ---------------------------------------------------------------------------------------------
# 1. Run helpers (one home for device, DDP, AMP, checkpoints and logging of every trainer)
# ---------------------------------------------------------------------------------------------


def add_run_args(parser, name_default):
    """Add the options every trainer of the project shares to an argparse parser."""
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device; under torchrun each rank takes cuda:LOCAL_RANK")
    g.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                   help="automatic mixed precision (fp16 uses a gradient scaler)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    g.add_argument("--resume", default="",
                   help="'auto': continue from <out>/<name>/last.pt if it exists; a path; '' starts fresh")
    g.add_argument("--seed", type=int, default=0, help="random seed (each rank adds its rank)")
    g.add_argument("--out", default="runs", help="output folder; the run writes to <out>/<name>/")
    g.add_argument("--name", default=name_default, help="run name")
    g.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm when distributed")
    return parser


def announce_demo(program):
    """What a no-argument run uses, said before it starts (the demos of segment, robusta and ash)."""
    print(f"[{program}] demo: ToyCity, the embedded procedural dataset (written on first use), and random "
          "initialisation - no dataset or pretrained weights needed. `--help` shows the real runs.", flush=True)


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def poly_lr(base_lr, step, total, power=0.9):
    """The 'poly' learning-rate policy of DeepLab: base_lr * (1 - step / total) ** power."""
    return base_lr * max(0.0, 1.0 - step / max(1, total)) ** power


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (also used with one process) that can start in the middle of an epoch.

    The order depends only on (seed, epoch), so a resumed run sees the same batches as an
    uninterrupted one; `skip` drops the samples of the batches already consumed this epoch.
    """

    def __init__(self, dataset, num_replicas, rank, shuffle, seed, drop_last):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return super().__len__() - self.skip


class Run:
    """One training run: device, distributed setup, AMP, checkpoints and logs under <out>/<name>/.

    Works unchanged under `torchrun` (reads RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on
    CUDA); only rank 0 writes files.
    """

    def __init__(self, args):
        self.args = args
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = self.world_size > 1
        self.rank = int(os.environ.get("RANK", "0"))
        device = torch.device(args.device)
        if device.type == "cuda" and self.distributed:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if self.distributed:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        self.is_main = self.rank == 0
        self.dir = Path(args.out) / args.name
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        self._samplers = []
        self._tick = None
        seed_everything(args.seed + self.rank)
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
            if args.resume == "" or (args.resume == "auto" and not (self.dir / "last.pt").exists()):
                (self.dir / "log.jsonl").unlink(missing_ok=True)  # nothing to resume: a fresh log

    # -- devices and data -------------------------------------------------------------------
    def autocast(self):
        """Mixed-precision context (a no-op with --amp off)."""
        if self.args.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.args.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def wrap(self, model, **ddp_kwargs):
        """Move a model to the device (channels_last if asked); SyncBN + DDP when distributed."""
        model = model.to(self.device)
        if self.args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.distributed and any(p.requires_grad for p in model.parameters()):
            if self.args.sync_bn:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)
        return model

    def loader(self, dataset, batch_size, shuffle, drop_last=True, collate_fn=None):
        """A DataLoader over this rank's shard; its order is fixed by (seed, epoch) for exact resume."""
        sampler = ResumableSampler(dataset, self.world_size, self.rank, shuffle, self.args.seed, drop_last)
        self._samplers.append(sampler)
        # its own generator: starting an epoch draws worker seeds from it, not from the global RNG
        generator = torch.Generator().manual_seed(self.args.seed + self.rank)
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate_fn,
            num_workers=self.args.workers, pin_memory=self.device.type == "cuda", generator=generator)

    def set_epoch(self, epoch):
        """Set the shuffling epoch of every loader made by this Run (for hand-written epoch loops)."""
        for sampler in self._samplers:
            sampler.set_epoch(epoch)
            sampler.skip = 0

    def batches(self, loader, step, total):
        """Yield (step, batch) from `step` to `total`, cycling epochs; a resumed run starts mid-epoch
        at the batch an uninterrupted run would see (exact with --workers 0; with workers, the data
        order is exact and the augmentation's random stream is re-drawn)."""
        sampler = loader.sampler
        sampler.skip = 0
        per_epoch = len(loader)
        if per_epoch == 0:
            raise data.BadInput(f"the data loader yields no batch: {len(loader.dataset)} samples for batch size "
                                f"{loader.batch_size} x {self.world_size} processes")
        epoch, done = divmod(step, per_epoch)
        self._tick = (time.time(), step)  # the progress line's rate counts from here
        while step < total:
            sampler.set_epoch(epoch)
            sampler.skip = done * loader.batch_size
            loader.generator.manual_seed(self.args.seed + 1000 * epoch + self.rank)
            for batch in loader:
                yield step, batch
                step += 1
                if step >= total:
                    return
            epoch, done = epoch + 1, 0

    # -- logs -------------------------------------------------------------------------------
    def log(self, step, **scalars):
        """Rank 0 appends {"step", "time", **scalars} as one JSON line to log.jsonl."""
        if not self.is_main:
            return
        row = {"step": step, "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def progress(self, step, total, **scalars):
        """Print `[name] step 120/2000 (6%) 3.1 it/s ETA 10:05 loss 0.53` (rank 0)."""
        now = time.time()
        if self._tick is None or step < self._tick[1]:
            self._tick = (now, step)
        t0, s0 = self._tick
        rate = (step - s0) / (now - t0) if now > t0 and step > s0 else float("nan")
        self._tick = (now, step)
        if not self.is_main:
            return
        eta = (total - step) / rate if rate > 0 else float("nan")
        eta = "--:--" if math.isnan(eta) else f"{int(eta // 60):02d}:{int(eta % 60):02d}"
        values = " ".join(f"{k} {float(v):.4g}" for k, v in scalars.items())
        print(f"[{self.args.name}] step {step}/{total} ({100 * step / max(1, total):.0f}%) "
              f"{rate:.3g} it/s ETA {eta} {values}", flush=True)

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, state, tag="last"):
        """Write <dir>/<tag>.pt atomically (temporary file, fsync, os.replace, fsync of the folder);
        rank 0 only. A crash at any moment leaves either the old or the new checkpoint on disk."""
        if not self.is_main:
            return None
        path = self.dir / f"{tag}.pt"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.dir)
        return path

    def resume(self):
        """The checkpoint named by --resume ('auto': <dir>/last.pt if present), or None."""
        choice = self.args.resume
        if choice == "":
            return None
        path = self.dir / "last.pt" if choice == "auto" else Path(choice)
        if not path.exists():
            if choice == "auto":
                return None
            raise data.MissingFile(f"--resume {choice}: no checkpoint at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        step = state.get("step", 0)
        if self.is_main:
            print(f"[{self.args.name}] resuming from {path} at step {step}", flush=True)
            log = self.dir / "log.jsonl"
            if log.exists():  # forget what was logged after the checkpoint
                rows = [r for r in log.read_text().splitlines() if r and json.loads(r)["step"] <= step]
                log.write_text("".join(r + "\n" for r in rows))
        return state

    def restore(self, state, modules, optimizers=None):
        """Load a checkpoint of `resume()` into `modules` ({key: module}) and `optimizers`
        ({key: optimizer}), plus the scaler and RNG states it holds; returns its step.

        Modules are moved to the run's device first: `Optimizer.load_state_dict` puts each state
        tensor (momentum, Adam moments) on the device of its parameter at load time, so loading
        before the move would leave them on the CPU and mix devices at the first step on a GPU."""
        for key, module in modules.items():
            module.to(self.device)
            unwrap(module).load_state_dict(state[key])
        for key, optimizer in (optimizers or {}).items():
            optimizer.load_state_dict(state[key])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            self.set_rng_state(state["rng"])
        return state.get("step", 0)

    def update_scaler(self):
        """`scaler.update()` after the `scaler.step(optimizer)` calls of one training step; returns
        whether the optimizers really stepped (False when fp16 gradients held an inf/NaN: the
        scaler skipped every step and lowered its scale). Always True without fp16."""
        if not self.scaler.is_enabled():
            return True
        before = self.scaler.get_scale()
        self.scaler.update()
        return self.scaler.get_scale() >= before  # the scale only falls (backoff < 1) on a skipped step

    def rng_state(self):
        """RNG states of every rank (Python, NumPy, torch, CUDA) as tensors, for a checkpoint."""
        py = random.getstate()
        npy = np.random.get_state()
        mine = {"python": torch.tensor(py[1], dtype=torch.int64),
                "numpy": torch.from_numpy(npy[1].astype(np.int64)), "numpy_pos": int(npy[2]),
                "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        if not self.distributed:
            return [mine]
        states = [None] * self.world_size
        dist.all_gather_object(states, mine)
        return states

    def set_rng_state(self, states):
        """Restore this rank's RNG states from `rng_state()`'s output."""
        mine = states[self.rank if len(states) == self.world_size else 0]
        random.setstate((3, tuple(mine["python"].tolist()), None))
        np.random.set_state(("MT19937", mine["numpy"].numpy().astype(np.uint32), mine["numpy_pos"], 0, 0.0))
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)

    def check_finite(self, loss, step):
        """Stop with a clear message on a NaN/Inf loss; the last good checkpoint stays on disk."""
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"[{self.args.name}] loss is {loss.detach().flatten()[0].item()} at step {step}; stopping. "
                f"The last good checkpoint is {self.dir / 'last.pt'} (continue with --resume auto, "
                f"e.g. with a lower learning rate or --amp off).")

    # -- pictures ---------------------------------------------------------------------------
    def save_grid(self, path, rows):
        """Save rows of (3, H, W) [0, 1] images as one PNG (rank 0); images are padded to one size."""
        return save_grid(path, rows) if self.is_main else None

    def write_index(self, title, sections):
        """Write <dir>/index.html: sections of captioned images, then loss curves from log.jsonl.

        `sections` is a list of (heading, [(caption, image_path or uint8 (H, W, 3) array), ...]).
        Paths are linked relative to the run folder; arrays are embedded as PNG data URIs.
        """
        if not self.is_main:
            return None
        html = [f"<!doctype html><meta charset='utf-8'><title>{title}</title>",
                "<style>body{font-family:sans-serif;margin:1em} figure{display:inline-block;margin:4px}"
                " figcaption{font-size:12px} img{max-width:512px}</style>", f"<h1>{title}</h1>"]
        for heading, items in sections:
            html.append(f"<h2>{heading}</h2>")
            for caption, image in items:
                if isinstance(image, (str, Path)):
                    src = os.path.relpath(Path(image).resolve(), self.dir.resolve())
                else:
                    buf = io.BytesIO()
                    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
                    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
                html.append(f"<figure><img src='{src}'><figcaption>{caption}</figcaption></figure>")
        html.append("<h2>Curves</h2>")
        log = self.dir / "log.jsonl"
        rows = [json.loads(r) for r in log.read_text().splitlines() if r] if log.exists() else []
        keys = sorted({k for r in rows for k in r} - {"step", "time"})
        html += [svg_curve(key, [(r["step"], r[key]) for r in rows if key in r]) for key in keys]
        path = self.dir / "index.html"
        tmp = path.with_name("index.html.tmp")
        tmp.write_text("\n".join(html))
        os.replace(tmp, path)
        return path

    def close(self):
        """Tear down the process group (when distributed)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def fsync_dir(folder):
    """fsync a folder, so that a rename inside it survives a power loss (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_grid(path, rows, pad=2):
    """Save rows of (3, H, W) or (1, H, W) [0, 1] images as one PNG on a white canvas; images are
    padded to the largest height / width."""
    h = max(im.shape[-2] for row in rows for im in row)
    w = max(im.shape[-1] for row in rows for im in row)
    canvas = torch.ones(3, len(rows) * (h + pad) - pad, max(len(r) for r in rows) * (w + pad) - pad)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            im = im.detach().float().cpu().clamp(0, 1)
            im = im.expand(3, -1, -1) if im.shape[0] == 1 else im
            canvas[:, i * (h + pad):i * (h + pad) + im.shape[-2], j * (w + pad):j * (w + pad) + im.shape[-1]] = im
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write_image(path, canvas)
    return path


def mean_std(values):
    """(mean, sample standard deviation with ddof=1; 0 for a single value) of a list of numbers."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


class Experiment:
    """Seeded runs of one experiment (`ash.py experiment`, `robusta.py experiment`) in <out>.

    `cell(key, fn)` runs fn() once: its JSON result is written to <out>/experiment.json (atomically)
    as soon as it exists, with its wall-clock seconds, so an interrupted experiment resumes at the
    first unfinished run. `table()` turns per-seed results into mean +- std rows (Markdown), also
    written to <out>/results.md.
    """

    def __init__(self, out, title, settings):
        self.out, self.title = Path(out), title
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "experiment.json"
        self.state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
        if self.state.get("settings", settings) != settings:
            raise data.BadInput(f"{self.path} holds runs with other settings ({self.state['settings']}); "
                                f"move it away or give another --out")
        self.state.update(settings=settings, title=title)
        self.state.setdefault("cells", {})
        self.start = time.time()

    def _write(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.path)

    def cell(self, key, fn):
        """The stored result of `key`, or fn()'s (then stored with its wall-clock seconds)."""
        if key in self.state["cells"]:
            print(f"[experiment] {key}: done earlier, reusing {self.path}", flush=True)
            return self.state["cells"][key]["result"]
        start = time.time()
        result = json.loads(json.dumps(fn(), default=float))
        self.state["cells"][key] = {"result": result, "seconds": round(time.time() - start, 1)}
        self._write()
        return result

    def seconds(self):
        """Wall-clock seconds of all runs stored so far (over every session that contributed)."""
        return sum(c["seconds"] for c in self.state["cells"].values())

    def table(self, header, rows, note="", decimals=2):
        """header: column names; rows: (name, [per-column list of per-seed values or None]) ->
        a Markdown table of mean +- std, printed, appended to self.state["tables"] and results.md.
        decimals: digits after the point, one number for all columns or one per value column."""
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
        if isinstance(decimals, int):
            decimals = [decimals] * (len(header) - 1)
        for name, columns in rows:
            cells = []
            for values, digits in zip(columns, decimals):
                if not values:
                    cells.append("-")
                    continue
                m, s = mean_std(values)
                cells.append(f"{m:.{digits}f} ± {s:.{digits}f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        text = "\n".join(lines) + (f"\n\n{note}" if note else "")
        print("\n" + text + "\n", flush=True)
        self.state.setdefault("tables", {})[header[0]] = text
        self._write()
        tables = "\n\n".join(self.state["tables"].values())
        (self.out / "results.md").write_text(
            f"# {self.title}\n\nmean ± std (ddof=1) over seeds {self.state['settings'].get('seeds')}; "
            f"{self.seconds() / 60:.1f} min of runs.\n\n{tables}\n")
        return text


def machine():
    """One line naming the machine a figure was measured on: CPU, cores, torch, threads, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def write_section(page, name, text):
    """Put `text` between the markers `<!-- begin NAME -->` and `<!-- end NAME -->` of a Markdown page
    (appended, with its markers, if the page has none), atomically. The experiment commands own their
    sections of docs/results.md this way, so the numbers there cannot drift from experiment.json;
    prose outside the markers is kept as it is."""
    page = Path(page)
    begin, end = f"<!-- begin {name} (written by the command; edits here are overwritten) -->", f"<!-- end {name} -->"
    old = page.read_text() if page.is_file() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    i, j = old.find(begin), old.find(end)
    if (i < 0) != (j < 0) or j < i:
        raise data.BadInput(f"{page}: the markers of section {name!r} are broken; restore '{begin}' ... '{end}'")
    new = old[:i] + block + old[j + len(end):] if i >= 0 else old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp = page.with_name(page.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, page)
    return page


def svg_curve(title, points, width=360, height=180):
    """An inline SVG line plot of (x, y) points with its min/max labels (no plotting library)."""
    points = [(x, y) for x, y in points if math.isfinite(y)]
    if not points:
        return ""
    xs, ys = zip(*points)
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 50) / ((x1 - x0) or 1)
    sy = (height - 30) / ((y1 - y0) or 1)
    line = " ".join(f"{40 + (x - x0) * sx:.1f},{height - 20 - (y - y0) * sy:.1f}" for x, y in points)
    return (f"<svg width='{width}' height='{height}' style='border:1px solid #ccc;margin:4px'>"
            f"<text x='40' y='12' font-size='12'>{title}</text>"
            f"<text x='2' y='24' font-size='10'>{y1:.3g}</text>"
            f"<text x='2' y='{height - 20}' font-size='10'>{y0:.3g}</text>"
            f"<text x='40' y='{height - 4}' font-size='10'>{x0}</text>"
            f"<text x='{width - 40}' y='{height - 4}' font-size='10'>{x1}</text>"
            f"<polyline fill='none' stroke='#1f77b4' stroke-width='1.5' points='{line}'/></svg>")


# ---------------------------------------------------------------------------------------------
# 2. Networks
# ---------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)  # AdaptSegNet's IMG_MEAN (BGR, 0..255)

# Where each checkpoint is published (we never download).
PUBLISHED = {
    "resnet18": "torchvision: https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "torchvision: https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "torchvision: https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "torchvision: https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "resnet152": "torchvision: https://download.pytorch.org/models/resnet152-394f9c45.pth",
    **{f"mit_b{i}": f"NVlabs/SegFormer README, 'ImageNet-1K pre-trained weights' (mit_b{i}.pth)" for i in range(6)},
    "adaptsegnet-init": "wasidennis/AdaptSegNet (train_gta2cityscapes_multi.py RESTORE_FROM): "
                        "http://vllab.ucmerced.edu/ytsai/CVPR18/DeepLab_resnet_pretrained_init-f81d91e8.pth",
    "drn-d-105": "fyu/drn README, 'pretrained DRN models on Cityscapes': http://go.yf.io/drn-cityscapes-models "
                 "(drn_d_105_cityscapes.pth)",
    "upernet-101": "CSAILVision/semantic-segmentation-pytorch README: http://sceneparsing.csail.mit.edu/model/pytorch/"
                   "ade20k-resnet101-upernet/ (encoder_epoch_50.pth and decoder_epoch_50.pth, in one folder)",
    "deeplabv2-cocostuff": "kazuto1011/deeplab-pytorch README (COCO-Stuff 164k): https://github.com/kazuto1011/"
                           "deeplab-pytorch/releases/download/v1.0/deeplabv2_resnet101_msc-cocostuff164k-100000.pth",
    **{f"segformer-b{i}": f"NVlabs/SegFormer README, 'Evaluation' (trained Cityscapes / ADE20K checkpoints, e.g. "
                          f"segformer.b{i}.1024x1024.city.160k.pth / segformer.b{i}.512x512.ade.160k.pth)"
       for i in range(6)},
}


def load_pretrained(module, path, name):
    """Load an ImageNet checkpoint into a backbone strictly, ignoring its classification head."""
    state = read_checkpoint(path, name)
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
    return load_strict(module, state, path)


class Normalize(nn.Module):
    """(x - mean) / std with non-persistent buffers, so state_dicts stay checkpoint-compatible."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


# --- ResNet (He et al. 2016), torchvision's layout and parameter names --------------------------

class BasicBlock(nn.Module):
    """Two 3x3 convs + identity (ResNet-18/34). Dilation allowed (torchvision forbids it; our choice)."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with fixed statistics and affine parameters (Caffe DeepLab / AdaptSegNet / CLAN):
    always normalises with the running statistics; weight and bias do not train. Same keys as BatchNorm2d."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__(num_features, eps=eps)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4) + identity (ResNet-50/101/152, torchvision's v1.5).
    `stride_in_1x1`: the stride sits in the first 1x1 conv instead (the original Caffe ResNet, v1)."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1, norm=nn.BatchNorm2d,
                 stride_in_1x1=False):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, s1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


RESNET_LAYERS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3]),
                 101: (Bottleneck, [3, 4, 23, 3]), 152: (Bottleneck, [3, 8, 36, 3])}


class ResNet(nn.Module):
    """ResNet without its classifier; forward returns the outputs of layer1..layer4 (strides 4, 8, 16, 32
    or, with dilation replacing the last strides, 4, 8, 8, 8 at output stride 8 and 4, 8, 16, 16 at 16).

    style="caffe" is the DeepLab-v2 of AdaptSegNet / CLAN (and of kazuto1011's COCO-Stuff model): the
    stride in the first 1x1 conv of a bottleneck, max pooling with ceil_mode, every block of layer3 /
    layer4 dilated 2 / 4 (output stride 8), BatchNorm frozen (`FrozenBatchNorm2d`). Same names.
    """

    def __init__(self, depth, output_stride=None, style="torchvision"):
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise data.BadInput(f"ResNet depth must be one of {sorted(RESNET_LAYERS)}, got {depth}")
        if style not in ("torchvision", "caffe"):
            raise data.BadInput(f"ResNet style must be 'torchvision' or 'caffe', got {style!r}")
        caffe = style == "caffe"
        if output_stride not in ((None, 8) if caffe else (None, 8, 16, 32)):
            raise data.BadInput(f"output_stride must be 8, 16, 32 or None (caffe style: 8), got {output_stride}")
        block, layers = RESNET_LAYERS[depth]
        if caffe and block is not Bottleneck:
            raise data.BadInput(f"the caffe-style ResNet has bottleneck blocks (depth 50, 101, 152), got {depth}")
        dilate = {8: (False, True, True), 16: (False, False, True)}.get(output_stride, (False, False, False))
        norm = FrozenBatchNorm2d if caffe else nn.BatchNorm2d
        self.inplanes, self.dilation, self.norm, self.caffe = 64, 1, norm, caffe
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=caffe)
        if caffe:  # CLAN / AdaptSegNet: layer3 and layer4 keep stride 8, every block dilated 2 / 4
            self.layer1 = self._make_caffe_layer(64, layers[0], 1, 1)
            self.layer2 = self._make_caffe_layer(128, layers[1], 2, 1)
            self.layer3 = self._make_caffe_layer(256, layers[2], 1, 2)
            self.layer4 = self._make_caffe_layer(512, layers[3], 1, 4)
        else:
            self.layer1 = self._make_layer(block, 64, layers[0])
            self.layer2 = self._make_layer(block, 128, layers[1], 2, dilate[0])
            self.layer3 = self._make_layer(block, 256, layers[2], 2, dilate[1])
            self.layer4 = self._make_layer(block, 512, layers[3], 2, dilate[2])
        self.channels = [64 * block.expansion, 128 * block.expansion, 256 * block.expansion, 512 * block.expansion]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_caffe_layer(self, planes, blocks, stride, dilation):
        """Caffe DeepLab-v2: the stride in the first 1x1 conv; every block of the layer at `dilation`."""
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), self.norm(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, dilation, self.norm, stride_in_1x1=True)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, dilation=dilation, norm=self.norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        """As torchvision: a dilated layer keeps the previous dilation in its first block."""
        previous_dilation = self.dilation
        if dilate:
            self.dilation, stride = self.dilation * stride, 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


def resnet(depth, output_stride=None, pretrained=None, style="torchvision"):
    """ResNet-`depth` with torchvision's names (no fc); `pretrained`: a torchvision ImageNet checkpoint.
    style="caffe": the DeepLab-v2 backbone of AdaptSegNet / CLAN (see `ResNet`)."""
    model = ResNet(depth, output_stride, style)
    if pretrained:
        load_pretrained(model, pretrained, f"resnet{depth}")
    return model


def upsample(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# --- DeepLab-v2 (Chen et al. 2017), as trained by ASH (Sec. 4) and CLAN -------------------------

class ASPPClassifier(nn.Module):
    """DeepLab-v2's ASPP classifier: four 3x3 convs with dilations 6/12/18/24 whose outputs are summed."""

    def __init__(self, in_channels, num_classes, dilations=(6, 12, 18, 24)):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations)
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        return sum(conv(x) for conv in self.conv2d_list)


class CaffeNormalize(nn.Module):
    """RGB in [0, 1] -> BGR in [0, 255] minus the per-channel mean, the input of Caffe-trained DeepLab
    models (AdaptSegNet's IMG_MEAN; kazuto1011's MEAN 104.008 / 116.669 / 122.675)."""

    def __init__(self, mean_bgr=CAFFE_MEAN_BGR):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean_bgr).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return x.flip(1) * 255.0 - self.mean


class DeepLabV2(nn.Module):
    """Dilated ResNet (output stride 8) + ASPP classifier `layer5`.

    style="torchvision": torchvision's ResNet, dilated as `replace_stride_with_dilation` (the first
    block of a dilated layer keeps the previous dilation), trained BatchNorm, ImageNet mean / std;
    `pretrained` is torchvision's ImageNet checkpoint. style="caffe": the form of AdaptSegNet / CLAN
    and ASH (`ResNet(style="caffe")`, BGR mean-subtracted input); `pretrained` is AdaptSegNet's
    MS-COCO-initialised DeepLab_resnet_pretrained_init-f81d91e8.pth (`load_adaptsegnet_init`).
    `multi_level=True` adds a second ASPP classifier `layer6` on the same layer4 features, as in CLAN
    (the baseline of ASH, Table 5); `forward` then returns the sum of both (CLAN's prediction) and
    `heads(x)` returns each. Attribute names `layer5`/`layer6`/`conv2d_list` follow AdaptSegNet/CLAN.
    """

    def __init__(self, num_classes=19, depth=101, multi_level=False, pretrained=None, style="torchvision"):
        super().__init__()
        caffe = style == "caffe"
        self.normalize = CaffeNormalize() if caffe else Normalize()
        self.backbone = resnet(depth, output_stride=8, pretrained=None if caffe else pretrained, style=style)
        self.layer5 = ASPPClassifier(self.backbone.channels[3], num_classes)
        self.layer6 = ASPPClassifier(self.backbone.channels[3], num_classes) if multi_level else None
        if caffe and pretrained:
            load_adaptsegnet_init(self, pretrained)

    def heads(self, x):
        """Logits of each classifier at the input resolution: [(N, C, H, W)] (two with multi_level)."""
        feat = self.backbone(self.normalize(x))[3]
        classifiers = [self.layer5] + ([self.layer6] if self.layer6 is not None else [])
        return [upsample(c(feat), x.shape[-2:]) for c in classifiers]

    def forward(self, x):
        return sum(self.heads(x))

    def param_groups(self, lr):
        """Backbone at lr, classifiers at 10 x lr (DeepLab-v2 / AdaptSegNet / CLAN recipe); frozen
        BatchNorm parameters (caffe style) are left out."""
        head = [p for m in (self.layer5, self.layer6) if m is not None for p in m.parameters()]
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr},
                {"params": head, "lr": 10 * lr}]


def read_checkpoint(path, name):
    """A state_dict from a published checkpoint file (unwrapping "state_dict" / "model"), or
    data.MissingFile naming the path and where the file is published (PUBLISHED[name])."""
    path = Path(path)
    if not path.is_file():
        raise data.MissingFile(f"{name} weights not found at {path}; published at {PUBLISHED[name]}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise data.BadInput(f"{path}: not a readable PyTorch checkpoint of {name} ({type(e).__name__}: {e})")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_strict(module, state, source):
    """load_state_dict(strict=True), where checkpoints from before PyTorch 0.4.1 (no BatchNorm
    `num_batches_tracked`) get the module's own counters; a mismatch raises data.BadInput."""
    own = module.state_dict()
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise data.BadInput(f"{source} does not fit: {str(e).splitlines()[0]} {_key_differences(own, state)}")
    return module


def _key_differences(own, state):
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    return f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]})"


def load_adaptsegnet_init(model, path):
    """AdaptSegNet's DeepLab_resnet_pretrained_init-f81d91e8.pth (MS-COCO DeepLab-v2, the start of
    AdaptSegNet, CLAN and ASH) into a caffe-style `DeepLabV2`: keys `Scale.<resnet key>` and
    `Scale.layer5.conv2d_list.<i>.*`; the classifier is skipped when its class count differs (as
    AdaptSegNet does) and CLAN's `layer6` keeps its initialisation."""
    state = read_checkpoint(path, "adaptsegnet-init")
    own = model.state_dict()
    converted = {}
    for key, value in state.items():
        key = key[len("Scale."):] if key.startswith("Scale.") else key
        key = key if key.startswith("layer5.") else "backbone." + key
        if key.startswith("layer5.") and key in own and own[key].shape != value.shape:
            continue  # another class count: keep our classifier
        converted[key] = value
    for key in own:
        if key.startswith(("layer5.", "layer6.")) and key not in converted:
            converted[key] = own[key]
    return load_strict(model, converted, path)


# --- DeepLab-v3+ (Chen et al. 2018), Robusta's segmenter (F.1, Table A4) -------------------------

def conv_bn_relu(cin, cout, k=1, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPPPooling(nn.Sequential):
    """Image-level branch of ASPP: global average pool, 1x1 conv, BN, ReLU, broadcast back."""

    def __init__(self, cin, cout):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))

    def forward(self, x):
        return super().forward(x).expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """DeepLab-v3 ASPP: 1x1 conv, three dilated 3x3 convs, image pooling; concatenated, projected to 256."""

    def __init__(self, cin, rates, cout=256):
        super().__init__()
        self.convs = nn.ModuleList([conv_bn_relu(cin, cout)] + [conv_bn_relu(cin, cout, 3, r) for r in rates]
                                   + [ASPPPooling(cin, cout)])
        self.project = nn.Sequential(nn.Conv2d(5 * cout, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True), nn.Dropout(0.1))

    def forward(self, x):
        return self.project(torch.cat([conv(x) for conv in self.convs], 1))


class DeepLabV3Plus(nn.Module):
    """Dilated ResNet + ASPP (rates 12/24/36 at output stride 8, 6/12/18 at 16) + decoder that fuses
    the upsampled ASPP output with 48-channel projected layer1 features (two 3x3 convs, then 1x1)."""

    def __init__(self, num_classes=19, depth=101, output_stride=8, pretrained=None):
        super().__init__()
        rates = {8: (12, 24, 36), 16: (6, 12, 18)}[output_stride]
        self.normalize = Normalize()
        self.backbone = resnet(depth, output_stride=output_stride, pretrained=pretrained)
        self.aspp = ASPP(self.backbone.channels[3], rates)
        self.low_level = conv_bn_relu(self.backbone.channels[0], 48)
        self.decoder = nn.Sequential(conv_bn_relu(256 + 48, 256, 3), conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.backbone_lr_mult = 0.1 if pretrained else 1.0

    def forward(self, x):
        c1, _, _, c4 = self.backbone(self.normalize(x))
        y = upsample(self.aspp(c4), c1.shape[-2:])
        y = self.decoder(torch.cat([y, self.low_level(c1)], 1))
        return upsample(self.classifier(y), x.shape[-2:])

    def param_groups(self, lr):
        """Head at lr; an ImageNet-initialised backbone at 0.1 x lr (our choice: the public
        DeepLabV3Plus-Pytorch recipe, whose Cityscapes settings lr 0.1 / crop 768 / poly match Table A4),
        a backbone trained from scratch at lr."""
        head = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return [{"params": list(self.backbone.parameters()), "lr": self.backbone_lr_mult * lr},
                {"params": head, "lr": lr}]


# --- SegFormer (Xie et al. 2021): MiT encoder + all-MLP decoder (Robusta's G_coarse branch, Table A7) --

# widths, depths (official mix_transformer.py); heads 1/2/5/8, spatial reduction 8/4/2/1, MLP ratio 4.
MIT = {"b0": ([32, 64, 160, 256], [2, 2, 2, 2]), "b1": ([64, 128, 320, 512], [2, 2, 2, 2]),
       "b2": ([64, 128, 320, 512], [3, 4, 6, 3]), "b3": ([64, 128, 320, 512], [3, 4, 18, 3]),
       "b4": ([64, 128, 320, 512], [3, 8, 27, 3]), "b5": ([64, 128, 320, 512], [3, 6, 40, 3])}
MIT_HEADS, MIT_SR_RATIOS = [1, 2, 5, 8], [8, 4, 2, 1]
DECODER_DIM = {"b0": 256, "b1": 256, "b2": 768, "b3": 768, "b4": 768, "b5": 768}


def init_mit(m):
    """The official initialisation: truncated normal (std 0.02) for linears, fan-out normal for convs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch merging: a strided conv (7/4 for stage 1, 3/2 after) then LayerNorm on tokens."""

    def __init__(self, cin, dim, patch_size, stride):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch_size, stride, patch_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w  # (N, h*w, dim)


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a sequence shortened by a strided conv
    (spatial reduction ratio R: N tokens -> N / R^2)."""

    def __init__(self, dim, heads, sr_ratio):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x, h, w):
        n, length, c = x.shape
        q = self.q(x).reshape(n, length, self.heads, c // self.heads).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(n, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.proj(x.transpose(1, 2).reshape(n, length, c))


class DWConv(nn.Module):
    """3x3 depthwise conv on a token sequence (the positional information of Mix-FFN)."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h, w):
        n, _, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Mix-FFN: fc1 -> 3x3 depthwise conv -> GELU -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class MiTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + Mix-FFN(norm2(x))."""

    def __init__(self, dim, heads, sr_ratio, drop_path_rate, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientAttention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = drop_path_rate

    def forward(self, x, h, w):
        x = x + drop_path(self.attn(self.norm1(x), h, w), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x), h, w), self.drop_path, self.training)


class MixVisionTransformer(nn.Module):
    """The MiT encoder; keys match the official mit_b*.pth (patch_embed1..4, block1..4, norm1..4).

    forward(x) -> [(N, C1, H/4, W/4), (N, C2, H/8, W/8), (N, C3, H/16, W/16), (N, C4, H/32, W/32)].
    """

    def __init__(self, variant="b0", in_channels=3, drop_path_rate=0.1):
        super().__init__()
        if variant not in MIT:
            raise data.BadInput(f"SegFormer variant must be one of {sorted(MIT)}, got {variant!r}")
        widths, depths = MIT[variant]
        self.channels = widths
        n = sum(depths)
        rates = [drop_path_rate * i / max(1, n - 1) for i in range(n)]  # stochastic depth: linear decay rule
        cins = [in_channels] + widths[:3]
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(cins[i], widths[i], 7 if i == 0 else 3,
                                                                   4 if i == 0 else 2))
            first = sum(depths[:i])
            setattr(self, f"block{i + 1}", nn.ModuleList(
                MiTBlock(widths[i], MIT_HEADS[i], MIT_SR_RATIOS[i], rates[first + j]) for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(widths[i], eps=1e-6))
        self.apply(init_mit)

    def forward(self, x):
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            outs.append(x)
        return outs


class MLP(nn.Module):
    """The decoder's per-stage linear embedding (a 1x1 conv written as a Linear on tokens)."""

    def __init__(self, cin, dim):
        super().__init__()
        self.proj = nn.Linear(cin, dim)

    def forward(self, x):
        n, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, -1, h, w)


class ConvModule(nn.Sequential):
    """1x1 conv + BN + ReLU, with mmcv's ConvModule names (conv, bn) as in official checkpoints."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)


class SegFormerHead(nn.Module):
    """All-MLP decoder: project each stage to embed_dim, upsample to H/4, concatenate (c4, c3, c2, c1),
    fuse with a 1x1 conv-BN-ReLU (`linear_fuse`), dropout 0.1, classify (`linear_pred`)."""

    def __init__(self, channels, dim, num_classes):
        super().__init__()
        for i in range(4):
            setattr(self, f"linear_c{i + 1}", MLP(channels[i], dim))
        self.linear_fuse = ConvModule(4 * dim, dim)
        self.dropout = nn.Dropout(0.1)
        self.linear_pred = nn.Conv2d(dim, num_classes, 1)

    def fuse(self, feats):
        size = feats[0].shape[-2:]
        ys = [upsample(getattr(self, f"linear_c{i + 1}")(feats[i]), size) for i in (3, 2, 1, 0)]
        return self.linear_fuse(torch.cat(ys, 1))  # (N, dim, H/4, W/4)

    def forward(self, feats):
        return self.linear_pred(self.dropout(self.fuse(feats)))


class SegFormer(nn.Module):
    """SegFormer-`variant` (b0..b5): MiT encoder (`.encoder`) + all-MLP decoder (`.decode_head`).

    `in_channels` other than 3 (Robusta feeds a 35-channel one-hot label map) gets no normalisation
    unless `normalize=(mean, std)` is given. `features(x)` returns the decoder's fused features
    (N, embed_dim, H/4, W/4), before dropout and classifier (Robusta's G_coarse branch, Fig. A1).
    """

    def __init__(self, variant="b0", num_classes=19, in_channels=3, normalize=None, pretrained=None):
        super().__init__()
        if normalize is None:
            normalize = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else None
        self.normalize = Normalize(*normalize) if normalize else nn.Identity()
        self.encoder = MixVisionTransformer(variant, in_channels)
        if pretrained:
            load_pretrained(self.encoder, pretrained, f"mit_{variant}")
        self.embed_dim = DECODER_DIM[variant]
        self.decode_head = SegFormerHead(self.encoder.channels, self.embed_dim, num_classes)

    def features(self, x):
        return self.decode_head.fuse(self.encoder(self.normalize(x)))

    def forward(self, x):
        return upsample(self.decode_head(self.encoder(self.normalize(x))), x.shape[-2:])

    def param_groups(self, lr):
        """Encoder at lr, decoder at 10 x lr (the official SegFormer recipe, head lr_mult 10)."""
        return [{"params": list(self.encoder.parameters()), "lr": lr},
                {"params": list(self.decode_head.parameters()), "lr": 10 * lr}]


MODELS = [f"deeplabv2-r{d}" for d in (18, 34, 50, 101)] + [f"deeplabv3plus-r{d}" for d in (18, 50, 101)] \
    + [f"segformer-b{i}" for i in range(6)]


def build_model(name, num_classes=19, pretrained=None, **kwargs):
    """A segmenter by name: deeplabv2-r{18,34,50,101}, deeplabv3plus-r{18,50,101}, segformer-b{0..5}.

    `pretrained` is the backbone's ImageNet checkpoint (torchvision resnet*.pth or mit_b*.pth);
    extra keyword arguments go to the class (e.g. output_stride, multi_level).
    """
    if name not in MODELS:
        raise data.BadInput(f"unknown model {name!r}; choose from {MODELS}")
    family, size = name.split("-")
    if family == "deeplabv2":
        return DeepLabV2(num_classes, int(size[1:]), pretrained=pretrained, **kwargs)
    if family == "deeplabv3plus":
        return DeepLabV3Plus(num_classes, int(size[1:]), pretrained=pretrained, **kwargs)
    return SegFormer(size, num_classes, pretrained=pretrained, **kwargs)


# --- The papers' fixed evaluators (Robusta Table A5, C.1.2: the SPADE / OASIS protocol) -----------
# Each loads its published checkpoint strictly (parameter names of the reference, or a documented
# key conversion), takes RGB in [0, 1], normalises its input as it was trained, and returns logits
# at the input size. `load_evaluator(name, path)` is the entry point.

EVALUATORS = ("drn-d-105", "upernet-101", "deeplabv2-cocostuff") + tuple(f"segformer-b{i}" for i in range(6))
DRN_MEAN, DRN_STD = (0.290101, 0.328081, 0.286964), (0.182954, 0.186566, 0.184475)  # fyu/drn Cityscapes info.json
KAZUTO_MEAN_BGR = (104.008, 116.669, 122.675)  # kazuto1011/deeplab-pytorch configs/cocostuff164k.yaml


def drn_conv(cin, cout, kernel=3, stride=1, dilation=1):
    """conv - BN - ReLU, DRN-D's plain layers (layer0, 1, 2, 7, 8)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, dilation * (kernel // 2), dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def drn_bottlenecks(inplanes, planes, blocks, stride=1, dilation=1):
    """A DRN residual layer: torchvision-style bottlenecks, every block at `dilation` (DRN-D's layers 5, 6
    use the level's dilation from their first block)."""
    downsample = None
    if stride != 1 or inplanes != planes * 4:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
    return nn.Sequential(Bottleneck(inplanes, planes, stride, downsample, dilation),
                         *[Bottleneck(planes * 4, planes, dilation=dilation) for _ in range(1, blocks)])


class DRNSeg(nn.Module):
    """DRN-D-105 (Yu et al., CVPR 2017) as fyu/drn's `DRNSeg`: `base` = the DRN's layer0..layer8 (output
    stride 8; layers 5 / 6 dilated 2 / 4, layers 7 / 8 plain convs dilated 2 / 1), `seg` a 1x1
    classifier, `up` a fixed bilinear ConvTranspose (x8, per class). Robusta Table A5's Cityscapes evaluator."""

    def __init__(self, num_classes=19):
        super().__init__()
        self.normalize = Normalize(DRN_MEAN, DRN_STD)
        self.base = nn.Sequential(
            drn_conv(3, 16, 7), drn_conv(16, 16), drn_conv(16, 32, stride=2),      # layer0, layer1, layer2
            drn_bottlenecks(32, 64, 3, stride=2), drn_bottlenecks(256, 128, 4, stride=2),   # layer3, layer4
            drn_bottlenecks(512, 256, 23, dilation=2), drn_bottlenecks(1024, 512, 3, dilation=4),  # layer5, 6
            drn_conv(2048, 512, dilation=2), drn_conv(512, 512))                    # layer7, layer8
        self.seg = nn.Conv2d(512, num_classes, 1)
        self.up = nn.ConvTranspose2d(num_classes, num_classes, 16, 8, 4, groups=num_classes, bias=False)
        with torch.no_grad():  # bilinear kernel (fyu/drn's fill_up_weights), not trained
            t = 1 - (torch.arange(16) / 8 - 15 / 16).abs()
            self.up.weight.copy_((t[:, None] * t[None, :]).expand_as(self.up.weight))
        self.up.weight.requires_grad_(False)

    def forward(self, x):
        y = self.up(self.seg(self.base(self.normalize(x))))  # (N, C, 8 ceil(H/8), 8 ceil(W/8))
        return y if y.shape[-2:] == x.shape[-2:] else upsample(y, x.shape[-2:])


class DeepStemResNet(ResNet):
    """The ResNet of CSAILVision/semantic-segmentation-pytorch: a deep stem of three 3x3 convs (64, 64,
    128; conv1..conv3, bn1..bn3) instead of the 7x7, then torchvision's layer1..layer4 (no dilation)."""

    def __init__(self, depth=101):
        nn.Module.__init__(self)
        block, layers = RESNET_LAYERS[depth]
        self.inplanes, self.dilation = 128, 1
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 128, 3, 1, 1, bias=False), nn.BatchNorm2d(128)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.channels = [256, 512, 1024, 2048]

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.maxpool(self.relu(self.bn3(self.conv3(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        return [c1, c2, c3, self.layer4(c3)]


def conv3x3_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UPerNetHead(nn.Module):
    """UPerNet's decoder (Xiao et al., ECCV 2018) with CSAILVision's names: pyramid pooling on the last
    stage (pool 1/2/3/6, upsample, 1x1 conv to 512: `ppm_conv`; `ppm_last_conv`), an FPN top-down
    path (`fpn_in` laterals, `fpn_out` 3x3 convs), fusion of all levels at 1/4 (`conv_last`)."""

    def __init__(self, num_classes=150, fc_dim=2048, fpn_inplanes=(256, 512, 1024, 2048), fpn_dim=512,
                 pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.pool_scales = pool_scales
        self.ppm_conv = nn.ModuleList(nn.Sequential(nn.Conv2d(fc_dim, 512, 1, bias=False), nn.BatchNorm2d(512),
                                                    nn.ReLU(inplace=True)) for _ in pool_scales)
        self.ppm_last_conv = conv3x3_bn_relu(fc_dim + len(pool_scales) * 512, fpn_dim)
        self.fpn_in = nn.ModuleList(nn.Sequential(nn.Conv2d(c, fpn_dim, 1, bias=False), nn.BatchNorm2d(fpn_dim),
                                                  nn.ReLU(inplace=True)) for c in fpn_inplanes[:-1])
        self.fpn_out = nn.ModuleList(nn.Sequential(conv3x3_bn_relu(fpn_dim, fpn_dim)) for _ in fpn_inplanes[:-1])
        self.conv_last = nn.Sequential(conv3x3_bn_relu(len(fpn_inplanes) * fpn_dim, fpn_dim),
                                       nn.Conv2d(fpn_dim, num_classes, 1))

    def forward(self, feats):
        c5 = feats[-1]
        ppm = [c5] + [conv(upsample(F.adaptive_avg_pool2d(c5, s), c5.shape[-2:]))
                      for s, conv in zip(self.pool_scales, self.ppm_conv)]
        f = self.ppm_last_conv(torch.cat(ppm, 1))
        levels = [f]
        for i in reversed(range(len(feats) - 1)):  # top-down: lateral + upsampled coarser level
            f = self.fpn_in[i](feats[i]) + upsample(f, feats[i].shape[-2:])
            levels.insert(0, self.fpn_out[i](f))
        size = levels[0].shape[-2:]
        return self.conv_last(torch.cat([levels[0]] + [upsample(l, size) for l in levels[1:]], 1))  # (N, C, H/4, W/4)


class UPerNet(nn.Module):
    """UPerNet-101 of CSAILVision (config ade20k-resnet101-upernet): `encoder` (DeepStemResNet-101) and
    `decoder` (UPerNetHead), loaded from encoder_epoch_50.pth / decoder_epoch_50.pth. Robusta Table A5's
    ADE20K evaluator; ImageNet mean / std input."""

    def __init__(self, num_classes=150):
        super().__init__()
        self.normalize = Normalize()
        self.encoder = DeepStemResNet(101)
        self.decoder = UPerNetHead(num_classes)

    def forward(self, x):
        return upsample(self.decoder(self.encoder(self.normalize(x))), x.shape[-2:])


def kazuto_to_caffe_deeplabv2(state):
    """kazuto1011/deeplab-pytorch DeepLabV2 keys -> `DeepLabV2(style="caffe")` keys: layer1.conv1.{conv,bn}
    -> backbone.{conv1,bn1}; layer<k>.block<j>.{reduce,conv3x3,increase,shortcut}.{conv,bn} ->
    backbone.layer<k-1>.<j-1>.{conv1/bn1, conv2/bn2, conv3/bn3, downsample.0/1}; aspp.c<i> ->
    layer5.conv2d_list.<i>. The MSC wrapper's `base.` (and DataParallel's `module.`) are dropped."""
    parts = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3"),
             "shortcut": ("downsample.0", "downsample.1")}
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "base."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        k = key.split(".")
        if k[0] == "aspp":
            new = f"layer5.conv2d_list.{k[1][1:]}.{k[2]}"
        elif k[0] == "layer1":
            new = f"backbone.{'conv1' if k[2] == 'conv' else 'bn1'}.{k[3]}"
        else:
            conv, bn = parts[k[2]]
            new = f"backbone.layer{int(k[0][5:]) - 1}.{int(k[1][5:]) - 1}.{conv if k[3] == 'conv' else bn}.{k[4]}"
        out[new] = value
    return out


def mmseg_to_segformer(state):
    """NVlabs / mmseg SegFormer checkpoint keys -> `SegFormer` keys: backbone.* -> encoder.*; decode_head.*
    kept (linear_c1..4.proj, linear_fuse.conv / .bn, linear_pred). The mmseg base head's `conv_seg` is
    the classifier where there is no `linear_pred` (mmsegmentation), else unused (NVlabs) and dropped."""
    out = {}
    has_pred = any(k.startswith("decode_head.linear_pred.") for k in state)
    for key, value in state.items():
        if key.startswith("backbone."):
            out["encoder." + key[len("backbone."):]] = value
        elif key.startswith("decode_head.conv_seg."):
            if not has_pred:
                out["decode_head.linear_pred." + key.split(".")[-1]] = value
        elif key.startswith("decode_head."):
            out[key] = value
    return out


def load_evaluator(name, path, num_classes=None):
    """A fixed pretrained segmenter (Robusta Table A5 / ASH's baselines) in eval mode, from its published
    checkpoint: forward(RGB in [0, 1], (B, 3, H, W)) -> logits (B, C, H, W); it normalises its input.

    name in EVALUATORS: "drn-d-105" (fyu/drn, Cityscapes), "upernet-101" (CSAILVision, ADE20K; `path` is
    the folder with encoder_epoch_*.pth and decoder_epoch_*.pth), "deeplabv2-cocostuff" (kazuto1011,
    COCO-Stuff 164k, single scale), "segformer-b0".."b5" (NVlabs / mmseg full checkpoints). The class
    count is read from the checkpoint unless `num_classes` is given. A missing file raises
    data.MissingFile naming the path and where the file is published."""
    if name not in EVALUATORS:
        raise data.BadInput(f"unknown evaluator {name!r}; choose from {EVALUATORS}")
    path = Path(path)
    if name == "upernet-101":
        files = {part: sorted(path.glob(f"{part}_epoch_*.pth")) if path.is_dir() else [] for part in ("encoder", "decoder")}
        for part, found in files.items():
            if not found:
                raise data.MissingFile(f"upernet-101: no {part}_epoch_*.pth in {path}; published at {PUBLISHED[name]}")
        encoder = read_checkpoint(files["encoder"][-1], name)
        decoder = read_checkpoint(files["decoder"][-1], name)
        model = UPerNet(num_classes or decoder["conv_last.1.weight"].shape[0])
        load_strict(model.encoder, encoder, files["encoder"][-1])
        load_strict(model.decoder, decoder, files["decoder"][-1])
        return model.eval()
    state = read_checkpoint(path, name)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if name == "drn-d-105":
        model = DRNSeg(num_classes or state["seg.weight"].shape[0])
    elif name == "deeplabv2-cocostuff":
        state = kazuto_to_caffe_deeplabv2(state)
        model = DeepLabV2(num_classes or state["layer5.conv2d_list.0.weight"].shape[0], 101, style="caffe")
        model.normalize = CaffeNormalize(KAZUTO_MEAN_BGR)
    else:
        state = mmseg_to_segformer(state)
        model = SegFormer(name.split("-")[1], num_classes or state["decode_head.linear_pred.weight"].shape[0])
    return load_strict(model, state, path).eval()


# ---------------------------------------------------------------------------------------------
# 3. Training: datasets, the mean teacher of Robusta F.1, Table A4 presets, the loop
# ---------------------------------------------------------------------------------------------

class GeneratedDataset(data.Cityscapes):
    """A dataset written by robusta.py's generation: a Cityscapes tree (`_leftImg8bit.png`,
    `_gtFine_labelIds.png`) plus `manifest.json` (generator checkpoint hash, edits, seeds)."""

    def __init__(self, root, split="train", size=None, transform=None):
        manifest = Path(root) / "manifest.json"
        if not manifest.is_file():
            raise data.MissingFile(f"{manifest} not found: a generated dataset is the folder written by "
                                    f"robusta.py's generation (Cityscapes layout + manifest.json)")
        self.manifest = json.loads(manifest.read_text())
        super().__init__(root, split, size=size, transform=transform)


# StreetHazards' own classes: PNG value v -> class v - 1 (hendrycks/anomaly-seg); 14 is the anomaly.
STREETHAZARDS_CLASSES = ["unlabeled", "building", "fence", "other", "pedestrian", "pole", "road line", "road",
                         "sidewalk", "vegetation", "car", "wall", "traffic sign"]


class StreetHazardsBenchmark(data.StreetHazards):
    """StreetHazards as its benchmark scores it (hendrycks/anomaly-seg): the segmenter learns the
    dataset's own 13 classes (PNG value v -> class v - 1, "unlabeled" and "other" included); at
    test time the anomaly (PNG 14, class 13) is the positive class and every other pixel a negative
    ("anomaly" = 1 / 0, no void); in "labels" the anomaly is ignored (255) for mIoU."""

    num_classes, class_names = 13, STREETHAZARDS_CLASSES
    train_table = data._table([(v, v - 1) for v in range(1, 14)], data.IGNORE_INDEX)

    def extra(self, s, raw):
        return {"anomaly": torch.from_numpy((raw == data.STREETHAZARDS_ANOMALY).astype(np.uint8))}


BDD_ANOMALY_TRAINIDS = (16, 17)  # train, motorcycle: the anomaly classes of BDD-Anomaly
BDD_ANOMALY_CLASSES = [n for t, n in enumerate(data.CLASS_NAMES) if t not in BDD_ANOMALY_TRAINIDS]


class BDDAnomaly(data.BDD100K):
    """BDD-Anomaly (hendrycks/anomaly-seg, from BDD100K segmentation): train and motorcycle are the
    anomalies. "train" drops every image whose label holds one of them; "val" keeps every image,
    with "anomaly" = 1 on them, 0 on the other 17 classes, 255 on void (our choice: void is no
    negative). The segmenter learns 17 classes (the 19 trainIds without 16 and 17, in order)."""

    num_classes, class_names = 17, BDD_ANOMALY_CLASSES
    train_table = data._table([(t, i) for i, t in enumerate(t for t in range(19) if t not in BDD_ANOMALY_TRAINIDS)],
                              data.IGNORE_INDEX)

    def __init__(self, root, split="train", size=None, transform=None, **kwargs):
        super().__init__(root, split, size, transform, **kwargs)
        if split == "train":
            keep = [s for s in self.samples
                    if not np.isin(data.read_label(s["label"]).numpy(), BDD_ANOMALY_TRAINIDS).any()]
            print(f"BDD-Anomaly: {len(self.samples) - len(keep)} of {len(self.samples)} training images hold "
                  f"train / motorcycle and are left out", flush=True)
            self.samples = keep

    def extra(self, s, raw):
        anomaly = np.where(raw == data.IGNORE_INDEX, 255, np.isin(raw, BDD_ANOMALY_TRAINIDS)).astype(np.uint8)
        return {"anomaly": torch.from_numpy(anomaly)}


def collate(samples):
    """Batch the keys every segmentation dataset shares (real and generated sets differ in extras)."""
    batch = {"image": torch.stack([s["image"] for s in samples]),
             "labels": torch.stack([s["labels"] for s in samples]), "name": [s["name"] for s in samples]}
    if all("anomaly" in s for s in samples):
        batch["anomaly"] = torch.stack([s["anomaly"] for s in samples])
    return batch


class MeanTeacher:
    """Robusta F.1: a teacher DNN that is the exponential moving average of the student
    (Tarvainen & Valpola, 2017) and pseudo-labels the generated images for the student.

    Our choices where F.1 is silent: EMA decay 0.999 with Tarvainen's ramp min(decay, 1 - 1/(step+1));
    buffers (BN statistics) copied from the student; pseudo-labels are the teacher's argmax where
    its max softmax probability reaches `threshold` (elsewhere 255, ignored); the pseudo-label loss
    is weighted by the fraction of confident pixels (`pseudo_label_loss`, as DACS / DAFormer).
    Build it after `Run.wrap` (DDP's initial broadcast), so that every rank starts from one teacher,
    and `update` it only after a step the optimizer really took (`Run.update_scaler`).
    """

    def __init__(self, student, decay=0.999):
        self.teacher = copy.deepcopy(unwrap(student)).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, student, step):
        decay = min(self.decay, 1.0 - 1.0 / (step + 1))
        student = unwrap(student)
        for t, s in zip(self.teacher.parameters(), student.parameters()):
            t.lerp_(s.detach(), 1.0 - decay)  # Robusta F.1: teacher = EMA of the student
        for t, s in zip(self.teacher.buffers(), student.buffers()):
            t.copy_(s)

    @torch.no_grad()
    def pseudo_labels(self, images, threshold):
        confidence, labels = self.teacher(images).softmax(1).max(1)  # (N, H, W)
        return labels.masked_fill(confidence < threshold, data.IGNORE_INDEX)


def pseudo_label_loss(logits, pseudo):
    """Cross-entropy summed over the confident pixels / all pixels: the mean over confident pixels
    weighted by their fraction (DACS / DAFormer), hence 0, not NaN, when no pixel is confident.
    logits (N, C, H, W), pseudo (N, H, W) with 255 where the teacher is not confident."""
    ce = F.cross_entropy(logits, pseudo, ignore_index=data.IGNORE_INDEX, reduction="sum")
    return ce / pseudo.numel()


# Table A4 (Robusta supplementary): DeepLab-v3+, output stride 8, SGD + poly. "epochs" count passes
# over the real + generated training set; crop None = whole images.
PRESETS = {
    "streethazards": dict(model="deeplabv3plus-r50", lr=0.02, batch_size=4, epochs=25, weight_decay=1e-4, crop=None),
    "bdd-anomaly": dict(model="deeplabv3plus-r50", lr=0.02, batch_size=4, epochs=25, weight_decay=1e-4, crop=None),
    "cityscapes": dict(model="deeplabv3plus-r101", lr=0.1, batch_size=8, epochs=80, weight_decay=1e-4,
                       crop=(768, 768)),
    "streethazards-ood": dict(model="deeplabv3plus-r50", lr=0.002, batch_size=6, epochs=15, weight_decay=0.0,
                              crop=(80, 150)),
    "bdd-anomaly-ood": dict(model="deeplabv3plus-r50", lr=0.002, batch_size=6, epochs=15, weight_decay=0.0,
                            crop=(80, 150)),
    # Our choice, not in the paper: the ToyCity demo (from scratch, CPU, under 10 minutes on 2 cores):
    # 4 minutes of training on random 64x128 crops, then evaluation on 20 images per split.
    "toycity-demo": dict(model="deeplabv3plus-r50", lr=0.02, batch_size=4, epochs=None, weight_decay=1e-4,
                         crop=(64, 128), size=(128, 256), output_stride=16, train_minutes=4.0,
                         corruptions=["gaussian_noise", "motion_blur", "fog", "contrast"], severities=[3],
                         max_eval_images=20),
}
DATASET_PRESET = {"toycity": "toycity-demo", "cityscapes": "cityscapes", "streethazards": "streethazards",
                  "bdd100k": "bdd-anomaly", "bdd-anomaly": "bdd-anomaly"}
# SegFormer's own recipe (Xie et al.): AdamW, lr 6e-5, weight decay 0.01, poly power 1.
SEGFORMER_RECIPE = dict(optimizer="adamw", lr=6e-5, weight_decay=0.01, poly_power=1.0)
# Everything else: DeepLab's SGD recipe.
DEFAULTS = dict(optimizer="sgd", poly_power=0.9, output_stride=8, severities=[1, 2, 3, 4, 5])

# --dataset name -> reader (data.py's, or a benchmark protocol above); the split each trains on
DATASETS = {"toycity": data.Cityscapes, "cityscapes": data.Cityscapes, "gta5": data.GTA5, "synthia": data.Synthia,
            "mapillary": data.Mapillary, "bdd100k": data.BDD100K, "bdd-anomaly": BDDAnomaly,
            "streethazards": StreetHazardsBenchmark}
TRAIN_SPLIT = {"gta5": "all", "synthia": "all"}  # domain generalisation trains on every image
# --ood-dataset name -> reader whose samples carry an "anomaly" map (ToyCity's outlier/ is a cityscapes layout)
OOD_DATASETS = {"cityscapes": data.Cityscapes, "streethazards": StreetHazardsBenchmark, "bdd-anomaly": BDDAnomaly}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="toycity", choices=sorted(DATASETS), help="training dataset")
    p.add_argument("--data-root", default=None,
                   help="dataset root (toycity: a root with source/ target/ outlier/; default: the cached ToyCity)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="settings of Table A4 (default: the dataset's); explicit flags override")
    p.add_argument("--model", default=None, choices=MODELS, help="segmenter (Table A4: deeplabv3plus-r50/r101)")
    p.add_argument("--output-stride", type=int, default=None, choices=[8, 16],
                   help="DeepLab-v3+ output stride (Table A4: 8)")
    p.add_argument("--multi-level", action="store_true", help="DeepLab-v2: second classifier as in CLAN")
    p.add_argument("--style", default="torchvision", choices=["torchvision", "caffe"],
                   help="DeepLab-v2 backbone: torchvision's ResNet, or CLAN / AdaptSegNet's Caffe form (stride in the "
                        "first 1x1 conv, every layer3 / layer4 block dilated 2 / 4, BN frozen; --pretrained then "
                        "reads DeepLab_resnet_pretrained_init-f81d91e8.pth)")
    p.add_argument("--pretrained", default=None, help="ImageNet checkpoint of the backbone (resnet*.pth, mit_b*.pth)")
    p.add_argument("--weights", default=None, help="a segmenter checkpoint to start from / evaluate")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adamw"], help="sgd (DeepLab) or adamw (SegFormer)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (Table A4)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (Table A4)")
    p.add_argument("--poly-power", type=float, default=None, help="poly schedule power (0.9 DeepLab, 1.0 SegFormer)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step PER PROCESS (Table A4's are global: under torchrun with N processes the "
                        "effective batch is N times this; see --global-batch-size)")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="images per step over all processes (divided among them; overrides --batch-size)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training set (Table A4)")
    p.add_argument("--steps", type=int, default=None, help="training steps (overrides --epochs)")
    p.add_argument("--train-minutes", type=float, default=None,
                   help="cap the steps so that training takes about this long (rate measured on steps 2-4; 0: no cap)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="resize every image first")
    p.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="random scale (0.5-2) + crop for training (Table A4); default: whole images, flips only")
    p.add_argument("--generated", action="append", default=[],
                   help="a generated dataset (robusta.py) mixed with the real one; repeatable")
    p.add_argument("--no-real", action="store_true", help="train on the generated data only (Table A10, row 4)")
    p.add_argument("--mean-teacher", action="store_true", help="Robusta F.1: EMA teacher + pseudo-labels on generated")
    p.add_argument("--ema", type=float, default=0.999, help="teacher EMA decay (our choice)")
    p.add_argument("--pseudo-threshold", type=float, default=0.9,
                   help="teacher confidence for a pseudo-label (our choice)")
    p.add_argument("--pseudo-weight", type=float, default=1.0,
                   help="weight of the pseudo-label loss, itself weighted by the confident fraction (our choice)")
    p.add_argument("--eval-teacher", action="store_true",
                   help="also evaluate the mean teacher (F.1 does not say which model is evaluated): results['teacher']")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--eval-mode", default="whole", choices=["whole", "slide"], help="whole-image or sliding window")
    p.add_argument("--eval-crop", type=int, nargs=2, default=(512, 1024), help="sliding-window size (H W)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale inference, e.g. 0.75 1 1.25")
    p.add_argument("--eval-batch-size", type=int, default=2)
    p.add_argument("--corruptions", nargs="*", default=None,
                   help="corruptions to evaluate (default: all of data.CORRUPTIONS; give none to skip)")
    p.add_argument("--severities", type=int, nargs="+", default=None, help="corruption severities (default 1..5)")
    p.add_argument("--split-file", default=None,
                   help="train on the images listed in this text file (one name per line); default: the dataset's "
                        "train split (GTA5 / SYNTHIA: every image)")
    p.add_argument("--target-dataset", default=None, choices=sorted(DATASETS), help="unseen domain to evaluate")
    p.add_argument("--target-root", default=None, help="root of --target-dataset")
    p.add_argument("--ood-dataset", default=None, choices=sorted(OOD_DATASETS),
                   help="outlier split with an anomaly map (ToyCity's outlier/ is a cityscapes layout; streethazards: "
                        "its test split; bdd-anomaly: BDD100K val, train / motorcycle positive); --dataset "
                        "streethazards / bdd-anomaly use their own by default")
    p.add_argument("--ood-root", default=None, help="root of --ood-dataset")
    p.add_argument("--max-eval-images", type=int, default=None, help="evaluate on the first N images only (0: all)")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--eval-only", action="store_true", help="evaluate --weights (or the --resume checkpoint)")
    add_run_args(p, "segment")
    return p.parse_args(argv)


def resolve_args(args):
    """Fill unset options: explicit flags > SegFormer recipe (for a SegFormer) > preset (Table A4) > defaults."""
    preset = PRESETS[args.preset or DATASET_PRESET.get(args.dataset, "cityscapes")]
    args.model = args.model or preset["model"]
    recipe = SEGFORMER_RECIPE if args.model.startswith("segformer") else {}
    for key, value in {**DEFAULTS, **preset, **recipe}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.epochs is None and args.steps is None:  # a time budget without a step count: --train-minutes decides
        args.steps = 10**6 if args.train_minutes else 2000
    return args


def dataset_roots(args):
    """(train, val, target val, ood) datasets for args.dataset; ToyCity: source / target / outlier.

    GTA5 and SYNTHIA train on every image ('all', as domain generalisation does) and evaluate on a
    val split only where one exists (GTA5's split.mat or val.txt, SYNTHIA's val.txt); without one,
    source evaluation is skipped with one line. StreetHazards and BDD-Anomaly follow their
    benchmark (`StreetHazardsBenchmark`, `BDDAnomaly`): their test / val split is the OOD set.
    `--no-eval` builds no evaluation set at all."""
    size = tuple(args.size) if args.size else None
    if args.dataset == "toycity":
        cls = data.Cityscapes
        root = Path(args.data_root) if args.data_root else data.toycity(size=tuple(args.size or (128, 256)))
        train = cls(root / "source", "train", size=size, split_file=args.split_file)
        if args.no_eval:
            return train, None, None, None
        val = cls(root / "source", "val", size=size)
        target = cls(root / "target", "val", size=size) if (root / "target").exists() else None
        ood = cls(root / "outlier", "val", size=size) if (root / "outlier").exists() else None
        return train, val, target, ood
    if args.data_root is None:
        raise data.UserError(f"--data-root is required for --dataset {args.dataset}")
    cls = DATASETS[args.dataset]
    train = cls(args.data_root, TRAIN_SPLIT.get(args.dataset, "train"), size=size, split_file=args.split_file)
    if args.no_eval:
        return train, None, None, None
    val = None
    if args.dataset in ("gta5", "synthia"):
        try:
            val = cls(args.data_root, "val", size=size)
        except data.MissingFile:
            print(f"[{args.name}] {args.dataset}: no val split under {args.data_root} (split.mat / val.txt); "
                  f"source evaluation skipped", flush=True)
    elif args.dataset != "bdd-anomaly":  # BDD-Anomaly's val split is its OOD set
        val = cls(args.data_root, "val", size=size)
    target = None
    if args.target_dataset:
        target = DATASETS[args.target_dataset](args.target_root, "val", size=size)
    ood_dataset, ood_root = args.ood_dataset, args.ood_root
    if ood_dataset is None and args.dataset in ("streethazards", "bdd-anomaly"):
        ood_dataset, ood_root = args.dataset, args.data_root  # the benchmark's own OOD split
    ood = None
    if ood_dataset:
        if ood_root is None:
            raise data.UserError(f"--ood-dataset {ood_dataset} needs --ood-root")
        split = {"cityscapes": "val", "streethazards": "test", "bdd-anomaly": "val"}[ood_dataset]
        ood = OOD_DATASETS[ood_dataset](ood_root, split, size=size)
    return train, val, target, ood


def make_optimizer(model, args):
    """SGD (momentum 0.9) or AdamW over the model's param groups; each group remembers its base lr."""
    groups = model.param_groups(args.lr)
    for g in groups:
        g["initial_lr"] = g["lr"]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def jsonable(args):
    """argparse Namespace -> dict of JSON primitives (safe for torch.load(weights_only=True))."""
    return json.loads(json.dumps(vars(args), default=str))


def set_batch_size(args, run):
    """--global-batch-size G -> G / world_size images per process; print the effective batch as the
    run's first line (Table A4's batch sizes are global: under torchrun, --batch-size is per process)."""
    if args.global_batch_size:
        if args.global_batch_size % run.world_size:
            raise data.BadInput(f"--global-batch-size {args.global_batch_size} is not a multiple of the "
                                f"{run.world_size} processes")
        args.batch_size = args.global_batch_size // run.world_size
    if run.is_main:
        print(f"[{args.name}] effective batch {args.batch_size * run.world_size} = {args.batch_size} per process "
              f"x {run.world_size} process{'es' if run.world_size > 1 else ''}", flush=True)


def train_segmenter(args):
    """Train (and evaluate) a segmenter; the CLI of this file. Returns (model, results dict);
    with --eval-teacher, results["teacher"] holds the mean teacher's results."""
    resolve_args(args)
    if args.eval_teacher and not args.mean_teacher:
        raise data.UserError("--eval-teacher evaluates the mean teacher: add --mean-teacher")
    if args.mean_teacher and not args.generated:
        raise data.UserError("--mean-teacher pseudo-labels generated images: give at least one --generated PATH")
    if args.style == "caffe" and not (args.pretrained or args.weights or args.resume):
        raise data.UserError("--style caffe freezes BatchNorm at its pretrained statistics: start from AdaptSegNet's "
                             f"init, --pretrained DeepLab_resnet_pretrained_init-f81d91e8.pth ({PUBLISHED['adaptsegnet-init']})")
    run = Run(args)
    set_batch_size(args, run)
    train_set, val_set, target_set, ood_set = dataset_roots(args)
    num_classes = train_set.num_classes
    transform = [data.RandomFlip()]
    if args.crop:
        transform.insert(0, data.RandomScaleCrop(tuple(args.crop)))
    train_set.transform = data.Compose(transform)
    generated = [GeneratedDataset(root, size=tuple(args.size) if args.size else None, transform=train_set.transform)
                 for root in args.generated]
    supervised = torch.utils.data.ConcatDataset(([] if args.no_real else [train_set]) + generated)

    kwargs = {}
    if args.model.startswith("deeplabv3plus"):
        kwargs["output_stride"] = args.output_stride
    if args.model.startswith("deeplabv2"):
        kwargs.update(multi_level=args.multi_level, style=args.style)
    model = build_model(args.model, num_classes, args.pretrained, **kwargs)
    if args.weights:
        model.load_state_dict(load_weights(args.weights))
    optimizer = make_optimizer(model, args)

    loader = run.loader(supervised, args.batch_size, shuffle=True, drop_last=True, collate_fn=collate)
    total = args.steps or args.epochs * len(loader)
    step = 0
    state = run.resume()
    if args.eval_only and state is None and not args.weights:
        raise data.UserError("--eval-only needs trained weights: --weights PATH or --resume auto|PATH")
    if state is not None:  # modules go to the device before the optimizer state is loaded
        step, total = run.restore(state, {"model": model}, {"optimizer": optimizer}), state["total"]
    model = run.wrap(model)
    teacher = MeanTeacher(model, args.ema) if args.mean_teacher else None  # after DDP's broadcast
    if teacher is not None and state is not None:
        teacher.teacher.load_state_dict(state["teacher"])

    def checkpoint(step):
        state = {"step": step, "total": total, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": run.scaler.state_dict(), "rng": run.rng_state(), "args": jsonable(args)}
        if teacher is not None:
            state["teacher"] = teacher.teacher.state_dict()
        run.save(state)

    if not args.eval_only and step < total:
        pseudo_batches = None
        if teacher is not None:
            pseudo_loader = run.loader(torch.utils.data.ConcatDataset(generated), args.batch_size, shuffle=True,
                                       collate_fn=collate)
            pseudo_batches = run.batches(pseudo_loader, step, total)
        model.train()
        first, t_start = step, None
        measure = args.train_minutes and state is None  # a resumed run keeps the total it measured
        for step, batch in run.batches(loader, step, total):
            for g in optimizer.param_groups:
                g["lr"] = poly_lr(g["initial_lr"], step, total, args.poly_power)  # poly schedule
            images = batch["image"].to(run.device, non_blocking=True)
            labels = batch["labels"].to(run.device, non_blocking=True)
            n = images.shape[0]
            if pseudo_batches is not None:  # Robusta F.1: pseudo-labels of the EMA teacher on generated images
                generated_images = next(pseudo_batches)[1]["image"].to(run.device, non_blocking=True)
                with run.autocast():
                    pseudo = teacher.pseudo_labels(generated_images, args.pseudo_threshold)
                images = torch.cat([images, generated_images])
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with run.autocast():
                logits = model(images).float()
                loss_sup = F.cross_entropy(logits[:n], labels, ignore_index=data.IGNORE_INDEX)
                loss = loss_sup
                if pseudo_batches is not None:  # F.1: supervised and pseudo-label losses together
                    loss_pseudo = pseudo_label_loss(logits[n:], pseudo)
                    loss = loss_sup + args.pseudo_weight * loss_pseudo
            run.check_finite(loss, step)
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            stepped = run.update_scaler()
            if teacher is not None and stepped:  # a step skipped by the fp16 scaler leaves the teacher
                teacher.update(model, step)
            scalars = {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
            if pseudo_batches is not None:
                scalars.update(loss_sup=loss_sup.item(), loss_pseudo=loss_pseudo.item(),
                               pseudo_fraction=(pseudo != data.IGNORE_INDEX).float().mean().item())
            done = step + 1
            if done == first + 1:  # the first step warms up; the next three are timed
                t_start = time.time()
            if measure and done == first + 4:
                total = min(total, budget_steps(run, done, (time.time() - t_start) / 3, args.train_minutes))
            if done % args.log_every == 0 or done == total:
                run.log(done, **scalars)
                run.progress(done, total, **scalars)
            if done % args.checkpoint_every == 0 or done == total:
                checkpoint(done)
            if done >= total:
                break
    if args.no_eval:
        run.close()
        return unwrap(model), {}
    results = {}
    if run.is_main:
        sets = (val_set, target_set, ood_set)
        results, pictures = evaluate_all(unwrap(model), args, run.device, *sets, train_set.class_names)
        if teacher is not None and args.eval_teacher:
            print("\nmean teacher:", flush=True)
            results["teacher"], teacher_pictures = evaluate_all(teacher.teacher, args, run.device, *sets,
                                                                train_set.class_names)
            pictures += [(f"teacher, {heading}", items) for heading, items in teacher_pictures]
        (run.dir / "results.json").write_text(json.dumps(results, indent=2))
        run.write_index(f"segment.py: {args.model} on {args.dataset}", pictures)
        print(f"\nresults: {run.dir / 'results.json'}, pictures: {run.dir / 'index.html'}", flush=True)
    run.close()
    return unwrap(model), results


def budget_steps(run, done, seconds_per_step, minutes):
    """Total steps that fit in `minutes` of training at the measured rate (same on every rank)."""
    steps = torch.tensor([max(done, int(minutes * 60 / seconds_per_step))], device=run.device)
    if run.distributed:
        dist.broadcast(steps, 0)  # gloo/nccl: rank 0 decides for all
    if run.is_main:
        print(f"[{run.args.name}] --train-minutes {minutes}: {seconds_per_step:.2f} s/step -> {int(steps)} steps",
              flush=True)
    return int(steps)


def load_weights(path):
    """A segmenter state_dict from a checkpoint of this file (key "model") or a bare state_dict."""
    path = Path(path)
    if not path.is_file():
        raise data.MissingFile(f"segmenter weights not found at {path} (a runs/<name>/last.pt of segment.py)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)


# ---------------------------------------------------------------------------------------------
# 4. Evaluation: inference, mIoU (clean, corrupted: Table A10 protocol), OOD detection
# ---------------------------------------------------------------------------------------------

def slide_window(model, images, crop, stride=None):
    """Sliding-window inference: average the logits of overlapping crop-sized windows (stride 2/3 crop)."""
    n, _, h, w = images.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride or (max(1, 2 * ch // 3), max(1, 2 * cw // 3))
    logits, count = None, images.new_zeros(1, 1, h, w)
    for i in range(max(h - ch + sh - 1, 0) // sh + 1):
        for j in range(max(w - cw + sw - 1, 0) // sw + 1):
            y1, x1 = min(i * sh, h - ch), min(j * sw, w - cw)
            out = model(images[..., y1:y1 + ch, x1:x1 + cw])
            if logits is None:
                logits = images.new_zeros(n, out.shape[1], h, w)
            logits[..., y1:y1 + ch, x1:x1 + cw] += out
            count[..., y1:y1 + ch, x1:x1 + cw] += 1
    return logits / count


@torch.no_grad()
def predict(model, images, mode="whole", scales=(1.0,), crop=(512, 1024), flip=False):
    """Logits (N, C, H, W) at the input resolution: whole image or sliding window, averaged over
    `scales` (bilinear rescaling of the input) and, with `flip`, horizontal flips."""
    h, w = images.shape[-2:]
    total, count = 0, 0
    for s in scales:
        x = images if s == 1 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            y = model(xi) if mode == "whole" else slide_window(model, xi, crop)
            y = y.flip(-1) if flipped else y
            total, count = total + upsample(y.float(), (h, w)), count + 1
    return total / count


def eval_loader(dataset, batch_size=2, max_images=None, workers=0):
    if max_images and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_images))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                       num_workers=workers)


def in_eval_mode(fn):
    """Run fn(model, ...) with the model in eval mode, and give it back in the mode it had (a training
    loop that evaluates keeps training with dropout and batch statistics)."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)
    return wrapper


@in_eval_mode
@torch.no_grad()
def evaluate(model, loader, device, num_classes=19, **predict_kwargs):
    """One confusion matrix over the whole loader (Cityscapes convention) -> metrics.ConfusionMatrix."""
    cm = metrics.ConfusionMatrix(num_classes)
    for batch in loader:
        logits = predict(model, batch["image"].to(device), **predict_kwargs)
        cm.update(logits.argmax(1).cpu(), batch["labels"])
    return cm


class Corrupted(torch.utils.data.Dataset):
    """A dataset whose images pass through data.corrupt(name, severity), seeded by the index."""

    def __init__(self, dataset, name, severity):
        self.dataset, self.name, self.severity = dataset, name, severity

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = dict(self.dataset[index])
        sample["image"] = data.corrupt(sample["image"], self.name, self.severity, seed=index)
        return sample


def evaluate_corruptions(model, dataset, device, corruptions=None, severities=(1, 2, 3, 4, 5), num_classes=19,
                         batch_size=2, max_images=None, **predict_kwargs):
    """mIoU under every corruption x severity and their mean (Table A10 / Cityscapes-C protocol).

    Returns {"miou": {name: {severity: mIoU}}, "mean": mean over all, "per_corruption": {name: mean}}.
    """
    corruptions = data.CORRUPTIONS if corruptions is None else corruptions
    table = {}
    for name in corruptions:
        table[name] = {}
        for severity in severities:
            loader = eval_loader(Corrupted(dataset, name, severity), batch_size, max_images)
            table[name][severity] = evaluate(model, loader, device, num_classes, **predict_kwargs).miou()
    per = {name: float(np.mean(list(v.values()))) for name, v in table.items()}
    mean = float(np.mean(list(per.values()))) if per else float("nan")  # Table A10: mean over corruptions x severities
    return {"miou": table, "per_corruption": per, "mean": mean}


@in_eval_mode
@torch.no_grad()
def evaluate_ood(model, loader, device, kinds=("msp", "entropy", "maxlogit"), per_image=False, **predict_kwargs):
    """Pixel-level OOD detection on a split with an "anomaly" map (1 = OOD, 0 = in-distribution, 255 = void):
    {kind: {"auroc", "aupr", "fpr95"}} for each anomaly score (max softmax probability, entropy, max
    logit), pooled over every pixel of the split; with `per_image`, also "per_image": their mean over
    the images that hold both OOD and in-distribution pixels, and that number of "images"
    (hendrycks/anomaly-seg's StreetHazards / BDD-Anomaly figures)."""
    meters = {kind: metrics.OODMeter() for kind in kinds}
    rows = {kind: [] for kind in kinds}
    for batch in loader:
        if "anomaly" not in batch:
            raise data.BadInput("evaluate_ood needs samples with an 'anomaly' map (ToyCity outlier/, StreetHazards)")
        logits = predict(model, batch["image"].to(device), **predict_kwargs).cpu()
        anomaly = batch["anomaly"]  # (N, H, W)
        for kind in kinds:
            # Robusta F.2 / Table A4 (outlier detection): pixel-level scores, OOD = positive
            scores = metrics.anomaly_scores(logits, kind)
            meters[kind].update(scores, anomaly == 1, anomaly != 255)
            for s, a in zip(scores, anomaly) if per_image else ():
                if (a == 1).any() and (a == 0).any():  # images that are all ID (or all OOD) have no figure
                    rows[kind].append(metrics._ood_metrics(*metrics._exact_counts(s, a)))  # (AUROC, AP, FPR95)
    results = {kind: meter.compute() for kind, meter in meters.items()}
    if per_image:
        for kind in kinds:
            r = np.array(rows[kind]).reshape(-1, 3)
            mean = r.mean(0) if len(r) else np.full(3, np.nan)
            results[kind]["per_image"] = {"auroc": float(mean[0]), "aupr": float(mean[1]), "fpr95": float(mean[2]),
                                          "images": len(r)}
    return results


@in_eval_mode
def evaluate_all(model, args, device, val_set, target_set, ood_set, class_names=data.CLASS_NAMES):
    """Everything the CLI reports: per-class IoU tables, corruptions, OOD -> (results, pictures), where
    pictures are index.html sections of (caption, image) rows."""
    kw = dict(mode=args.eval_mode, scales=tuple(args.scales), crop=tuple(args.eval_crop))
    num_classes = len(class_names)
    results, pictures = {}, []
    for split, dataset in (("val", val_set), ("target", target_set)):
        if dataset is None:
            continue
        loader = eval_loader(dataset, args.eval_batch_size, args.max_eval_images)
        cm = evaluate(model, loader, device, num_classes, **kw)
        results[split] = {"miou": cm.miou(), "iou": dict(zip(class_names, cm.iou().tolist()))}
        print(f"\n{split}: mIoU {100 * cm.miou():.2f}\n{cm.table(class_names)}", flush=True)
        pictures.append((f"{split}: image / ground truth / prediction", sample_pictures(model, dataset, device, kw)))
    if args.corruptions != [] and val_set is not None:
        corr = evaluate_corruptions(model, val_set, device, args.corruptions, tuple(args.severities),
                                    num_classes, args.eval_batch_size, args.max_eval_images, **kw)
        results["corruptions"] = corr
        print(corruption_table(corr), flush=True)
        name = next(iter(corr["miou"]))
        pictures.append((f"corrupted val ({name}, severity {max(args.severities)})", sample_pictures(
            model, Corrupted(val_set, name, max(args.severities)), device, kw)))
    if ood_set is not None:
        ood = evaluate_ood(model, eval_loader(ood_set, args.eval_batch_size, args.max_eval_images), device,
                           per_image=True, **kw)
        results["ood"] = ood
        print("\nOOD detection (pixels; OOD = positive): pooled over the split | mean over images\n"
              "| score | AUROC | AUPR | FPR95 | AUROC/img | AUPR/img | FPR95/img |\n|---|---:|---:|---:|---:|---:|---:|")
        for kind, m in ood.items():
            i = m["per_image"]
            print(f"| {kind} | {100 * m['auroc']:.2f} | {100 * m['aupr']:.2f} | {100 * m['fpr95']:.2f} | "
                  f"{100 * i['auroc']:.2f} | {100 * i['aupr']:.2f} | {100 * i['fpr95']:.2f} |", flush=True)
        pictures.append(("outlier split: image / ground truth / prediction",
                         sample_pictures(model, ood_set, device, kw)))
    return results, pictures


def corruption_table(corr):
    """A Markdown table of mIoU (%) per corruption (rows) and severity (columns)."""
    severities = list(next(iter(corr["miou"].values())))
    lines = ["\nmIoU (%) under corruptions", "| corruption | " + " | ".join(f"s{s}" for s in severities) + " | mean |",
             "|---|" + "---:|" * (len(severities) + 1)]
    for name, row in corr["miou"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in row.values())
                     + f" | {100 * corr['per_corruption'][name]:.1f} |")
    lines.append(f"| **mean** | " + " | " * len(severities) + f"**{100 * corr['mean']:.1f}** |")
    return "\n".join(lines)


@in_eval_mode
@torch.no_grad()
def sample_pictures(model, dataset, device, predict_kwargs, count=3):
    """[(caption, uint8 (H, 3W, 3) image | colour ground truth | colour prediction)] for index.html."""
    out = []
    for i in range(min(count, len(dataset))):
        sample = dataset[i]
        pred = predict(model, sample["image"][None].to(device), **predict_kwargs).argmax(1)[0].cpu()
        image = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        row = np.concatenate([image, data.colorize(sample["labels"].numpy()), data.colorize(pred.numpy())], 1)
        out.append((sample["name"], row))
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.dataset == "toycity" and not args.data_root:
        announce_demo("segment")
    train_segmenter(args)


if __name__ == "__main__":
    data.cli(main)
