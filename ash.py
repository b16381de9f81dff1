"""Adversarial Semantic Hallucination (ASH) for domain generalized semantic segmentation.

Tjio, Liu, Zhou, Goh: "Adversarial Semantic Hallucination for Domain Generalized Semantic
Segmentation" (papers/ash.md). A segmenter G is trained on labelled source images (GTA5 or
SYNTHIA) and on the same images re-styled with paintings through AdaIN (Huang & Belongie); the
style statistics are perturbed by an orthogonal noise and by a small network, the ASH module, that
reads G's own (label-smoothed) prediction and is trained *against* G: it makes the stylized images
hard, G and a discriminator D on G's softmax make the segmentation style-invariant. No target image
is seen in training. Contents, in reading order:

1. AdaIN (Sec. 3.2, Eq. 1): `calc_mean_std`, `adain`, `vgg_normalised` (the 53-layer normalised
   VGG19 of pytorch-AdaIN; the encoder is its layers 0..30, up to relu4_1), `decoder` (its mirror),
   `Stylizer` (frozen encoder + decoder), `load_stylizer`.
2. Orthogonal noise (Eq. 3, Algorithm 1 line 4): `orthogonal_noise` and the three readings of `--noise`
   (`mix_channels`, `elementwise_noise`, `whitened_noise`, chosen by `perturb_style`; `DEFAULT_NOISE`).
3. The ASH module (Eq. 2-3): `label_smoothing`, `ASHModule`; Eq. 4 in `Stylizer.stylize`.
4. The discriminator of AdaptSegNet/CLAN: `FCDiscriminator`; losses `adversarial_loss` (Eq. 5),
   `content_loss`, `style_loss` (Eq. 7-9), `ash_loss` (Eq. 6).
5. AdaIN decoder training for users without `decoder.pth` (`python ash.py train-decoder`):
   `decoder_losses`, `train_decoder`.
6. Algorithm 1: `Algorithm1` (one object with G, ASH, D and their optimizers; `.step()` is lines
   2-12; G's BatchNorm as CLAN: `freeze_bn_affine`, `running_stats_kept` for line 9), `PRESETS`
   (`--preset paper|authors-code`), `train` (the CLI: data, run helpers, checkpoints, index.html),
   every ablation of Tables 1-3, 5, 6 behind one switch.
7. Evaluation as Tables 1-3 (`evaluate` at the label's resolution, `evaluate_tables`: per-class IoU
   over 19 classes, mIoU 19/16/13) and the ToyCity demo (`demo`) and the seeded experiment of
   Tables 1/5 (`experiment`, also over the readings of the noise).

Run:
    python ash.py                        # demo on ToyCity: AdaIN decoder, source-only and ASH, mIoU
    python ash.py demo --iters 800 --size 64 128   # the demo with other lengths / sizes (see --help)
    python ash.py experiment [--quick]   # Tables 1/5 on ToyCity: 4 modes x 3 seeds, mean +- std
    python ash.py experiment --modes stylize+noise ash --noises rotation elementwise whitened  # Table 5 rows 3-4
    python ash.py train-decoder --content DIR --styles DIR [--vgg vgg_normalised.pth]
    python ash.py --source gta5 --source-root GTA5 --target cityscapes --target-root CITYSCAPES \
        --styles PAINTER_BY_NUMBERS --vgg vgg_normalised.pth --decoder decoder.pth \
        --pretrained DeepLab_resnet_pretrained_init-f81d91e8.pth
    python ash.py ... --mode stylize+noise / --no-ls1 / --delta 0 / --uniform-semantics ...  # ablations
    python ash.py ... --preset authors-code [--lambda-adv 0.01]   # the authors' code's weights (Table 4 sweep)
    torchrun --nproc_per_node 4 ash.py ...                    # DistributedDataParallel, same code

Pretrained weights (never downloaded): `vgg_normalised.pth` and `decoder.pth` are published with
pytorch-AdaIN (github.com/naoto0804/pytorch-AdaIN, "Download models"); G's initialisation, as for the
paper's and CLAN's numbers, is AdaptSegNet's MS-COCO-pretrained DeepLab-v2
`DeepLab_resnet_pretrained_init-f81d91e8.pth` (github.com/wasidennis/AdaptSegNet) with
`--backbone-style caffe`; torchvision's ImageNet `resnet101-63fe2227.pth` (download.pytorch.org/models/)
with `--backbone-style torchvision`.
"""
import argparse
import inspect
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
import segment

# ---------------------------------------------------------------------------------------------
# 1. AdaIN (Huang & Belongie, ICCV 2017; Sec. 3.2 of the paper)
# ---------------------------------------------------------------------------------------------


def calc_mean_std(feat, eps=1e-5):
    """Channel-wise mean and standard deviation of (N, C, H, W) features, each (N, C, 1, 1).

    As pytorch-AdaIN: unbiased variance over the H*W positions, plus eps, then the square root.
    """
    n, c = feat.shape[:2]
    var = feat.reshape(n, c, -1).var(dim=2) + eps
    return feat.reshape(n, c, -1).mean(dim=2).view(n, c, 1, 1), var.sqrt().view(n, c, 1, 1)


def adain(content_feat, style_feat):
    """Eq. (1): sigma(f_sty) * (f_src - mu(f_src)) / sigma(f_src) + mu(f_sty)."""
    if content_feat.shape[:2] != style_feat.shape[:2]:
        raise ValueError(f"adain: content {tuple(content_feat.shape)} and style {tuple(style_feat.shape)} "
                         "features must share batch size and channels")
    style_mean, style_std = calc_mean_std(style_feat)
    content_mean, content_std = calc_mean_std(content_feat)
    return (content_feat - content_mean) / content_std * style_std + style_mean  # Eq. (1)


def vgg_normalised(width=64):
    """The normalised VGG19 of AdaIN as a 53-child nn.Sequential; loads `vgg_normalised.pth` strictly.

    Child 0 is a 1x1 conv that holds the input normalisation ([0, 1] RGB in); reflection padding;
    ceil-mode max pooling. Children 0..30 (up to relu4_1) are the AdaIN encoder. `width` is the
    channel count of the first block (64 published; the CPU demo uses a thinner random one).
    """
    c1, c2, c3, c4 = width, 2 * width, 4 * width, 8 * width

    def conv(cin, cout):
        return [nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(cin, cout, (3, 3)), nn.ReLU()]

    def pool():
        return [nn.MaxPool2d((2, 2), (2, 2), (0, 0), ceil_mode=True)]

    return nn.Sequential(
        nn.Conv2d(3, 3, (1, 1)),                                        # 0
        *conv(3, c1), *conv(c1, c1), *pool(),                           # 1-3 relu1_1, 4-6 relu1_2, 7
        *conv(c1, c2), *conv(c2, c2), *pool(),                          # 8-10 relu2_1, 11-13, 14
        *conv(c2, c3), *conv(c3, c3), *conv(c3, c3), *conv(c3, c3), *pool(),  # 15-17 relu3_1, ..., 27
        *conv(c3, c4),                                                  # 28-30 relu4_1 (encoder ends)
        *conv(c4, c4), *conv(c4, c4), *conv(c4, c4), *pool(),           # 31-39 relu4_2..4_4, 40
        *conv(c4, c4), *conv(c4, c4), *conv(c4, c4), *conv(c4, c4),     # 41-52 relu5_1..5_4
    )


ENCODER_DEPTH = 31                                    # children 0..30 of vgg_normalised(): up to relu4_1
RELU_LEVELS = (4, 11, 18, 31)                         # ends of the slices up to relu1_1, 2_1, 3_1, 4_1


def decoder(width=64):
    """The AdaIN decoder (relu4_1 -> RGB), a 29-child nn.Sequential that loads `decoder.pth` strictly."""
    c1, c2, c3, c4 = width, 2 * width, 4 * width, 8 * width

    def conv(cin, cout, relu=True):
        return [nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(cin, cout, (3, 3))] + ([nn.ReLU()] if relu else [])

    def up():
        return [nn.Upsample(scale_factor=2, mode="nearest")]

    return nn.Sequential(
        *conv(c4, c3), *up(),                                           # 0-2, 3
        *conv(c3, c3), *conv(c3, c3), *conv(c3, c3), *conv(c3, c2), *up(),  # 4-15, 16
        *conv(c2, c2), *conv(c2, c1), *up(),                            # 17-22, 23
        *conv(c1, c1), *conv(c1, 3, relu=False),                        # 24-26, 27-28
    )


ADAIN_URL = "https://github.com/naoto0804/pytorch-AdaIN (README, 'Download models')"
DEEPLAB_INIT = "DeepLab_resnet_pretrained_init-f81d91e8.pth"       # G's initialisation (AdaptSegNet, CLAN, ASH)
DEEPLAB_INIT_URL = ("the AdaptSegNet repository, github.com/wasidennis/AdaptSegNet (RESTORE_FROM in "
                    "train_gta2cityscapes_multi.py: http://vllab.ucmerced.edu/ytsai/CVPR18/" + DEEPLAB_INIT + ")")


def _read_checkpoint(path, what):
    path = Path(path)
    if not path.is_file():
        raise data.MissingFile(f"{what}: no file at {path}. It is published at {ADAIN_URL}; without it, "
                                "train one with `python ash.py train-decoder` (see its --help).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise data.BadInput(f"{what}: cannot read {path} as a PyTorch checkpoint ({e})") from e


def _load_strict(module, state, path, what):
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError) as e:
        raise data.BadInput(f"{what}: {path} does not have the layout of pytorch-AdaIN's file ({e})") from e
    return module


def random_vgg_normalised(seed=0, width=64):
    """A randomly initialised `vgg_normalised()` for users without the published weights (our choice).

    Child 0 holds the ImageNet normalisation of [0, 1] RGB; the 3x3 convs get He-normal weights
    (fan-in, ReLU gain) and zero bias so that activations keep their scale down to relu4_1. Random
    convolutional features still carry texture statistics (Ustyuzhaninov et al., 2017), so AdaIN
    transfers style once a decoder is trained to invert this encoder (`train_decoder`).
    """
    gen = torch.Generator().manual_seed(seed)
    vgg = vgg_normalised(width)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        vgg[0].weight.copy_(torch.diag(1 / std).view(3, 3, 1, 1))
        vgg[0].bias.copy_(-mean / std)
        for layer in list(vgg)[1:]:
            if isinstance(layer, nn.Conv2d):
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * math.sqrt(2 / fan_in))
                layer.bias.zero_()
    return vgg


class Stylizer(nn.Module):
    """The frozen AdaIN encoder (VGG to relu4_1) and decoder; Eq. (1) and Eq. (4).

    Images are [0, 1] RGB (N, 3, H, W) in and out (the decoder output is not clamped, so that
    gradients reach the ASH module everywhere; clamp for display). relu4_1 is at 1/8 resolution.
    """

    def __init__(self, vgg, dec):
        super().__init__()
        self.encoder = nn.Sequential(*list(vgg.children())[:ENCODER_DEPTH])
        self.decoder = dec
        self.channels = self.encoder[ENCODER_DEPTH - 2].out_channels  # 512 at relu4_1

    def encode(self, x):
        return self.encoder(x)                                          # (N, 512, H/8, W/8)

    def encode_levels(self, x):
        """relu1_1, relu2_1, relu3_1, relu4_1 features (the levels of the AdaIN style loss)."""
        feats, start = [], 0
        for end in RELU_LEVELS:
            x = self.encoder[start:end](x)
            feats.append(x)
            start = end
        return feats

    def stylize(self, f_src, f_style, alpha=0.5):
        """Eq. (4): Dec(alpha * AdaIN(f_src, f_style) + (1 - alpha) * f_src); the paper's alpha is 0.5."""
        f_merged = adain(f_src, f_style)                                # Algorithm 1, line 7
        return self.decoder(alpha * f_merged + (1 - alpha) * f_src), f_merged  # Algorithm 1, line 8


def load_stylizer(vgg_path, decoder_path):
    """A frozen `Stylizer` (eval mode) from `vgg_normalised.pth` and `decoder.pth` (published, or written
    by `train-decoder`; the width is read from the files, 64 for the published ones)."""
    vgg_state = _read_checkpoint(vgg_path, "--vgg (vgg_normalised.pth)")
    dec_state = _read_checkpoint(decoder_path, "--decoder (decoder.pth)")
    width = vgg_state["2.weight"].shape[0] if "2.weight" in vgg_state else 64
    vgg = _load_strict(vgg_normalised(width), vgg_state, vgg_path, "--vgg")
    dec = _load_strict(decoder(width), dec_state, decoder_path, "--decoder")
    return Stylizer(vgg, dec).requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# 2. Orthogonal noise (Eq. 3, Algorithm 1 line 4; Wang et al., CVPR 2020)
# ---------------------------------------------------------------------------------------------


def orthogonal_noise(n, generator=None, device=None):
    """An (n, n) orthogonal matrix Z, Haar-distributed: QR of a standard normal matrix, sign-fixed.

    Q * sign(diag(R)) makes the factorisation unique, so Z is uniform on O(n) (Mezzadri, 2007).
    """
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))).float().to(device)


def mix_channels(z, feat):
    """Z f: multiply the channel vector at every position of (N, C, H, W) features by Z (C, C).

    The `--noise rotation` reading. For each position p, f'[:, p] = Z f[:, p], so all inner products
    <f[:, p], f[:, q]> between the positions' channel vectors (the (HW, HW) matrix F^T F) are preserved
    exactly; the channel Gram matrix F F^T becomes Z F F^T Z^T (same eigenvalues, trace, Frobenius
    norm), while the per-channel means and standard deviations that AdaIN transfers are scrambled
    (on ReLU features, about half the channel means become negative): a new style of the same "energy".
    """
    return torch.einsum("ij,njhw->nihw", z.to(feat.dtype), feat)


def elementwise_noise(feat, generator=None):
    """The `--noise elementwise` reading (the authors' code as described in issue 13): f * (1 + V).

    V (N, C, H, W): for every image and channel, the orthogonal factor U V^T of the SVD of a standard
    normal (H, W) matrix (our reading of "V from an SVD of a normal matrix"; its rows, or columns, are
    orthonormal). Every entry of V lies in [-1, 1], so 1 + V >= 0: ReLU features stay non-negative,
    zeros stay zero (the support is kept), each element is scaled by a factor in [0, 2] whose mean
    over positions is ~0. Channel means move little, stds more (a few to tens of percent, depending
    on H*W): AdaIN sees a slightly different style each iteration.
    """
    device = generator.device if generator is not None else feat.device
    a = torch.randn(feat.shape, generator=generator, device=device, dtype=torch.float32)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)                 # batched over (N, C)
    v = (u @ vh).to(feat.device, feat.dtype)
    return feat * (1 + v)


def whitened_noise(feat, generator=None, rel_eps=1e-6):
    """The `--noise whitened` reading, Deep Feature Perturbation's form ([35], Wang et al., CVPR 2020).

    Per image: centre the features F (C, HW) on their channel means mu, whiten them in the eigenbasis
    of their covariance E D E^T (kept to the k eigenvalues above rel_eps * max, so that all-zero ReLU
    channels are handled exactly), rotate the k whitened coordinates by a Haar-random Z (k, k), and
    recolour: f' = E_k D_k^(1/2) Z D_k^(-1/2) E_k^T (F - mu) + mu.

    Exactly kept: the channel means and the whole channel covariance (hence every channel's std);
    changed: which positions carry which feature vector (the spatial arrangement). NOTE: AdaIN
    (Eq. 1) reads only the channel means and stds, so AdaIN(f_src, whitened_noise(f)) == AdaIN(f_src, f):
    with `--mode stylize+noise` this reading is the same computation as `--mode stylize` (Table 5
    rows 2 and 3 coincide). Only the ASH module, whose gamma / beta vary over positions (Eq. 3), sees
    the difference (L_s1 / L_s2 read channel means and stds too).
    """
    n, c = feat.shape[:2]
    flat = feat.reshape(n, c, -1).double()
    mu = flat.mean(2, keepdim=True)
    centred = flat - mu
    out = []
    for i in range(n):
        cov = centred[i] @ centred[i].T / max(centred.shape[2] - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)
        keep = evals > rel_eps * evals.max().clamp(min=1e-30)
        e, d = evecs[:, keep], evals[keep]
        white = (e.T @ centred[i]) / d.sqrt()[:, None]                  # (k, HW), covariance I_k
        z = orthogonal_noise(e.shape[1], generator).double()             # Eq. (3)'s Z on whitened features
        out.append(e @ (d.sqrt()[:, None] * (z @ white)))               # recolour: covariance E_k D_k E_k^T
    return (torch.stack(out) + mu).to(feat.dtype).reshape(feat.shape)


NOISES = ("rotation", "elementwise", "whitened")
# The default reading of the orthogonal noise (one place; see docs/ash.md, "Orthogonal noise"). The text
# cites [35] and says the noise keeps the "inherent style information" while "increasing the diversity
# of the style features"; Table 5 reports row 3 (+ noise) above row 2 (stylization only). `whitened`
# keeps the style exactly but, AdaIN reading only means / stds, makes row 3 identical to row 2;
# `rotation` scrambles the channel statistics AdaIN transfers. `elementwise` (the authors' code) keeps
# most of the style (means ~1%) while diversifying it, and can make rows 2 and 3 differ.
DEFAULT_NOISE = "elementwise"


def perturb_style(f_style, noise=DEFAULT_NOISE, generator=None):
    """Algorithm 1 line 4: "multiply the style features with an orthogonal noise matrix Z", in one of the
    readings `NOISES` (see `mix_channels`, `elementwise_noise`, `whitened_noise`); fresh every call."""
    if noise == "rotation":
        z = orthogonal_noise(f_style.shape[1], generator, device=f_style.device)
        return mix_channels(z, f_style)
    if noise == "elementwise":
        return elementwise_noise(f_style, generator)
    if noise == "whitened":
        return whitened_noise(f_style, generator)
    raise data.BadInput(f"--noise must be one of {', '.join(NOISES)}; got {noise!r}")


# ---------------------------------------------------------------------------------------------
# 3. The ASH module (Eq. 2-3)
# ---------------------------------------------------------------------------------------------


def label_smoothing(prob, eps=0.1):
    """(1 - eps) p + eps / C over the class dimension of a softmax (N, C, H, W); eps 0.1 as the authors' code."""
    return (1 - eps) * prob + eps / prob.shape[1]


class ASHModule(nn.Module):
    """Eq. (2)-(3): gamma, beta = ASH(G(X_src)); f'_style = Z f_style (gamma + delta) + beta.

    A few convolutions (our choice of widths, after the authors' SFT-style code: a shared trunk to
    256 channels, then two 1x1-conv heads to 512) map the label-smoothed softmax, averaged down to the
    style-feature grid (area interpolation keeps it a distribution), to element-wise gamma and beta
    of the relu4_1 style features. Input: the style features already multiplied by Z.
    """

    def __init__(self, num_classes=19, channels=512, hidden=256, delta=1.0):
        super().__init__()
        self.delta = delta
        self.shared = nn.Sequential(nn.Conv2d(num_classes, hidden // 2, 3, padding=1), nn.LeakyReLU(0.1),
                                    nn.Conv2d(hidden // 2, hidden, 1), nn.LeakyReLU(0.1))
        self.gamma = nn.Sequential(nn.Conv2d(hidden, channels, 1), nn.LeakyReLU(0.1), nn.Conv2d(channels, channels, 1))
        self.beta = nn.Sequential(nn.Conv2d(hidden, channels, 1), nn.LeakyReLU(0.1), nn.Conv2d(channels, channels, 1))

    def coefficients(self, semantics, size):
        """Eq. (2): element-wise (N, 512, h, w) gamma and beta from (N, C, H, W) class probabilities."""
        h = self.shared(F.interpolate(semantics, size=size, mode="area"))
        return self.gamma(h), self.beta(h)

    def forward(self, f_style, semantics):
        gamma, beta = self.coefficients(semantics, f_style.shape[-2:])  # Eq. (2), Algorithm 1 line 5
        return f_style * (gamma + self.delta) + beta                    # Eq. (3), Algorithm 1 line 6


# ---------------------------------------------------------------------------------------------
# 4. Discriminator and losses (Eq. 5-9)
# ---------------------------------------------------------------------------------------------


class FCDiscriminator(nn.Module):
    """The fully convolutional discriminator of AdaptSegNet / CLAN on G's softmax (N, C, H, W).

    Five 4x4 convs of stride 2 (64-128-256-512-1), LeakyReLU 0.2; a (N, 1, H/32, W/32) map of logits
    of "this prediction comes from a source image" (D of Eq. 5). Names as in CLAN's `FCDiscriminator`.
    """

    def __init__(self, num_classes=19, ndf=64):
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes, ndf, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, 4, stride=2, padding=1)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, 4, stride=2, padding=1)
        self.classifier = nn.Conv2d(ndf * 8, 1, 4, stride=2, padding=1)
        self.leaky_relu = nn.LeakyReLU(0.2)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = self.leaky_relu(conv(x))
        return self.classifier(x)


def adversarial_loss(d_logits, source):
    """One term of Eq. (5) in BCE-with-logits form: -log D(.) if `source` else -log(1 - D(.)).

    Eq. (5) = adversarial_loss(D(G(X_src)), True) + adversarial_loss(D(G(X_stylized)), False) is what
    D minimises (line 12); G minimises adversarial_loss(D(G(X_stylized)), True) (fool D into
    "source", line 11, as AdaptSegNet/CLAN) and the ASH module maximises that same term (line 9).
    """
    return F.binary_cross_entropy_with_logits(d_logits, torch.full_like(d_logits, float(source)))


def content_loss(feat, target):
    """Eq. (7), as Huang & Belongie: mean squared error between features."""
    return F.mse_loss(feat, target)


def style_loss(feat, target):
    """Eq. (8)-(9), as Huang & Belongie: MSE of the channel means plus MSE of the channel stds."""
    mean, std = calc_mean_std(feat)
    target_mean, target_std = calc_mean_std(target)
    return F.mse_loss(mean, target_mean) + F.mse_loss(std, target_std)


def ash_loss(l_adv, f_src, f_style, f_merged, use_lc=True, use_ls1=True, use_ls2=True, weight=1.0):
    """The loss the ASH module minimises (Eq. 6 and the prose of Sec. 3.3), with its terms.

    -L_adv (maximise the adversarial loss) + L_c (keep the content, Eq. 7) + L_s1 (keep the style of
    X_sty, Eq. 8) - L_s2 (move away from the source style, Eq. 9). Eq. (6) prints "- L_c" but the
    text ("L_c is minimized to preserve content") and the authors' code add it; with "- L_c" the
    objective is unbounded below. L_s1 compares with Z f_style, the style image's features before
    the ASH transform (as the authors' code): against f'_style itself it would be zero by
    construction of AdaIN. `weight` scales L_c, L_s1, L_s2 (1 in Eq. 6).

    L_c and L_s2 nearly cancel (issue 13 §4; a property of Eq. 6-9, the authors' code has it too): both
    compare AdaIN(f_src, f'_style) with f_src at relu4_1, and per channel
    |AdaIN(f_src, s) - f_src|^2 averaged over positions = (mu_s - mu_src)^2 + (sigma_s - sigma_src)^2 up
    to the (HW - 1) / HW of the unbiased variance and eps, i.e. L_c = L_s2 to within ~1/HW. With the
    signs + L_c - L_s2 their gradients cancel, so Eq. (6) acts as -L_adv + L_s1, and Table 6's row
    "L_c, L_s1, L_s2" is, to that precision, the row "L_s1 only". We keep the equations as printed.
    Returns (loss, {"l_c", "l_s1", "l_s2"}).
    """
    f_src, f_style = f_src.detach(), f_style.detach()
    terms = {"l_c": content_loss(f_merged, f_src),                       # Eq. (7)
             "l_s1": style_loss(f_merged, f_style),                      # Eq. (8)
             "l_s2": style_loss(f_merged, f_src)}                        # Eq. (9)
    loss = -l_adv                                                        # Eq. (6)
    loss = loss + weight * (use_lc * terms["l_c"] + use_ls1 * terms["l_s1"] - use_ls2 * terms["l_s2"])
    return loss, terms


# ---------------------------------------------------------------------------------------------
# 5. AdaIN decoder training (Huang & Belongie, Sec. 6; pytorch-AdaIN's train.py)
# ---------------------------------------------------------------------------------------------


def decoder_losses(stylizer, content, style, dec=None):
    """Content and style losses of the AdaIN decoder: t = AdaIN(Enc(c), Enc(s)), g = Dec(t).

    L_content = MSE(Enc(g), t); L_style = sum over relu1_1..relu4_1 of the style_loss of Enc(g)
    against Enc(s). The encoder is frozen; the gradients reach only the decoder (`dec`: the
    stylizer's decoder, possibly wrapped in DistributedDataParallel).
    """
    dec = stylizer.decoder if dec is None else dec
    with torch.no_grad():
        style_feats = stylizer.encode_levels(style)
        t = adain(stylizer.encode(content), style_feats[-1])
    g_feats = stylizer.encode_levels(dec(t))
    loss_c = content_loss(g_feats[-1], t)
    loss_s = sum(style_loss(g, s) for g, s in zip(g_feats, style_feats))
    return loss_c, loss_s


def random_crop(images, size, generator=None):
    """One random (H, W) crop of a batch of (N, 3, H', W') images (the crop of pytorch-AdaIN's training)."""
    h, w = images.shape[-2:]
    ch, cw = min(size[0], h), min(size[1], w)
    top = int(torch.randint(0, h - ch + 1, (), generator=generator))
    left = int(torch.randint(0, w - cw + 1, (), generator=generator))
    return images[..., top:top + ch, left:left + cw]


def decoder_parser():
    p = argparse.ArgumentParser(prog="ash.py train-decoder",
                                description="Train the AdaIN decoder (Huang & Belongie) for users without decoder.pth.")
    p.add_argument("--content", required=True, help="folder of content images (searched recursively)")
    p.add_argument("--styles", required=True, help="folder of style images, e.g. Painter by Numbers (recursive)")
    p.add_argument("--vgg", default=None,
                   help="vgg_normalised.pth (pytorch-AdaIN); without it a random VGG encoder is drawn (see "
                        "random_vgg_normalised) and saved next to the decoder")
    p.add_argument("--encoder-seed", type=int, default=0, help="seed of the random encoder (no --vgg)")
    p.add_argument("--width", type=int, default=64, help="channels of the first VGG block of the random encoder "
                   "(no --vgg; 64 as VGG19, the CPU demo uses 16)")
    p.add_argument("--encoder-iters", type=int, default=2000,
                   help="no --vgg: first iterations that train the random encoder with the decoder as an autoencoder")
    p.add_argument("--iters", type=int, default=160000, help="iterations (pytorch-AdaIN: 160000)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (pytorch-AdaIN: 8)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (pytorch-AdaIN: 1e-4)")
    p.add_argument("--lr-decay", type=float, default=5e-5, help="lr / (1 + lr_decay * iteration) (pytorch-AdaIN)")
    p.add_argument("--style-weight", type=float, default=10.0, help="weight of the style loss (pytorch-AdaIN: 10)")
    p.add_argument("--content-weight", type=float, default=1.0, help="weight of the content loss")
    p.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"),
                   help="images are resized to this size (pytorch-AdaIN: 512 x 512)")
    p.add_argument("--crop", type=int, nargs=2, default=(256, 256), metavar=("H", "W"),
                   help="then randomly cropped to this size (pytorch-AdaIN: 256 x 256)")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    return segment.add_run_args(p, "adain-decoder")


def train_decoder(args):
    """Train `decoder()` with Adam on content + style loss; writes <run>/decoder.pth and vgg_normalised.pth.

    With the published `--vgg`, this is pytorch-AdaIN's training. Without it (our choice, for users
    with no pretrained VGG and for the CPU demo): the encoder is drawn at random
    (`random_vgg_normalised`) and, for the first `--encoder-iters` iterations, trained together with
    the decoder as an autoencoder (pixel MSE of Dec(Enc(x)) on content and style images), which gives
    informative features and an inverting decoder in a few hundred CPU steps (a decoder for a fixed
    random encoder still drew blobs after 400); the remaining iterations train the decoder alone with
    the AdaIN losses. Those need a perceptual encoder: on ToyCity, 300 of them after the autoencoder
    collapsed the decoder to two-colour images, so the demo trains the autoencoder only, and AdaIN
    then re-colours the scene with the painting's feature statistics. The decoder starts from
    He-normal weights. The encoder used is saved beside the decoder in the published layout, so that
    `--vgg <run>/vgg_normalised.pth --decoder <run>/decoder.pth` go together. Returns decoder.pth's path.
    """
    run = segment.Run(args)
    if args.vgg:
        vgg = _load_strict(vgg_normalised(), _read_checkpoint(args.vgg, "--vgg"), args.vgg, "--vgg")
    else:
        vgg = random_vgg_normalised(args.encoder_seed, args.width)
        if run.is_main:
            print(f"[{args.name}] no --vgg: random VGG encoder (width {args.width}, seed {args.encoder_seed}), "
                  f"trained as an autoencoder for {args.encoder_iters} iterations, then frozen", flush=True)
    encoder_iters = 0 if args.vgg else args.encoder_iters
    stylizer = Stylizer(vgg, decoder(vgg[2].out_channels))
    for layer in stylizer.decoder:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    stylizer.requires_grad_(False).to(run.device)
    encoder_params = [p for layer in list(stylizer.encoder)[1:] for p in layer.parameters()]  # not the normalisation
    optimizers = {"decoder": torch.optim.Adam(stylizer.decoder.parameters(), lr=args.lr),
                  "encoder": torch.optim.Adam(encoder_params, lr=args.lr)}
    state, step = run.resume(), 0
    if state is not None:
        vgg.load_state_dict(state["vgg"])
        stylizer.decoder.load_state_dict(state["decoder"])
        for k, opt in optimizers.items():
            opt.load_state_dict(state[f"opt_{k}"])
        run.set_rng_state(state["rng"])
        step = state["step"]
    stylizer.decoder.requires_grad_(True)
    dec = run.wrap(stylizer.decoder)
    if step < encoder_iters:
        for p in encoder_params:
            p.requires_grad_(True)
        autoencoder = run.wrap(nn.Sequential(stylizer.encoder, stylizer.decoder))
    content = run.loader(data.StyleFolder(args.content, size=tuple(args.size)), args.batch_size, shuffle=True)
    styles = run.loader(data.StyleFolder(args.styles, size=tuple(args.size)), args.batch_size, shuffle=True)
    style_batches = run.batches(styles, step, args.iters)

    def save():
        run.save({"vgg": vgg.state_dict(), "decoder": stylizer.decoder.state_dict(), "rng": run.rng_state(),
                  "step": step, **{f"opt_{k}": opt.state_dict() for k, opt in optimizers.items()}})
        if run.is_main:  # the published layouts, each written atomically (temporary file + rename)
            for name, module in (("decoder.pth", stylizer.decoder), ("vgg_normalised.pth", vgg)):
                torch.save(module.state_dict(), run.dir / (name + ".tmp"))
                os.replace(run.dir / (name + ".tmp"), run.dir / name)

    for step, batch in run.batches(content, step, args.iters):
        _, style_batch = next(style_batches)
        c = random_crop(batch["image"].to(run.device), args.crop)
        s = random_crop(style_batch["image"].to(run.device), args.crop)
        training_encoder = step < encoder_iters
        if step == encoder_iters and encoder_iters:
            for p in encoder_params:
                p.requires_grad_(False)
        active = [optimizers["decoder"]] + ([optimizers["encoder"]] if training_encoder else [])
        for opt in active:
            for group in opt.param_groups:
                group["lr"] = args.lr / (1.0 + args.lr_decay * step)
        with run.autocast():
            if training_encoder:                        # the autoencoder phase (no published VGG)
                x = torch.cat([c, s])
                loss = F.mse_loss(autoencoder(x).float(), x)
                scalars = {"reconstruction": loss}
            else:
                loss_c, loss_s = decoder_losses(stylizer, c, s, dec)
                loss = args.content_weight * loss_c + args.style_weight * loss_s
                scalars = {"content": loss_c, "style": loss_s}
        run.check_finite(loss, step)
        for opt in active:
            opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        for opt in active:
            run.scaler.step(opt)
        run.scaler.update()
        step += 1
        if step % args.log_every == 0 or step == args.iters:
            run.log(step, **{f"loss_{k}": v.item() for k, v in scalars.items()})
            run.progress(step, args.iters, **{k: v.item() for k, v in scalars.items()})
        if step % args.save_every == 0 or step == args.iters:
            save()
    c = random_crop(next(iter(content))["image"][:4].to(run.device), args.crop)
    s = random_crop(next(iter(styles))["image"][:4].to(run.device), args.crop)
    with torch.no_grad():
        f_c, f_s = stylizer.encode(c), stylizer.encode(s)
        rows = zip(c, s, stylizer.decoder(f_c), stylizer.decoder(adain(f_c, f_s)), stylizer.stylize(f_c, f_s)[0])
    run.save_grid(run.dir / "samples.png", [list(row) for row in rows])
    run.write_index("AdaIN decoder", [("content | style | Dec(Enc(content)) | AdaIN | Eq. (4), alpha 0.5",
                                       [("samples", run.dir / "samples.png")])])
    run.close()
    return run.dir / "decoder.pth"


# ---------------------------------------------------------------------------------------------
# 6. Algorithm 1 (Sec. 3.3, 4.2) and its ablations (Tables 1-3, 5, 6)
# ---------------------------------------------------------------------------------------------

MODES = ("baseline", "stylize", "stylize+noise", "ash")  # Table 5, row by row


class frozen:
    """Context: the parameters of `modules` take no gradient inside (e.g. D while G fools it)."""

    def __init__(self, *modules):
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)


def freeze_bn_affine(model):
    """BatchNorm as in CLAN / AdaptSegNet: the affine weight and bias of every BN layer are not trained
    (requires_grad False, so no optimizer, no weight decay touches them). Returns the frozen parameters."""
    params = [p for m in model.modules() if isinstance(m, BATCHNORMS) for p in (m.weight, m.bias) if p is not None]
    for p in params:
        p.requires_grad_(False)
    return params


class running_stats_kept:
    """Context: the BatchNorm layers of `modules` normalise with batch statistics as in training, but
    their running statistics (and counters) are restored on exit: a forward pass that only serves
    another network's update (Algorithm 1 line 9) leaves no trace in G's evaluation statistics."""

    def __init__(self, *modules):
        self.layers = [m for module in modules for m in module.modules() if isinstance(m, BATCHNORMS)]

    def __enter__(self):
        # the layers update copies (the originals are swapped back on exit, not overwritten in place: the
        # autograd graph of this pass holds the copies, which a later backward checks for in-place changes)
        self.saved = []
        for m in self.layers:
            self.saved.append(dict(m.named_buffers(recurse=False)))
            for k, v in self.saved[-1].items():
                setattr(m, k, v.clone())

    def __exit__(self, *exc):
        for m, saved in zip(self.layers, self.saved):
            for k, v in saved.items():
                setattr(m, k, v)


class Algorithm1:
    """The three players of ASH, their optimizers, and `step()`: one iteration of Algorithm 1.

    G: the segmenter (DeepLab-v2), SGD; ASH: the ASHModule, SGD; D: the FCDiscriminator, Adam;
    the Stylizer (AdaIN encoder/decoder) is frozen. Any of them may be wrapped in DDP (`run.wrap`).
    With --mode baseline only line 10 runs; "stylize" drops lines 4-6 and 9, "stylize+noise" lines 5-6, 9.
    BatchNorm as CLAN / AdaptSegNet (issue 13 §3): G's BN weight and bias are frozen (`--bn-affine
    frozen`, outside every optimizer, so no weight decay), and the line-9 pass through G normalises with
    batch statistics but leaves G's running statistics as they were; lines 10 and 11 update them.
    The learning rates follow the poly schedule times the warm-up of `--warmup` (0 in the paper preset).
    """

    def __init__(self, G, ash, D, stylizer, args, autocast=None, scaler=None):
        self.G, self.ash, self.D, self.stylizer, self.args = G, ash, D, stylizer, args
        self.autocast = autocast or (lambda: torch.autocast("cpu", enabled=False))
        self.scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
        sgd = dict(momentum=args.momentum, weight_decay=args.weight_decay)
        if args.bn_affine == "frozen":                                  # CLAN / AdaptSegNet (Sec. 4.2: "as [22]")
            freeze_bn_affine(segment.unwrap(G))
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]}
                  for g in segment.unwrap(G).param_groups(args.lr)]
        self.optimizers = {"G": torch.optim.SGD(groups, lr=args.lr, **sgd)}
        if ash is not None:
            self.optimizers["ash"] = torch.optim.SGD(ash.parameters(), lr=args.lr, **sgd)
        if D is not None:
            self.optimizers["D"] = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(0.9, 0.99))
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]

    def semantics(self, logits, labels):
        """The input of the ASH module (Eq. 2): label-smoothed softmax of G(X_src), or an ablation."""
        a = self.args
        prob = F.softmax(logits.detach().float(), dim=1)
        if a.uniform_semantics:                                        # Table 1, "Uni.Sem.Info."
            return torch.full_like(prob, 1.0 / prob.shape[1])
        if a.gt_conditioning:                                          # Table 2, "Ground truth"
            valid = labels != data.IGNORE_INDEX
            prob = F.one_hot(labels.clamp(max=prob.shape[1] - 1) * valid, prob.shape[1]).permute(0, 3, 1, 2).float()
            prob = torch.where(valid[:, None], prob, torch.full_like(prob, 1.0 / prob.shape[1]))
        return label_smoothing(prob, a.label_smoothing)

    def stylize(self, x_src, x_style, semantics=None):
        """Algorithm 1, lines 2-8: (X_stylized, f_src, Z f_style, f_merged = AdaIN(f_src, f'_style)).

        The style images are resized to the source size (our choice), so that gamma and beta, computed
        on the source's segmentation, lie on the same grid as the style features they modulate.
        `semantics` (N, C, H, W) is the ASH module's input (mode "ash" only).
        """
        a, sty = self.args, self.stylizer
        x_style = F.interpolate(x_style, size=x_src.shape[-2:], mode="bilinear", align_corners=False)
        with torch.no_grad(), self.autocast():
            f_src = sty.encode(x_src).float()                           # line 2: (N, 512, H/8, W/8)
            f_style = sty.encode(x_style).float()                       # line 3
        if a.mode != "stylize":
            f_style = perturb_style(f_style, a.noise)                   # line 4: a fresh Z every iteration
        f_style_p = self.ash(f_style, semantics) if a.mode == "ash" else f_style  # lines 5-6 (Eq. 2-3)
        with self.autocast():
            x_stylized, f_merged = sty.stylize(f_src, f_style_p, a.alpha)  # lines 7-8 (Eq. 1, 4)
        return x_stylized, f_src, f_style, f_merged.float()

    def step(self, x_src, y_src, x_style, it):
        """One iteration of Algorithm 1 on a batch: images (N, 3, H, W) [0, 1], trainIds (N, H, W),
        style images (N, 3, H', W'). Returns the losses (floats); `self.images` keeps
        (source, stylized, prediction on stylized) for display."""
        a, G, D = self.args, self.G, self.D
        G_, D_ = segment.unwrap(G), segment.unwrap(D) if D is not None else None
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = segment.poly_lr(group["base_lr"], it, a.iters, a.power) * warmup_factor(it, a)
            opt.zero_grad(set_to_none=True)
        out = {}

        # Algorithm 1, line 10: train G on the source domain with cross-entropy; its softmax is also
        # the G(X_src) of line 5 (before any update of this iteration).
        with self.autocast():
            logits_src = G(x_src)
            loss_seg = F.cross_entropy(logits_src.float(), y_src, ignore_index=data.IGNORE_INDEX)
        self.scaler.scale(loss_seg).backward()
        out["loss_seg"] = loss_seg
        self.images = (x_src, x_src, logits_src.detach())
        if a.mode == "baseline":
            return self._finish(out, it)
        semantics = self.semantics(logits_src, y_src) if a.mode == "ash" else None
        x_stylized, f_src, f_style, f_merged = self.stylize(x_src, x_style, semantics)  # lines 2-8

        if a.mode == "ash":
            # Algorithm 1, line 9: the ASH module maximises the adversarial loss of Eq. (5) through
            # the frozen decoder, G and D, within the style budget of L_c, L_s1, L_s2 (Eq. 6).
            # G's BatchNorm running statistics are kept out of this pass (CLAN's BN handling, issue 13 §3).
            with frozen(G_, D_), running_stats_kept(G_), self.autocast():
                l_adv = adversarial_loss(D_(F.softmax(G_(x_stylized), dim=1)).float(), source=True)
            loss_ash, terms = ash_loss(ash_adv_weight(a, it) * l_adv, f_src, f_style, f_merged,
                                       use_lc=not a.no_lc, use_ls1=not a.no_ls1, use_ls2=not a.no_ls2,
                                       weight=a.lambda_sub)
            self.scaler.scale(loss_ash).backward()
            out.update(loss_ash=loss_ash, l_adv_ash=l_adv, **terms)

        # Algorithm 1, line 11: G minimises the adversarial loss on the stylized images (D, frozen,
        # should answer "source"); optionally also their cross-entropy (Tables 2-3, "segmentation loss").
        x_stylized = x_stylized.detach()
        with frozen(D_), self.autocast():
            logits_sty = G(x_stylized)
            l_adv = adversarial_loss(D_(F.softmax(logits_sty, dim=1)).float(), source=True)
            loss_g = a.lambda_adv * l_adv
            if a.seg_loss_stylized:
                loss_g = loss_g + F.cross_entropy(logits_sty.float(), y_src, ignore_index=data.IGNORE_INDEX)
        self.scaler.scale(loss_g).backward()
        out["l_adv"] = l_adv

        # Algorithm 1, line 12: D minimises Eq. (5) on detached predictions: source -> 1, stylized -> 0.
        with self.autocast():
            p = torch.cat([F.softmax(logits_src.detach(), dim=1), F.softmax(logits_sty.detach(), dim=1)])
            d = D(p).float()
            n = x_src.shape[0]
            loss_d = adversarial_loss(d[:n], source=True) + adversarial_loss(d[n:], source=False)  # Eq. (5)
        self.scaler.scale(loss_d).backward()
        out["loss_d"] = loss_d
        self.images = (x_src, x_stylized, logits_sty.detach())
        return self._finish(out, it)

    def _finish(self, out, it):
        total = sum(v.detach() for v in out.values())
        if not torch.isfinite(total):
            bad = [k for k, v in out.items() if not torch.isfinite(v.detach())]
            raise FloatingPointError(f"Algorithm 1, iteration {it}: non-finite {bad}; stopping (lower --lr or "
                                     "use --amp off; the last checkpoint stays on disk)")
        for opt in self.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        return {k: v.item() for k, v in out.items()}

    def state_dict(self):
        return {"G": segment.unwrap(self.G).state_dict(),
                **({"ash": segment.unwrap(self.ash).state_dict()} if self.ash is not None else {}),
                **({"D": segment.unwrap(self.D).state_dict()} if self.D is not None else {}),
                **{f"opt_{k}": opt.state_dict() for k, opt in self.optimizers.items()}}

    def load_state_dict(self, state):
        segment.unwrap(self.G).load_state_dict(state["G"])
        for key, net in (("ash", self.ash), ("D", self.D)):
            if net is not None:
                segment.unwrap(net).load_state_dict(state[key])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state[f"opt_{k}"])


# Weights of the ASH loss and the learning-rate schedule: the paper's reading (default) and the authors'
# code's (issue 13 §2). An option given on the command line wins over its preset.
PRESETS = {
    "paper": {"lambda_adv_ash": 1.0,        # Eq. (6): -L_adv unweighted
              "lambda_sub": 1.0,            # Eq. (6): L_c, L_s1, L_s2 unweighted
              "adv_damping": False,         # no schedule on ASH's adversarial weight
              "warmup": 0.0},               # Sec. 4.2: poly schedule only
    "authors-code": {"lambda_adv_ash": "tied",   # ASH's adversarial weight = lambda_adv (0.001, Table 4)
                     "lambda_sub": 1e-8,         # content / style terms at 1e-8
                     "adv_damping": True,        # ... times (1 - i / N)
                     "warmup": 0.05},            # linear lr warm-up over the first 5% of iterations
}


def tied_or_float(text):
    if text == "tied":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'tied', got {text!r}") from None


def apply_preset(args):
    """Fill the options left unset (None) from `PRESETS[args.preset]`; returns args."""
    if args.preset not in PRESETS:
        raise data.BadInput(f"--preset must be one of {', '.join(PRESETS)}; got {args.preset!r}")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def ash_adv_weight(args, it):
    """The weight of L_adv in the ASH module's loss (Eq. 6, line 9) at iteration `it`: --lambda-adv-ash,
    or lambda_adv itself with 'tied' (the authors' code, so that Table 4's sweep moves G's and ASH's
    adversarial weights together), times (1 - it / iters) with --adv-damping (the authors' code)."""
    weight = args.lambda_adv if args.lambda_adv_ash == "tied" else args.lambda_adv_ash
    return weight * (1 - it / args.iters) if args.adv_damping else weight


def warmup_factor(it, args):
    """Linear learning-rate warm-up over the first `--warmup` fraction of the iterations (1 after it)."""
    steps = args.warmup * args.iters
    return min(1.0, (it + 1) / steps) if steps >= 1 else 1.0


class Parser(argparse.ArgumentParser):
    """argparse with the presets applied after parsing (every caller of parser().parse_args gets them)."""

    def parse_args(self, args=None, namespace=None):
        return apply_preset(super().parse_args(args, namespace))


def parser():
    """The command line of Algorithm 1; defaults are the paper's (Sec. 4.2, Table 4)."""
    p = Parser(description="ASH (Tjio et al.), Algorithm 1. `python ash.py` alone runs the "
                                "ToyCity demo; `python ash.py train-decoder -h` trains an AdaIN decoder.")
    g = p.add_argument_group("data")
    g.add_argument("--source", choices=["gta5", "synthia", "toycity"], default="gta5", help="source domain")
    g.add_argument("--source-root", default=None, help="source dataset root (toycity: the cached ToyCity)")
    g.add_argument("--target", choices=["cityscapes", "mapillary", "toycity"], default="cityscapes",
                   help="unseen target domain, for evaluation only")
    g.add_argument("--target-root", default=None, help="target dataset root")
    g.add_argument("--styles", default=None,
                   help="folder of style images, e.g. Painter by Numbers (toycity: its paintings)")
    g.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="training size of source (and style) images; Sec. 4.2: GTA5 720 1280, SYNTHIA 760 1280")
    g.add_argument("--eval-size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"),
                   help="input size of evaluation (the authors' code: Cityscapes at 512 x 1024); the logits are "
                        "upsampled to the label's own resolution")
    g.add_argument("--eval-labels", choices=["full", "resized"], default="full",
                   help="score at the label files' resolution (full, the benchmark's) or on labels resized "
                        "(nearest) to the input size (resized: faster, not comparable with the paper)")
    g.add_argument("--source-split", default="all",
                   help="GTA5 / SYNTHIA images to train on: 'all' (every image, domain generalisation) or a split "
                        "(GTA5: split.mat's train / val / test, else <root>/<split>.txt)")
    g.add_argument("--source-split-file", default=None, help="train only on the image names listed in this file")
    g.add_argument("--source-val-file", default=None,
                   help="GTA5 / SYNTHIA images to evaluate on (a list of names); default: the val split where "
                        "one exists (split.mat / val.txt), else the source evaluation is skipped")
    g.add_argument("--no-source-val", action="store_true", help="never evaluate on the source domain")
    g = p.add_argument_group("networks")
    g.add_argument("--depth", type=int, default=101, choices=[18, 34, 50, 101],
                   help="ResNet depth of DeepLab-v2 (paper: 101)")
    g.add_argument("--backbone-style", choices=["torchvision", "caffe"], default=None,
                   help="DeepLab-v2's ResNet: 'caffe' (AdaptSegNet / CLAN: stride in the first 1x1 conv, frozen BN; "
                        "default on GTA5 / SYNTHIA) or 'torchvision' (default on ToyCity)")
    g.add_argument("--pretrained", default=None,
                   help=f"initial weights of G. caffe: {DEEPLAB_INIT} (MS-COCO-pretrained DeepLab-v2, the start of "
                        f"the paper's and CLAN's numbers), published in {DEEPLAB_INIT_URL}; "
                        "torchvision: resnet101-63fe2227.pth (download.pytorch.org/models/; ImageNet only, not "
                        "comparable with the paper's 36.6 source-only)")
    g.add_argument("--vgg", default=None, help="vgg_normalised.pth of pytorch-AdaIN (or of `ash.py train-decoder`)")
    g.add_argument("--decoder", default=None, help="decoder.pth of pytorch-AdaIN (or of `ash.py train-decoder`)")
    g = p.add_argument_group("optimisation (Sec. 4.2)")
    g.add_argument("--iters", type=int, default=100000, help="iterations of Algorithm 1 (paper: 100k)")
    g.add_argument("--batch-size", type=int, default=1, help="images per iteration (authors' code: 1)")
    g.add_argument("--lr", type=float, default=2.5e-4,
                   help="SGD learning rate of G and the ASH module (10x on G's classifier)")
    g.add_argument("--lr-d", type=float, default=1e-4, help="Adam learning rate of D (betas 0.9, 0.99)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4,
                   help="SGD weight decay (CLAN / authors' code; paper silent)")
    g.add_argument("--power", type=float, default=0.9, help="poly learning-rate schedule power")
    g = p.add_argument_group("ASH (Sec. 3.3)")
    g.add_argument("--lambda-adv", type=float, default=0.001,
                   help="weight of the adversarial loss in G's objective, line 11 (Table 4: 0.001)")
    g.add_argument("--preset", choices=list(PRESETS), default="paper",
                   help="weights of Eq. (6) and lr schedule: 'paper' (Eq. 6 unweighted, poly) or 'authors-code' "
                        "(ASH's adversarial weight tied to lambda_adv with (1 - i/N) damping, L_c / L_s1 / L_s2 "
                        "at 1e-8, lr warm-up); the options below override it")
    g.add_argument("--lambda-adv-ash", type=tied_or_float, default=None,
                   help="weight of L_adv in the ASH loss, a number or 'tied' (= --lambda-adv, so that a sweep of "
                        "--lambda-adv moves G's and ASH's adversarial weights together, as the authors' Table 4); "
                        "paper preset: 1, authors-code: tied")
    g.add_argument("--lambda-sub", type=float, default=None,
                   help="weight of L_c, L_s1, L_s2 in the ASH loss (paper preset: 1; authors-code: 1e-8)")
    g.add_argument("--adv-damping", action=argparse.BooleanOptionalAction, default=None,
                   help="multiply ASH's adversarial weight by (1 - i/N) (paper preset: off; authors-code: on)")
    g.add_argument("--warmup", type=float, default=None,
                   help="fraction of the iterations with a linear lr warm-up before the poly schedule "
                        "(paper preset: 0; authors-code: 0.05)")
    g.add_argument("--bn-affine", choices=["frozen", "trained"], default="frozen",
                   help="G's BatchNorm weight / bias: frozen as CLAN / AdaptSegNet (default) or trained")
    g.add_argument("--delta", type=float, default=1.0, help="delta of Eq. (3) (paper: 1; Table 3: 0)")
    g.add_argument("--noise", choices=NOISES, default=DEFAULT_NOISE,
                   help="reading of the orthogonal noise Z of Eq. (3) / Algorithm 1 line 4: rotation of the raw "
                        "channels; elementwise f * (1 + V) (the authors' code); whitened (Deep Feature "
                        "Perturbation [35]: keeps the channel mean and covariance exactly, so with --mode "
                        f"stylize+noise it equals --mode stylize). Default {DEFAULT_NOISE} (docs/ash.md)")
    g.add_argument("--alpha", type=float, default=0.5, help="weight of AdaIN features in Eq. (4) (paper: 0.5)")
    g.add_argument("--label-smoothing", type=float, default=0.1,
                   help="epsilon of the label smoothing (authors' code: 0.1)")
    g = p.add_argument_group("ablations")
    g.add_argument("--mode", choices=MODES, default="ash",
                   help="Table 5: source only, + stylization, + orthogonal noise, + ASH module")
    g.add_argument("--no-lc", action="store_true", help="drop L_c from Eq. (6) (Table 6)")
    g.add_argument("--no-ls1", action="store_true", help="drop L_s1 from Eq. (6) (Table 6)")
    g.add_argument("--no-ls2", action="store_true", help="drop L_s2 from Eq. (6) (Table 6)")
    g.add_argument("--uniform-semantics", action="store_true", help="ASH sees a uniform probability map (Table 1)")
    g.add_argument("--gt-conditioning", action="store_true", help="ASH sees the ground truth, not G(X_src) (Table 2)")
    g.add_argument("--seg-loss-stylized", action="store_true",
                   help="G is also trained with cross-entropy on the stylized images (Tables 2-3)")
    g = p.add_argument_group("output")
    g.add_argument("--eval-every", type=int, default=5000, help="steps between evaluations (0: only at the end)")
    g.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    g.add_argument("--image-every", type=int, default=1000, help="steps between source | stylized | prediction grids")
    g.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint given by --resume and exit")
    return segment.add_run_args(p, "ash")


TRAIN_SIZE = {"gta5": (720, 1280), "synthia": (760, 1280), "toycity": (128, 256)}  # Sec. 4.2 (H, W)


def source_val(args, size):
    """The source domain's val split where one exists (GTA5: split.mat's valIds or val.txt; SYNTHIA:
    val.txt; or --source-val-file), else None with one line saying evaluation on the source is skipped.
    Domain generalisation trains on every source image (split 'all'), so most trees have none."""
    reader = data.GTA5 if args.source == "gta5" else data.Synthia
    try:
        if args.source_val_file:
            return reader(args.source_root, "all", size=size, full_labels=args.eval_labels == "full",
                          split_file=args.source_val_file)
        return reader(args.source_root, "val", size=size, full_labels=args.eval_labels == "full")
    except data.MissingFile as e:
        if args.source_val_file:
            raise
        print(f"[ash] no {args.source} val split in {args.source_root} (split.mat / val.txt): evaluation on the "
              "source domain skipped", flush=True)
        return None


def datasets(args):
    """(source train set, style set, {name: evaluation set}) for the command line's choices.

    Evaluation sets resize the input only (`--eval-size`; ToyCity: the training size); labels keep their
    file's resolution and the logits are upsampled to them (`evaluate_tables`), unless --eval-labels resized."""
    size = tuple(args.size or TRAIN_SIZE[args.source])
    flip = data.RandomFlip()
    full = args.eval_labels == "full"
    needs_toy = (args.source == "toycity" and not (args.source_root and args.styles)) or \
        (args.target == "toycity" and not args.target_root)
    toy = data.toycity() if needs_toy else None
    evals = {}
    if args.source == "toycity":
        source_root = Path(args.source_root or toy / "source")
        source = data.Cityscapes(source_root, "train", size=size, transform=flip)
        evals["toycity-source"] = data.Cityscapes(source_root, "val", size=size, full_labels=full)
    elif not args.source_root:
        raise data.UserError(f"--source {args.source} needs --source-root (the dataset's folder)")
    else:
        reader = data.GTA5 if args.source == "gta5" else data.Synthia
        source = reader(args.source_root, args.source_split, size=size, transform=flip,
                        split_file=args.source_split_file)
        val = None if args.no_source_val else source_val(args, tuple(args.eval_size))
        if val is not None:
            evals[f"{args.source}-val"] = val
    styles = args.styles or (toy / "paintings" if args.source == "toycity" else None)
    if styles is None:
        raise data.UserError("--styles DIR is needed (a folder of paintings, e.g. Painter by Numbers)")
    if args.target == "toycity":
        target_root = args.target_root or toy / "target"
        evals["toycity-target"] = data.Cityscapes(target_root, "val", size=size, full_labels=full)
    elif not args.target_root:
        raise data.UserError(f"--target {args.target} needs --target-root (the dataset's folder)")
    elif args.target == "cityscapes":
        evals["cityscapes"] = data.Cityscapes(args.target_root, "val", size=tuple(args.eval_size), full_labels=full)
    else:
        evals["mapillary"] = data.Mapillary(args.target_root, "val", size=tuple(args.eval_size), full_labels=full)
    return source, data.StyleFolder(styles, size=size), evals


@torch.no_grad()
def evaluate(model, loader, device):
    """One confusion matrix over the loader, scored at each label's own resolution: the network runs on
    the (resized) input, its logits are upsampled bilinearly to the label's size (labels are never
    resized here). Runs in eval mode and hands the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    cm = metrics.ConfusionMatrix(data.NUM_CLASSES)
    try:
        for batch in loader:
            logits = model(batch["image"].to(device)).float()
            labels = batch["labels"]
            if logits.shape[-2:] != labels.shape[-2:]:
                logits = segment.upsample(logits, labels.shape[-2:])
            cm.update(logits.argmax(1).cpu(), labels)
    finally:
        model.train(was_training)
    return cm


def evaluate_tables(G, loaders, device):
    """Tables 1-3: per-class IoU over the 19 classes and mIoU over 19, 16 and 13 classes per dataset.

    Prints the tables; returns {dataset: {"miou19", "miou16", "miou13"}} in percent.
    """
    results = {}
    for name, loader in loaders.items():
        cm = evaluate(segment.unwrap(G), loader, device)
        results[name] = {f"miou{k}": 100 * cm.miou(k) for k in ("19", "16", "13")}
        print(f"== {name} ({len(loader.dataset)} images) ==\n{cm.table(data.CLASS_NAMES)}", flush=True)
    return results


def backbone_style(args):
    """--backbone-style, or its default: 'caffe' (AdaptSegNet / CLAN's DeepLab-v2, the paper's start, Sec. 4.2
    and Table 5's CLAN baseline) on real data, 'torchvision' on ToyCity (trained from scratch)."""
    return args.backbone_style or ("torchvision" if args.source == "toycity" else "caffe")


def deeplab(args):
    """G: DeepLab-v2 from segment.py. With --backbone-style caffe, segment.DeepLabV2(..., style="caffe") (Caffe
    ResNet, CLAN's dilations, frozen BN; --pretrained reads AdaptSegNet's DEEPLAB_INIT); with torchvision, the
    torchvision-layout ResNet (--pretrained: torchvision's resnet101-63fe2227.pth)."""
    style = backbone_style(args)
    if style == "caffe" and "style" not in inspect.signature(segment.DeepLabV2).parameters:
        if args.backbone_style == "caffe":
            raise data.UserError("--backbone-style caffe needs segment.DeepLabV2(style='caffe'), which this "
                                 "segment.py does not have yet; use --backbone-style torchvision")
        print("[ash] this segment.py has no Caffe-style DeepLab-v2 (AdaptSegNet / CLAN): using the torchvision "
              "layout (--backbone-style torchvision)", flush=True)
        style = "torchvision"
    if style == "torchvision":
        return segment.DeepLabV2(data.NUM_CLASSES, args.depth, pretrained=args.pretrained)
    return segment.DeepLabV2(data.NUM_CLASSES, args.depth, style=style, pretrained=args.pretrained)


def check_args(args):
    ash_only = [f for f in ("no_lc", "no_ls1", "no_ls2", "uniform_semantics", "gt_conditioning") if getattr(args, f)]
    if ash_only and args.mode != "ash":
        raise data.BadInput(f"--{ash_only[0].replace('_', '-')} is an ablation of the ASH module: it needs --mode ash")
    if args.seg_loss_stylized and args.mode == "baseline":
        raise data.BadInput("--seg-loss-stylized needs stylized images: not with --mode baseline")
    if args.uniform_semantics and args.gt_conditioning:
        raise data.BadInput("--uniform-semantics and --gt-conditioning are two different ablations; choose one")
    if not 0 <= args.warmup <= 1:
        raise data.BadInput(f"--warmup is a fraction of the iterations, 0..1; got {args.warmup}")


def build(args, device="cpu", stylizer=None, segmenter=None, run=None):
    """Algorithm1 with the networks of the command line: DeepLab-v2 (ResNet-`depth`) unless a
    `segmenter` is given (any model returning logits at the input resolution, with `param_groups`),
    the ASH module, D, and the AdaIN `stylizer` (else loaded from --vgg / --decoder)."""
    check_args(args)
    wrap = run.wrap if run is not None else (lambda m: m.to(device))
    if stylizer is None and args.mode != "baseline":
        if not (args.vgg and args.decoder):
            raise data.UserError("--vgg and --decoder are needed to stylize (pytorch-AdaIN's vgg_normalised.pth and "
                             "decoder.pth, or the output of `python ash.py train-decoder`)")
        stylizer = load_stylizer(args.vgg, args.decoder)
    if stylizer is not None:
        stylizer = stylizer.to(device)
    if segmenter is None:
        segmenter = deeplab(args)
    G = wrap(segmenter)
    ash = wrap(ASHModule(data.NUM_CLASSES, stylizer.channels, delta=args.delta)) if args.mode == "ash" else None
    D = wrap(FCDiscriminator(data.NUM_CLASSES)) if args.mode != "baseline" else None
    return Algorithm1(G, ash, D, stylizer, args, autocast=run.autocast if run else None,
                      scaler=run.scaler if run else None)


def show(images, num=2):
    """Rows of source | stylized | prediction (colours of the trainIds) for a grid."""
    src, stylized, logits = images
    pred = [data.colorize(l.argmax(0).cpu()).permute(2, 0, 1).float() / 255 for l in logits[:num]]
    return [[s.cpu(), t.detach().cpu().clamp(0, 1), p] for s, t, p in zip(src[:num], stylized[:num], pred)]


def train(args):
    """Algorithm 1 with the run helpers: checkpoints, --resume, log.jsonl, grids, index.html.

    Returns {dataset: {"miou19", "miou16", "miou13"}} of the final evaluation.
    """
    run = segment.Run(args)
    source, styles, evals = datasets(args)
    algo = build(args, run.device, run=run)
    state, step = run.resume(), 0
    if state is not None:
        algo.load_state_dict(state["algorithm1"])
        run.set_rng_state(state["rng"])
        step = state["step"]
    eval_loaders = {k: segment.eval_loader(v, batch_size=1, workers=args.workers) for k, v in evals.items()}
    if args.eval_only:
        results = evaluate_tables(algo.G, eval_loaders, run.device) if run.is_main else {}
        run.close()
        return results
    loader = run.loader(source, args.batch_size, shuffle=True)
    style_batches = run.batches(run.loader(styles, args.batch_size, shuffle=True), step, args.iters)
    grids = []
    segment.unwrap(algo.G).train()
    for step, batch in run.batches(loader, step, args.iters):
        _, style = next(style_batches)
        losses = algo.step(batch["image"].to(run.device), batch["labels"].to(run.device),
                           style["image"].to(run.device), step)
        step += 1
        if step % args.log_every == 0 or step == args.iters:
            run.log(step, **losses)
            run.progress(step, args.iters, **losses)
        if step % args.image_every == 0 or step == args.iters:
            path = run.save_grid(run.dir / "images" / f"{step:07d}.png", show(algo.images))
            grids.append((f"step {step}: source | stylized | prediction", path))
            run.write_index(f"ASH ({args.mode})", [("Algorithm 1", grids[-8:])])
        if step % args.save_every == 0 or step == args.iters:
            run.save({"algorithm1": algo.state_dict(), "rng": run.rng_state(), "step": step})
        if args.eval_every and step % args.eval_every == 0 and step < args.iters and run.is_main:
            scores = evaluate_tables(algo.G, eval_loaders, run.device)
            run.log(step, **{f"{d}_{k}": v for d, r in scores.items() for k, v in r.items()})
            segment.unwrap(algo.G).train()
    results = evaluate_tables(algo.G, eval_loaders, run.device) if run.is_main else {}
    run.log(args.iters, **{f"{d}_{k}": v for d, r in results.items() for k, v in r.items()})
    run.write_index(f"ASH ({args.mode})", [("Algorithm 1", grids[-8:])])
    run.close()
    return results


# ---------------------------------------------------------------------------------------------
# 7. The ToyCity demo and the command line
# ---------------------------------------------------------------------------------------------


def demo_parser():
    p = argparse.ArgumentParser(prog="ash.py demo", description="ASH at demo scale on ToyCity (source -> unseen "
                                "target): AdaIN decoder (cached), source-only baseline and ASH, mIoU of both.")
    p.add_argument("--size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"), help="training/eval size")
    p.add_argument("--depth", type=int, default=18, help="ResNet depth of DeepLab-v2 (paper: 101)")
    p.add_argument("--iters", type=int, default=400, help="iterations of Algorithm 1 per run (paper: 100k)")
    p.add_argument("--batch-size", type=int, default=2, help="images per iteration")
    p.add_argument("--lr", type=float, default=1e-2, help="SGD learning rate (the paper's 2.5e-4 is for ImageNet "
                   "weights; the demo trains from scratch)")
    p.add_argument("--width", type=int, default=16, help="first-block width of the demo's random VGG (published: 64)")
    p.add_argument("--decoder-iters", type=int, default=400, help="AdaIN decoder iterations (cached in <out>)")
    p.add_argument("--encoder-iters", type=int, default=400,
                   help="of which autoencoder iterations (see train-decoder; the AdaIN losses need a perceptual "
                        "encoder, so the demo trains an autoencoder only)")
    p.add_argument("--out", default="runs", help="output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def demo_stylizer(d, adain_dir):
    """Train the demo's AdaIN encoder/decoder on ToyCity source images and paintings; --resume auto
    continues an interrupted training and reuses a finished one (its loop then has nothing to do)."""
    toy = data.toycity()
    train_decoder(decoder_parser().parse_args([
        "--content", str(toy / "source" / "leftImg8bit" / "train"), "--styles", str(toy / "paintings"),
        "--width", str(d.width), "--iters", str(d.decoder_iters), "--encoder-iters", str(d.encoder_iters),
        "--batch-size", str(2 * d.batch_size), "--lr", "1e-3", "--size", *map(str, d.size), "--crop", *map(str, d.size),
        "--name", adain_dir.name, "--log-every", "50", "--out", str(adain_dir.parent), "--device", d.device,
        "--workers", "0", "--resume", "auto"]))
    return adain_dir


def demo_args(d, mode, adain_dir, out, name, seed=0, resume="", noise=None):
    """Algorithm 1 options at demo scale (ToyCity source -> target, DeepLab-v2 ResNet-`d.depth`)."""
    return parser().parse_args([*(["--noise", noise] if noise else []),
        "--source", "toycity", "--target", "toycity", "--mode", mode, "--depth", str(d.depth),
        "--size", *map(str, d.size), "--iters", str(d.iters), "--batch-size", str(d.batch_size),
        "--lr", str(d.lr), "--vgg", str(adain_dir / "vgg_normalised.pth"),
        "--decoder", str(adain_dir / "decoder.pth"), "--eval-every", "0", "--image-every", "50",
        "--save-every", str(d.iters), "--log-every", "25", "--name", name, "--seed", str(seed),
        "--out", str(out), "--device", d.device, "--workers", "0", "--resume", resume])


def demo(argv=()):
    """Train (or reuse) an AdaIN decoder on ToyCity's source images and paintings, then Algorithm 1
    twice (source only, ASH) with DeepLab-v2 ResNet-18; prints source-val and target-val mIoU19."""
    d = demo_parser().parse_args(list(argv))
    segment.announce_demo("ash")
    adain_dir = demo_stylizer(d, Path(d.out) / "ash-demo-adain")
    results = {}
    for mode in ("baseline", "ash"):
        results[mode] = train(demo_args(d, mode, adain_dir, d.out, f"ash-demo-{mode}"))
    print(f"\nToyCity source -> target, DeepLab-v2 ResNet-{d.depth}, {d.iters} iterations of batch {d.batch_size} "
          f"at {d.size[0]}x{d.size[1]}: mIoU over 19 classes (%)")
    print(f"{'':<12}{'source val':>12}{'target val':>12}")
    for mode, r in results.items():
        print(f"{mode:<12}{r['toycity-source']['miou19']:>12.2f}{r['toycity-target']['miou19']:>12.2f}")
    return results


EXPERIMENT_MODES = ("baseline", "stylize", "stylize+noise", "ash")  # the rows of Tables 1 and 5
# What changed Algorithm 1's results since the last stored experiments (issue 13): the noise readings,
# CLAN's BatchNorm handling, evaluation at the label's resolution.
EXPERIMENT_VERSION = "issue-13: --noise, frozen BN affine, line-9 BN statistics kept, eval at label resolution"


def experiment_parser():
    p = demo_parser()
    p.prog, p.description = "ash.py experiment", (
        "Tables 1/5 at ToyCity scale: source-only vs stylization vs stylization + orthogonal noise vs full "
        "ASH, each seed trained on ToyCity source and tested on the unseen target; mean +- std over seeds.")
    p.set_defaults(out="runs/ash-experiment", iters=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of Algorithm 1 (>= 3 for a std)")
    p.add_argument("--modes", nargs="+", default=list(EXPERIMENT_MODES), choices=EXPERIMENT_MODES)
    p.add_argument("--noises", nargs="+", default=[DEFAULT_NOISE], choices=NOISES,
                   help="readings of the orthogonal noise for the modes that use it (stylize+noise, ash); "
                        "several: one row per mode x noise (Table 5 rows 3-4 under each reading)")
    p.add_argument("--quick", action="store_true",
                   help="a sixth of the iterations, a quarter of the decoder's (a smoke test)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def experiment(argv=()):
    """`python ash.py experiment [--quick]`: the modes of Tables 1/5 x seeds at demo scale, resumable;
    writes <out>/experiment.json, results.md (mean +- std) and a source | stylized | prediction figure."""
    d = experiment_parser().parse_args(list(argv))
    if d.quick:
        d.iters, d.decoder_iters, d.encoder_iters = d.iters // 6, d.decoder_iters // 4, d.encoder_iters // 4
        d.out = d.out + "-quick" if d.out == "runs/ash-experiment" else d.out
    if d.threads:
        torch.set_num_threads(d.threads)
    segment.announce_demo("ash")
    out = Path(d.out)
    settings = {k: v for k, v in vars(d).items() if k not in ("out", "device", "threads", "modes", "noises")}
    settings["algorithm1"] = EXPERIMENT_VERSION         # runs of an older Algorithm 1 are not reused
    exp = segment.Experiment(out, "ASH (Tables 1, 5) on ToyCity: source -> unseen target", settings)
    adain_dir = out / "adain"
    exp.cell("adain", lambda: {"dir": str(demo_stylizer(d, adain_dir))})
    results, labels = {}, []
    for mode in d.modes:               # rows: (label, mode, noise); the noise only where the mode draws one
        noises = d.noises if mode in ("stylize+noise", "ash") else [None]
        labels += [(mode if len(noises) == 1 else f"{mode} ({noise})", mode, noise) for noise in noises]
    for seed in d.seeds:
        for label, mode, noise in labels:
            name = f"{mode.replace('+', '-')}{'-' + noise if noise else ''}-s{seed}"  # the noise in the cell name
            results[label, seed] = exp.cell(name, lambda: train(demo_args(d, mode, adain_dir, out, name, seed, "auto",
                                                                          noise)))
    rows = []
    for label, _, _ in labels:
        runs = [results[label, s] for s in d.seeds]
        rows.append((label, [[r[f"toycity-{dom}"][key] for r in runs]
                            for dom in ("target", "source") for key in ("miou19", "miou16", "miou13")]))
    exp.table(["mode", "target mIoU19", "target mIoU16", "target mIoU13",
               "source mIoU19", "source mIoU16", "source mIoU13"], rows,
              note=f"DeepLab-v2 ResNet-{d.depth} from scratch, {d.iters} iterations of batch {d.batch_size} at "
                   f"{d.size[0]}x{d.size[1]}, seeds {d.seeds}; target = ToyCity target val (never seen in training).")
    last = f"{d.iters:07d}.png"
    figure = out / "stylized.png"
    pictures = [out / f"{m}-s{d.seeds[0]}" / "images" / last for m in ("stylize", f"ash-{d.noises[0]}")]
    pictures = [p for p in pictures if p.is_file()]
    if pictures:
        data.write_image(figure, torch.cat([data.read_image(p) for p in pictures], 1))
        print(f"[experiment] wrote {figure} (rows: stylize, ash; each: source | stylized | prediction)")
    print(f"[experiment] {exp.seconds() / 60:.1f} min of runs; tables in {out / 'results.md'}", flush=True)
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] == "demo":
        return demo(argv[1:])
    if argv[0] == "experiment":
        return experiment(argv[1:])
    if argv[0] == "train-decoder":
        return train_decoder(decoder_parser().parse_args(argv[1:]))
    return train(parser().parse_args(argv))


if __name__ == "__main__":
    data.cli(main)
