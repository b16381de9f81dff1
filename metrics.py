"""Every metric the two papers report, exact and fast.

Papers: ASH (Tjio et al.) Tables 1-3 (per-class IoU, mIoU over 19, 16 and 13 classes); Robusta (Hariat et
al., WACV 2024) supplementary C.1.2 (FID, mIoU, and OOD detection on Outlier-Cityscapes with AUROC and
AUPR following Hendrycks & Gimpel; FPR95 is the usual companion), Table A5 (FID / mIoU), Appendix
E.1.3 / Figure A3 (spectral distance) and Table A11 (Mult-Adds, parameters, memory).

Contents, in reading order:
  1. Segmentation     `SUBSETS`, `ConfusionMatrix` (Cityscapes convention, bincount, DDP all-reduce).
  2. OOD detection    `anomaly_scores` (msp, entropy, maxlogit), `auroc`, `aupr`, `fpr_at_tpr` (exact, ties),
                      `OODMeter` (streaming, fixed memory, fixed-bin histogram over float32 bit patterns).
  3. FID              `FIDInceptionA/C/E_1/E_2`, `FIDInception` (pytorch-fid's network, loads
                      `pt_inception-2015-12-05-6726825d.pth` strictly), `load_fid_inception`,
                      `inception_statistics` (streamed), `frechet_distance` (float64, no scipy), `fid`.
  4. Spectra          `log_spectrum`, `high_pass_mask`, `spectral_distance` (Robusta E.1.3, `filter_rate` 0/1/2).
  5. Model cost       `count_parameters`, `count_macs` (aten-level counting), `peak_memory` (Table A11).
  6. CLI              `evaluate_folders` (prediction PNGs vs. ground truth), `main`.

Run:
  python metrics.py fid --real DIR --fake DIR --weights pt_inception-2015-12-05-6726825d.pth
  python metrics.py miou --pred DIR --gt DIR --dataset cityscapes
  python metrics.py spectral --real DIR --fake DIR
"""
import argparse
import ctypes
import itertools
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

import data

# ---------------------------------------------------------------------------------------------
# 1. Segmentation: confusion matrix, IoU, mIoU (Cityscapes convention)
# ---------------------------------------------------------------------------------------------

# trainId subsets of ASH Tables 1-3. "16": SYNTHIA's classes (all but terrain 9, truck 14, train 16);
# "13": the columns of ASH Table 2 (the 16 without wall 3, fence 4, pole 5).
SUBSETS = {
    "19": tuple(range(19)),
    "16": (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
    "13": (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
}
# Pixels per step of the CPU loops: at torch's intra-op grain size (32768) each op stays on one thread
# (no OpenMP hand-off, which stalls badly when cores are shared) and the working set stays in cache.
# On a GPU a batch is one step.
CHUNK = 1 << 15


def _all_reduce_sum(tensor):
    """Sum of `tensor` over all processes when torch.distributed is initialised (NCCL: via the GPU)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    reduced = tensor
    if torch.distributed.get_backend() == "nccl" and tensor.device.type != "cuda":
        reduced = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    torch.distributed.all_reduce(reduced)
    return reduced.to(tensor.device)


class ConfusionMatrix:
    """One (C, C) matrix over a whole dataset: rows = ground truth, columns = prediction.

    Cityscapes convention (cityscapesScripts): IoU_c = TP / (TP + FP + FN) from the dataset-wide
    matrix; a class absent from both the ground truth and the prediction has IoU NaN and is left
    out of the mean (a class predicted but absent from the ground truth has IoU 0).
    Labels are trainIds in [0, C); `ignore_index` pixels of the target are skipped. Any other
    target value raises (e.g. label ids passed where trainIds are expected), as does a prediction
    outside [0, C). Fast path: uint8 maps (int64 maps are converted once after the range check).
    """

    def __init__(self, num_classes, ignore_index=255):
        if not (0 < num_classes <= 255 and num_classes <= ignore_index <= 255):
            raise ValueError(f"need 0 < num_classes <= ignore_index <= 255, got {num_classes}, {ignore_index}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred, target):
        """Add a batch: `pred`, `target` integer label maps (tensors or arrays) of the same shape, any size."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        C = self.num_classes
        pred, target = pred.detach().reshape(-1), target.detach().reshape(-1)
        if pred.numel() == 0:
            return
        if pred.dtype.is_floating_point or target.dtype.is_floating_point:
            raise TypeError("pred and target must be integer label maps (take logits.argmax(1) first)")
        for name, x in (("pred", pred), ("target", target)):
            if x.dtype != torch.uint8 and (int(x.min()) < 0 or int(x.max()) > 255):
                raise ValueError(f"{name} values must be trainIds in [0, {C}) (target: or {self.ignore_index}), "
                                 f"got [{int(x.min())}, {int(x.max())}]")
        pred, target = pred.to(torch.uint8), target.to(torch.uint8)  # no-ops on the uint8 fast path
        # Per chunk, index = target * (C + 1) + min(pred, C) in a 16-bit type, counted by bincount: rows
        # are the 256 target values (ignore and stray values land in rows >= C), column C collects
        # predictions >= C. So the full map is neither masked nor range-checked (both cost passes).
        K = C + 1
        dtype = torch.int16 if 256 * K < 2 ** 15 else torch.int32
        counts = torch.zeros(256 * K, dtype=torch.int64, device=pred.device)
        step = CHUNK if pred.device.type == "cpu" else len(pred)
        for t, p in zip(target.split(step), pred.split(step)):
            counts += torch.bincount(torch.add(p.clamp(max=C), t.to(dtype), alpha=K), minlength=256 * K)
        rows = counts.view(256, K)  # (target value, prediction)
        stray = rows[C:].sum(1)
        stray[self.ignore_index - C] = 0
        if stray.any():
            bad = (stray.nonzero()[:, 0] + C).tolist()
            raise ValueError(f"target contains values {bad[:10]} that are neither trainIds in [0, {C}) nor "
                             f"ignore_index {self.ignore_index} (label ids instead of trainIds?)")
        if rows[:C, C].any():
            raise ValueError(f"predictions must lie in [0, {C}): {rows[:C, C].sum().item()} labelled pixels have "
                             f"a prediction >= {C}")
        self.mat = self.mat.to(pred.device)
        self.mat += rows[:C, :C]

    def all_reduce(self):
        """Sum the matrices of all processes (torch.distributed when initialised; a no-op otherwise)."""
        self.mat = _all_reduce_sum(self.mat)
        return self

    def iou(self):
        """Per-class IoU, float64 (C,), NaN for classes absent from both ground truth and prediction."""
        mat = self.mat.double().cpu()
        tp = mat.diag()
        return tp / (mat.sum(0) + mat.sum(1) - tp)  # ASH Tables 1-3: TP / (TP + FP + FN); 0/0 = NaN

    def miou(self, subset=None):
        """Mean IoU over the classes present: all classes, a key of SUBSETS ("19", "16", "13"), or a list."""
        iou = self.iou()
        if subset is not None:
            if isinstance(subset, str):
                if self.num_classes != 19:
                    raise ValueError(f"subset {subset!r} is defined on the 19 Cityscapes trainIds, "
                                     f"this matrix has {self.num_classes} classes")
                subset = SUBSETS[subset]
            iou = iou[list(subset)]
        return torch.nanmean(iou).item()  # mIoU / mIoU16 / mIoU13 of ASH Tables 1-3, Robusta Table A5

    def pixel_accuracy(self):
        """Correct pixels / labelled pixels."""
        return (self.mat.diag().sum() / self.mat.sum()).item()

    def table(self, class_names=None):
        """Per-class IoU (%) table with mIoU (and the 16/13-class means for 19 classes) and pixel accuracy."""
        if class_names is None:
            import data
            class_names = data.CLASS_NAMES if self.num_classes == 19 else [str(c) for c in range(self.num_classes)]
        width = max(12, max(len(n) for n in class_names) + 2)
        lines = [f"{'class':<{width}}{'IoU':>8}"]
        for name, value in zip(class_names, self.iou().tolist()):
            lines.append(f"{name:<{width}}{100 * value:>8.2f}")
        lines.append("-" * (width + 8))
        subsets = SUBSETS if self.num_classes == 19 else {str(self.num_classes): None}
        for key, subset in subsets.items():
            lines.append(f"{f'mIoU ({key})':<{width}}{100 * self.miou(subset):>8.2f}")
        lines.append(f"{'pixel acc.':<{width}}{100 * self.pixel_accuracy():>8.2f}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 2. OOD detection: anomaly scores, AUROC, AUPR, FPR at 95% TPR (pixel-pooled, OOD = positive)
# ---------------------------------------------------------------------------------------------

def anomaly_scores(logits, kind="msp"):
    """(N, C, H, W) logits -> (N, H, W) float32 scores, higher = more anomalous.

    msp: 1 - max softmax probability (computed as -expm1(max log-softmax): precise near 0);
    entropy: softmax entropy in nats; maxlogit: -max logit.
    """
    logits = logits.float()
    if kind == "msp":  # Hendrycks & Gimpel's baseline, as in Robusta C.1.2
        return -torch.expm1(logits.log_softmax(1).amax(1))
    if kind == "entropy":
        logp = logits.log_softmax(1)
        return -(logp.exp() * logp).sum(1)
    if kind == "maxlogit":
        return -logits.amax(1)
    raise ValueError(f"unknown anomaly score {kind!r}; choose msp, entropy or maxlogit")


def _labelled(scores, is_ood, valid):
    """Flatten; keep pixels with is_ood in {0, 1} (others, e.g. 255 = void, are ignored) and valid."""
    scores, is_ood = torch.as_tensor(scores), torch.as_tensor(is_ood)
    if scores.shape != is_ood.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and is_ood {tuple(is_ood.shape)} differ in shape")
    scores, is_ood = scores.detach().reshape(-1), is_ood.detach().reshape(-1)
    keep = (is_ood == 0) | (is_ood == 1)
    if valid is not None:
        keep &= valid.reshape(-1).bool()
    if not keep.all():
        scores, is_ood = scores[keep], is_ood[keep]
    if torch.isnan(scores).any():
        raise ValueError("anomaly scores contain NaN")
    return scores, is_ood.bool()


def _exact_counts(scores, is_ood, valid=None):
    """(positives, negatives) per distinct score, ascending: exact, ties grouped."""
    scores, is_ood = _labelled(scores, is_ood, valid)
    values, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    return (torch.bincount(inverse[is_ood], minlength=len(values)),
            torch.bincount(inverse[~is_ood], minlength=len(values)))


def _ood_metrics(pos, neg, tpr=0.95):
    """(AUROC, AP, FPR at `tpr`) from counts per score bin in ascending score order.

    Thresholds t run over the bins from the highest score down; OOD is predicted when score >= t.
    """
    seen = (pos + neg) > 0  # drop empty bins first: a histogram has millions, mostly empty
    pos, neg = pos[seen].flip(0).double().cpu(), neg[seen].flip(0).double().cpu()  # descending scores
    tp, fp = pos.cumsum(0), neg.cumsum(0)
    P, N = tp[-1].item() if tp.numel() else 0.0, fp[-1].item() if fp.numel() else 0.0
    if P == 0 or N == 0:
        raise ValueError(f"OOD metrics need both OOD and in-distribution pixels, got {P:.0f} and {N:.0f}")
    # AUROC = Mann-Whitney U / (P N): a (pos, neg) pair counts 1 if pos scores higher, 1/2 if tied.
    auroc = (neg * (tp - pos + pos / 2)).sum().item() / (P * N)  # Robusta C.1.2 AUROC
    # AP = sum_k (R_k - R_{k-1}) P_k, the step sum of scikit-learn's average_precision_score.
    hit = pos > 0
    ap = (pos[hit] / P * tp[hit] / (tp[hit] + fp[hit])).sum().item()  # Robusta C.1.2 AUPR
    # FPR at the first (highest) threshold whose TPR reaches `tpr`.
    k = torch.searchsorted(tp / P, torch.tensor([tpr], dtype=torch.float64)).item()
    fpr = fp[min(k, len(fp) - 1)].item() / N
    return auroc, ap, fpr


def auroc(scores, is_ood, valid=None):
    """Area under the ROC curve, exact with ties (Mann-Whitney; equals scikit-learn's roc_auc_score).

    `scores` any shape (higher = more anomalous), `is_ood` same shape: 1 = OOD (positive),
    0 = in-distribution, anything else (255 = void) ignored. Sorts all pixels: for a whole
    validation set use the streaming `OODMeter`.
    """
    return _ood_metrics(*_exact_counts(scores, is_ood, valid))[0]


def aupr(scores, is_ood, valid=None):
    """Average precision with OOD as positive: the step sum sum_k (R_k - R_{k-1}) P_k over distinct
    thresholds (scikit-learn's average_precision_score), exact with ties."""
    return _ood_metrics(*_exact_counts(scores, is_ood, valid))[1]


def fpr_at_tpr(scores, is_ood, tpr=0.95, valid=None):
    """False-positive rate at the first threshold (from the top) whose TPR reaches `tpr`, exact with ties."""
    return _ood_metrics(*_exact_counts(scores, is_ood, valid), tpr=tpr)[2]


class OODMeter:
    """Streaming AUROC / AUPR / FPR95 over a whole validation set in fixed memory.

    Method (our choice): a fixed-bin histogram of in-distribution / OOD / ignored counts over the
    float32 bit pattern of the score. The bit pattern is mapped to an order-preserving integer key
    and its low `23 - mantissa_bits` bits are dropped, so a bin holds exactly the floats that share
    sign, exponent and the top `mantissa_bits` mantissa bits (relative bin width 2^-mantissa_bits,
    2.4e-4 for the default 12; no score range needs to be known). Exactness: the metrics are
    computed exactly (ties counted as ties, up to float64 rounding of the sums) for the scores
    truncated to `mantissa_bits` mantissa bits, hence identical to `auroc`/`aupr`/`fpr_at_tpr`
    whenever every score is representable with that many bits (e.g. any float16/bfloat16 score
    for mantissa_bits >= 10, or multiples of 2^-k); otherwise scores closer than one bin count as
    tied. Memory: 3 x 2^(9 + mantissa_bits) int64 counters (48 MB for 12) plus one chunk of pixels
    (CHUNK on the CPU, the batch on a GPU), whatever the number of pixels.
    """

    def __init__(self, mantissa_bits=12):
        if not 0 <= mantissa_bits <= 16:
            raise ValueError("mantissa_bits must be in [0, 16] (memory grows as 3 * 2^(12 + mantissa_bits) bytes)")
        self.shift = 23 - mantissa_bits
        self.num_bins = 1 << (32 - self.shift)
        self.counts = torch.zeros(self.num_bins * 3, dtype=torch.int64)  # (bin, 0 ID / 1 OOD / 2 ignored)

    def update(self, scores, is_ood, valid=None):
        """Add a batch: scores (any shape, float), is_ood (same shape; 1 OOD, 0 ID, else ignored)."""
        scores, is_ood = torch.as_tensor(scores), torch.as_tensor(is_ood)
        if scores.shape != is_ood.shape:
            raise ValueError(f"scores {tuple(scores.shape)} and is_ood {tuple(is_ood.shape)} differ in shape")
        scores, is_ood = scores.detach().reshape(-1), is_ood.detach().reshape(-1)
        valid = None if valid is None else valid.detach().reshape(-1)
        self.counts = self.counts.to(scores.device)
        step = CHUNK if scores.device.type == "cpu" else max(len(scores), 1)
        ones = torch.ones(1, dtype=torch.int64, device=scores.device).expand(step)
        for start in range(0, len(scores), step):
            s = scores[start:start + step].float() + 0.0  # + 0.0 folds -0.0 into +0.0
            if torch.isnan(s).any():
                raise ValueError("anomaly scores contain NaN")
            y = is_ood[start:start + step]
            y = y.clamp(max=2) if y.dtype == torch.uint8 else torch.where((y == 0) | (y == 1), y, 2)
            if valid is not None:
                y = torch.where(valid[start:start + step].bool(), y, 2)
            bits = s.view(torch.int32)
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 order == float order
            idx = ((key >> self.shift) + (self.num_bins >> 1)) * 3 + y  # int32
            self.counts.index_add_(0, idx, ones[:len(idx)])  # no per-chunk histogram to zero and add

    def all_reduce(self):
        """Sum the histograms of all processes (torch.distributed when initialised; a no-op otherwise)."""
        self.counts = _all_reduce_sum(self.counts)
        return self

    def compute(self):
        """-> {"auroc", "aupr", "fpr95"} of all pixels seen so far."""
        counts = self.counts.view(self.num_bins, 3)
        return dict(zip(("auroc", "aupr", "fpr95"), _ood_metrics(counts[:, 1], counts[:, 0], tpr=0.95)))


# ---------------------------------------------------------------------------------------------
# 3. FID: pytorch-fid's Inception network and the Frechet distance
# ---------------------------------------------------------------------------------------------

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")


class FIDInceptionA(InceptionA):
    """InceptionA with TensorFlow's average pooling: padded zeros are not counted in the mean."""

    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(InceptionC):
    """InceptionC with TensorFlow's average pooling (count_include_pad=False)."""

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], 1)


class FIDInceptionE_1(InceptionE):
    """First InceptionE (Mixed_7b) with TensorFlow's average pooling (count_include_pad=False)."""

    def pool(self, x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        branch_pool = self.branch_pool(self.pool(x))
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionE_2(FIDInceptionE_1):
    """Second InceptionE (Mixed_7c): the TensorFlow FID graph max-pools in its pooling branch."""

    def pool(self, x):
        return F.max_pool2d(x, 3, stride=1, padding=1)


class FIDInception(nn.Module):
    """The Inception-v3 of TensorFlow's FID (pytorch-fid's port) -> 2048-d pool features.

    Attribute names and shapes are those of torchvision's
    `inception_v3(aux_logits=False, num_classes=1008)`, so the published
    `pt_inception-2015-12-05-6726825d.pth` loads with strict=True (`fc` is kept only for that).
    Input: images (N, 3, H, W) in [0, 1]; resized bilinearly to 299 x 299 (align_corners=False)
    and scaled to [-1, 1], as pytorch-fid does (`resize_input=False` skips the resize, as there).
    """

    def __init__(self, resize_input=True):
        super().__init__()
        self.resize_input = resize_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1008)  # logits of the 2015 graph; unused by FID

    def preprocess(self, x):
        if self.resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1  # [0, 1] -> [-1, 1]

    def forward(self, x):
        x = self.preprocess(x)
        for layer in list(self.children())[:-1]:  # Conv2d_1a_3x3 ... Mixed_7c, avgpool (not fc)
            x = layer(x)
        return x.flatten(1)  # (N, 2048)


def load_fid_inception(weights, device="cpu"):
    """FIDInception with the published weights from a local path (no downloads)."""
    if weights is None:
        raise data.BadInput(f"FID needs the Inception weights {FID_WEIGHTS}: download it from the pytorch-fid "
                            f"GitHub releases ({FID_WEIGHTS_URL}) and pass its path (--weights PATH)")
    if not Path(weights).is_file():
        raise data.MissingFile(f"FID Inception weights not found at {weights}; expected {FID_WEIGHTS}, "
                               f"published at {FID_WEIGHTS_URL}")
    model = FIDInception()
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as e:  # truncated download, wrong file type, another network's checkpoint, ...
        raise data.BadInput(f"cannot read the FID Inception weights {weights} (expected {FID_WEIGHTS}): "
                            f"{' '.join(str(e).split())[:300]}") from e
    return model.eval().requires_grad_(False).to(device)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _images(source):
    """Yield (3, H, W) float images in [0, 1] from a tensor (N, 3, H, W), a folder (recursive,
    sorted), or an iterable of tensors / batches / dicts with an "image" key (a Dataset, a DataLoader)."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise data.MissingFile(f"image folder not found: {folder}")
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise data.BadInput(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
        yield from (data.read_image(p) for p in paths)
        return
    for item in source:
        item = item["image"] if isinstance(item, dict) else item
        yield from (item if item.dim() == 4 else item[None])


def _image_batches(source, batch_size):
    """Batches (B, 3, H, W) of consecutive images of equal size from `_images(source)`, checked to be in [0, 1]."""
    batch = []
    for image in _images(source):
        if not image.is_floating_point() or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected float RGB images (3, H, W), got {image.dtype} {tuple(image.shape)}")
        if image.min() < -1e-3 or image.max() > 1 + 1e-3:  # tolerance for resampling round-off
            raise ValueError(f"images must be in [0, 1], got [{image.min().item():.3g}, {image.max().item():.3g}] "
                             "(tanh outputs: x * 0.5 + 0.5)")
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield torch.stack(batch)


@torch.no_grad()
def inception_statistics(source, model, batch_size=50, device="cpu"):
    """Mean (2048,) and unbiased covariance (2048, 2048) of the pool features, float64, streamed.

    `source`: a tensor, folder, iterable (see `_images`) or an .npz file with `mu` and `sigma`
    (pytorch-fid's precomputed statistics). Batches are merged with Chan et al.'s pairwise update.
    """
    if isinstance(source, (str, Path)) and str(source).endswith(".npz"):
        if not Path(source).is_file():
            raise data.MissingFile(f"FID statistics not found: {source}")
        stats = np.load(source)
        if not {"mu", "sigma"} <= set(stats.files):
            raise data.BadInput(f"{source}: FID statistics need arrays 'mu' and 'sigma', found {stats.files}")
        return torch.from_numpy(stats["mu"]).double(), torch.from_numpy(stats["sigma"]).double()
    n, mean, scatter = 0, None, None
    for batch in _image_batches(source, batch_size):
        feats = model(batch.to(device)).double().cpu()  # (B, 2048)
        b, bmean = len(feats), feats.mean(0)
        centred = feats - bmean
        if mean is None:
            n, mean, scatter = b, bmean, centred.T @ centred
            continue
        delta = bmean - mean
        scatter += centred.T @ centred + torch.outer(delta, delta) * (n * b / (n + b))
        mean += delta * (b / (n + b))
        n += b
    if n < 2:
        raise data.BadInput(f"FID statistics need at least 2 images, got {n}")
    if n < 2048:
        warnings.warn(f"{n} images < 2048 feature dimensions: the covariance is singular and FID biased")
    return mean, scatter / (n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=0.0):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64:
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((s1 s2)^(1/2)) = sum of the square roots of the eigenvalues of s1 s2, which equal those of the
    symmetric PSD matrix R^T s2 R for any factor s1 = R R^T (Cholesky; eigendecomposition when s1 is
    singular). One Cholesky, two matmuls and one `eigvalsh` (timings at 2048-d: README > Performance;
    scipy's `sqrtm` takes ~17 s there); eigenvalues within round-off of 0 count as 0. This route is exact
    for singular (PSD) covariances too; pytorch-fid instead retries with `eps * I` added to both
    covariances (eps = 1e-6) when scipy's sqrtm fails on them. `eps` adds that offset here (default none).
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(v).double().cpu() for v in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
                         f"sigma {tuple(s1.shape)}, {tuple(s2.shape)}")
    if eps:
        offset = eps * torch.eye(len(s1), dtype=torch.float64)
        s1, s2 = s1 + offset, s2 + offset
    root, info = torch.linalg.cholesky_ex(s1)
    if info != 0:  # singular or numerically indefinite: s1 = V diag(w) V^T, R = V diag(sqrt(w))
        w, V = torch.linalg.eigh(s1)
        if w[0] < -1e-6 * w[-1].abs():
            raise ValueError(f"sigma1 is not positive semi-definite (eigenvalue {w[0].item():.3g})")
        root = V * w.clamp(min=0).sqrt()
    ev = torch.linalg.eigvalsh(root.T @ s2 @ root)
    if ev[0] < -1e-6 * ev[-1].abs():
        raise ValueError(f"sigma2 is not positive semi-definite (eigenvalue {ev[0].item():.3g} of R^T s2 R)")
    # eigenvalues below round-off (numpy's matrix_rank tolerance) are zeros of a singular product:
    # their square roots (~1e-8 each) would otherwise add up over thousands of dimensions
    tol = len(ev) * torch.finfo(torch.float64).eps * ev[-1]
    tr_covmean = torch.where(ev > tol, ev, 0).sqrt().sum()
    diff = mu1 - mu2
    return (diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean).item()  # FID, Robusta C.1.2 / Table A5


def fid(real, fake, weights=None, batch_size=50, device=None):
    """FID between two image sets (tensors in [0, 1], folders, iterables, or .npz statistics)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for source in (real, fake):  # before the model loads: a missing folder is found at once
        if isinstance(source, (str, Path)) and not Path(source).exists():
            raise data.MissingFile(f"FID: image folder or statistics not found: {source}")
    model = load_fid_inception(weights, device)
    return frechet_distance(*inception_statistics(real, model, batch_size, device),
                            *inception_statistics(fake, model, batch_size, device))


# ---------------------------------------------------------------------------------------------
# 4. Spectral distance (Robusta Appendix E.1.3, Figure A3)
# ---------------------------------------------------------------------------------------------

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


def log_spectrum(images):
    """(N, 3, H, W) in [0, 1] -> (N, H, W) float64 log(1 + |FFT|) of the grayscale image, centred (fftshift)."""
    gray = torch.einsum("nchw,c->nhw", images.double(), torch.tensor(LUMA, dtype=torch.float64, device=images.device))
    return torch.log1p(torch.fft.fftshift(torch.fft.fft2(gray), dim=(-2, -1)).abs())


def high_pass_mask(height, width, filter_rate):
    """Boolean (H, W) mask of the centred spectrum kept by the high-pass filter of Figure A3.

    Our choice (the paper gives no radii): radial frequency r = sqrt(fx^2 + fy^2) in cycles/pixel
    (Nyquist 0.5); filter_rate 0 keeps everything, 1 keeps r > 1/8 (low cutoff), 2 keeps r > 1/4
    (high cutoff), i.e. cutoff = filter_rate / 8 cycles/pixel. The DC term (mean brightness) is
    dropped from filter_rate 1 on.
    """
    if filter_rate not in (0, 1, 2):
        raise ValueError(f"filter_rate must be 0, 1 or 2, got {filter_rate}")
    fy = torch.fft.fftshift(torch.fft.fftfreq(height, dtype=torch.float64))
    fx = torch.fft.fftshift(torch.fft.fftfreq(width, dtype=torch.float64))
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return radius > filter_rate / 8 if filter_rate else torch.ones(height, width, dtype=torch.bool)


def _mean_log_spectrum(source, batch_size):
    """Mean of `log_spectrum` over an image set: float64 (H, W)."""
    total, count = 0.0, 0
    for x in _image_batches(source, batch_size):
        if count and x.shape[-2:] != total.shape:
            raise data.BadInput(f"spectral_distance needs images of one size, got {tuple(x.shape[-2:])} "
                                f"after {tuple(total.shape)}")
        total, count = total + log_spectrum(x).sum(0), count + len(x)
    if not count:
        raise data.BadInput("spectral_distance got an empty image set")
    return total / count


@torch.no_grad()
def spectral_distance(a, b, filter_rate=0, paired=False, batch_size=16):
    """Distance between the log-magnitude FFT spectra of two image sets (Robusta E.1.3, Figure A3).

    Spectrum: log(1 + |FFT|) of the grayscale (BT.601) image, fftshift-ed, float64 (our choice:
    one spectrum per image rather than per channel). Distance: mean absolute difference over the
    frequencies kept by `high_pass_mask(filter_rate)` (our choice). paired=False (default): between
    the mean spectra of the two sets; paired=True: the mean over image pairs (a[i], b[i]) of their
    distance (the per-image reading of E.1.3: a generated image against the real image of the same
    label map). `a`, `b`: tensors (N, 3, H, W) in [0, 1], folders or iterables (see `_images`).
    """
    if not paired:
        sa, sb = _mean_log_spectrum(a, batch_size), _mean_log_spectrum(b, batch_size)
        if sa.shape != sb.shape:
            raise data.BadInput(f"spectral_distance: image sizes differ: {tuple(sa.shape)} and {tuple(sb.shape)}")
        return (sa - sb).abs()[high_pass_mask(*sa.shape, filter_rate).to(sa.device)].mean().item()  # Figure A3
    total, count = 0.0, 0
    for x, y in itertools.zip_longest(_image_batches(a, batch_size), _image_batches(b, batch_size)):
        if x is None or y is None or x.shape != y.shape:
            raise data.BadInput("spectral_distance: paired=True needs two sets of equal length whose i-th images "
                                "have the same size")
        mask = high_pass_mask(*x.shape[-2:], filter_rate).to(x.device)
        total += (log_spectrum(x) - log_spectrum(y)).abs()[:, mask].mean(1).sum().item()  # Figure A3, per pair
        count += len(x)
    return total / count


# ---------------------------------------------------------------------------------------------
# 5. Model cost (Robusta Table A11): parameters, multiply-adds, peak memory
# ---------------------------------------------------------------------------------------------

def count_parameters(model, trainable_only=False):
    """Number of parameters (shared tensors counted once): Table A11's Params column."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
    # (B, H, L, E) x (B, H, S, E) -> scores, then (B, H, L, S) x (B, H, S, Ev): 2 flops per MAC
    return 2 * math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


def _norm_flops(x, weight=None, *args, out_shape=None, **kwargs):
    # normalisation (x - mean) * rstd: 1 MAC per element; affine * gamma + beta: 1 more (ptflops' convention)
    return 2 * math.prod(x) * (2 if weight is not None else 1)


def _layer_norm_flops(x, normalized_shape, weight=None, *args, out_shape=None, **kwargs):
    return _norm_flops(x, weight)


_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
                torch.ops.aten.native_layer_norm: _layer_norm_flops}
for _op in ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
            "cudnn_batch_norm", "miopen_batch_norm", "native_group_norm"):
    _EXTRA_FLOPS[getattr(torch.ops.aten, _op)] = _norm_flops


@torch.no_grad()
def count_macs(model, *inputs, convention="aten", **kwargs):
    """Multiply-adds of one forward pass `model(*inputs, **kwargs)` under one of two conventions.

    convention "aten" (ours, the default): counted on the aten ops executed (torch.utils.flop_counter,
    MACs = FLOPs / 2): every convolution (transposed, grouped, dilated: Cout * Cin/groups * k_h * k_w
    per output position; transposed: per input position), every matmul (nn.Linear, torch.matmul/
    einsum/bmm, attention scores and values, also F.scaled_dot_product_attention incl. its CPU
    kernel), and normalisation layers (Batch/Instance/Layer/GroupNorm: 1 MAC per element, 2 with an
    affine, as ptflops counts them). Not counted: biases, activations, pooling, interpolation,
    softmax, elementwise arithmetic (e.g. SPADE's x * (1 + gamma) + beta). nn.MultiheadAttention's
    fused fast path is switched off while counting so that its matmuls are seen.

    convention "torchinfo": torchinfo's estimate, which Robusta's Table A11 used. Per call of every
    leaf module that holds parameters: a module whose class name contains "Conv" (transposed too)
    counts its parameters (weight and bias) x batch x output positions (H_out * W_out); any other
    (Linear, norms, PReLU) its parameters x batch (a Linear on (B, L, C) tokens counts B, not B * L).
    Functional ops (matmuls of attention, F.conv2d) and parameter-free modules count 0.
    """
    if convention == "torchinfo":
        total = 0

        def hook(module, args, output):
            nonlocal total
            params = sum(p.numel() for p in module.parameters(recurse=False))
            if params == 0 or next(module.children(), None) is not None:
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            positions = math.prod(out.shape[2:]) if "Conv" in type(module).__name__ else 1
            total += params * out.shape[0] * positions

        handle = nn.modules.module.register_module_forward_hook(hook)
        try:
            model(*inputs, **kwargs)
        finally:
            handle.remove()
        return total
    if convention != "aten":
        raise data.BadInput(f"count_macs: convention must be 'aten' or 'torchinfo', got {convention!r}")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
        with counter:
            model(*inputs, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() // 2  # Table A11: Mult-Adds


def _proc_status_bytes(field):
    """A field of /proc/self/status in bytes (Linux)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024


def peak_memory(fn, device="cpu"):
    """Peak memory (bytes) that `fn()` (e.g. a forward + backward) adds on `device`.

    CUDA (Table A11's VRAM column, less what is allocated before fn, e.g. the weights):
    torch.cuda.max_memory_allocated() during fn minus torch.cuda.memory_allocated() before it.
    CPU (Linux): the process's peak resident set (VmHWM, reset before fn by writing 5 to
    /proc/self/clear_refs) minus the resident set before fn, after glibc's malloc_trim has handed
    freed heap pages back. It counts every page the process touches meanwhile (also other
    threads, first-use library allocations) and misses pages still cached by an allocator.
    Elsewhere it falls back to the growth of getrusage's ru_maxrss, which is monotonic over the
    process life and so reads 0 when the process peaked higher earlier.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: return freed heap pages, so reusing them shows
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    except OSError:
        import resource  # Unix only
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    before = _proc_status_bytes("VmRSS")
    fn()
    return max(_proc_status_bytes("VmHWM") - before, 0)


# ---------------------------------------------------------------------------------------------
# 6. Command line
# ---------------------------------------------------------------------------------------------

LABEL_SUFFIX = re.compile(r"(_leftImg8bit|_gtFine_labelIds|_gtFine_labelTrainIds|_gtFine_trainIds|_pred)?\.png$")


def _label_files(folder, suffix=None):
    """{stem: path} of the label PNGs under `folder` (recursive), Cityscapes suffixes stripped from the
    stem; only the files ending in `suffix` when the folder has any (gtFine also holds _color PNGs)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise data.MissingFile(f"label folder not found: {folder}")
    files = sorted(folder.rglob("*.png"))
    if suffix and any(p.name.endswith(suffix) for p in files):
        files = [p for p in files if p.name.endswith(suffix)]
    return {LABEL_SUFFIX.sub("", p.name): p for p in files}


def evaluate_folders(pred_dir, gt_dir, pred_kind="trainId", gt_kind="id"):
    """ConfusionMatrix of prediction PNGs against Cityscapes ground-truth PNGs, matched by file stem.

    pred_kind / gt_kind: "trainId" (values 0..18, 255 ignored; GT files *_gtFine_labelTrainIds.png)
    or "id" (Cityscapes label ids mapped with data.ID_TO_TRAINID; GT files *_gtFine_labelIds.png,
    the format cityscapesScripts evaluates).
    """
    preds = _label_files(pred_dir)
    gts = _label_files(gt_dir, "_gtFine_labelIds.png" if gt_kind == "id" else "_gtFine_labelTrainIds.png")
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise data.MissingFile(f"{len(missing)} ground-truth maps have no prediction in {pred_dir}, "
                               f"e.g. {gts[missing[0]].name} (expected a file named {missing[0]}*.png)")
    cm = ConfusionMatrix(data.NUM_CLASSES, data.IGNORE_INDEX)
    for stem, gt_path in gts.items():
        pred, gt = data.read_label(preds[stem]), data.read_label(gt_path)
        pred, gt = (data.ID_TO_TRAINID[x] if kind == "id" else x for x, kind in ((pred, pred_kind), (gt, gt_kind)))
        if pred.shape != gt.shape:
            raise data.BadInput(f"{preds[stem]} is {tuple(pred.shape)} but {gt_path} is {tuple(gt.shape)}")
        try:
            cm.update(pred, gt)
        except ValueError as e:  # values that are not trainIds (e.g. --pred-kind / --gt-kind not what the files hold)
            raise data.BadInput(f"{preds[stem]} vs {gt_path}: {e}") from e
    return cm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fid", help="FID between two image folders (or .npz statistics)")
    p.add_argument("--real", required=True, help="folder of real images (searched recursively) or .npz stats")
    p.add_argument("--fake", required=True, help="folder of generated images or .npz stats")
    p.add_argument("--weights", default=None, help=f"path to {FID_WEIGHTS} ({FID_WEIGHTS_URL})")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception forward (pytorch-fid: 50)")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p = sub.add_parser("miou", help="per-class IoU / mIoU of prediction PNGs against ground truth")
    p.add_argument("--pred", required=True, help="folder of prediction PNGs named <stem>*.png")
    p.add_argument("--gt", required=True, help="ground-truth folder, e.g. cityscapes/gtFine/val")
    p.add_argument("--dataset", default="cityscapes", choices=["cityscapes"], help="label set (19 trainIds)")
    p.add_argument("--pred-kind", default="trainId", choices=["trainId", "id"], help="values of the prediction PNGs")
    p.add_argument("--gt-kind", default="id", choices=["trainId", "id"], help="values of the GT PNGs (_labelIds: id)")
    p = sub.add_parser("spectral", help="spectral distance at filter rates 0, 1, 2 (Robusta Figure A3)")
    p.add_argument("--real", required=True, help="folder of real images")
    p.add_argument("--fake", required=True, help="folder of generated images (same size)")
    p.add_argument("--paired", action="store_true", help="mean per-image distance over sorted pairs")
    args = parser.parse_args(argv)

    if args.command == "fid":
        if args.batch_size < 1:
            raise data.BadInput(f"--batch-size must be at least 1, got {args.batch_size}")
        try:
            device = torch.device(args.device) if args.device else None
        except RuntimeError as e:
            raise data.BadInput(f"--device {args.device!r}: {e}") from e
        if device is not None and device.type == "cuda" and not torch.cuda.is_available():
            raise data.BadInput(f"--device {args.device}: CUDA is not available on this machine")
        value = fid(args.real, args.fake, weights=args.weights, batch_size=args.batch_size, device=args.device)
        print(f"| real | fake | FID |\n| --- | --- | ---: |\n| {args.real} | {args.fake} | {value:.3f} |")
    elif args.command == "miou":
        print(evaluate_folders(args.pred, args.gt, args.pred_kind, args.gt_kind).table())
    else:
        print("| filter_rate | spectral distance |\n| ---: | ---: |")
        for rate in (0, 1, 2):
            print(f"| {rate} | {spectral_distance(args.real, args.fake, rate, paired=args.paired):.4f} |")


if __name__ == "__main__":
    data.cli(main)
