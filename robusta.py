"""Robusta: a label-to-image GAN cascade and morphological label editing, in plain PyTorch.

Hariat et al., "Learning to generate training datasets for robust semantic segmentation"
(WACV 2024), supplementary material (papers/robusta_supplementary.md): Appendix A (networks and
losses), B.1 (Tables A2/A3), D (morphology), E.1.3 (spectral analysis), F.3 (Table A11).
In reading order:

1. Presets: `PRESETS` (Tables A2 and A3, one row per dataset).
2. Networks: `SPADE` (Eq. A6), `SPADEResBlock`, `GCoarse` (Table A1, Fig. A1; 3 blocks from
   Table A11), `GFine` (SRGAN on I_LR at 1/8 resolution, sized from Table A11),
   `PatchDiscriminator`, `MultiscaleDiscriminator`, `vgg19_features`, `VGGLoss` (Eq. A5).
3. Losses (pix2pixHD's bookkeeping): `gan_loss` (Eq. A1; Eq. A8 in "ls" mode; hinge; summed over
   D's scales), `discriminator_loss`, `feature_matching_loss` (Eq. A4: intermediate layers,
   1/num_D x 4/(n_layers+1)), `coarse_generator_loss` (Eq. A2, A3, A7), `fine_generator_loss` (Eq. A9).
4. Label morphology (Appendix D): `structuring_element`, `erode` (Eq. A10), `dilate` (Eq. A11),
   `opening`, `closing` on (N, C, H, W) tensors; `LABEL_TABLES`, `PRIORITIES` (per dataset),
   `dilate_labels`, `erode_labels` on label-id maps under the lexicographic order; `parse_edit`,
   `edit_labels` for "dilate:disk:5"-style edits, `parse_priority` for --priority.
5. Training (Sec. A.2): `gan_step` (D on real and generated pairs, then G), `optimizers`,
   `restore`, `check_vgg`, `train` - stage 1 G_coarse + D with L_coarse, stage 2 G_fine + D_fine
   with L_fine on I_LR, the frozen G_coarse's image downsampled (`low_resolution`).
6. Generation: `load_generators`, `render`, `paste_outliers`, `output_split` (no validation maps
   in a train split, Sec. F.4), `generate` (Cityscapes layout + manifest).
7. Evaluation: `evaluate_generators` (FID, mIoU of a segmenter on generated images, spectral
   distance), `profile` (Table A11); the command line (`main`: run | train | generate | evaluate |
   profile | edit) and `run_pipeline`, the default.
8. The seeded ToyCity experiment (`experiment`): image quality with / without the SegFormer branch
   and G_fine (Tables A5, A6), real vs real + generated training data on clean, corrupted and
   outlier splits (Table A10, F.2), the morphology sequence of Fig. A2.

Run:
    python robusta.py                                     # demo: the whole pipeline on ToyCity (CPU, minutes)
    python robusta.py --dataset cityscapes --data-root PATH --vgg vgg19-dcbb9e9d.pth --segmenter drn-d-105.pth
    python robusta.py train --dataset ade20k --data-root ADEChallengeData2016 --vgg vgg19-dcbb9e9d.pth --segformer b2
    python robusta.py edit --labels gtFine/train/aachen --edit dilate:disk:5:person,car --out edited/train
    python robusta.py generate --checkpoint runs/robusta/last.pt --dataset cityscapes --data-root PATH
           --edit dilate:disk:5 --out-root gen/       # train label maps -> gen/leftImg8bit/train/...
    python robusta.py evaluate --checkpoint runs/robusta/last.pt --dataset cityscapes --data-root PATH
           --segmenter drn-d-105.pth --inception pt_inception-2015-12-05-6726825d.pth  # val maps, DRN-D-105
    python robusta.py profile                             # parameters / mult-adds / memory beside Table A11
    python robusta.py experiment [--quick]                # Tables A5/A6/A10 + Fig. A2 on ToyCity, 3 seeds
    torchrun --nproc_per_node 4 robusta.py train ...      # DistributedDataParallel, same code
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
import segment

# ---------------------------------------------------------------------------------------------
# 1. Presets: Tables A2 (G_coarse) and A3 (G_fine), one row per dataset
# ---------------------------------------------------------------------------------------------
# Keys are the command line's option names (dest form); any option given on the command line
# overrides its preset value. Sizes are (H, W): Table A2's "512 x 256" for Cityscapes is W x H.
# "crop" None = no random crop. Epochs: 200 for G_coarse, 100 for G_fine in every column.
# label_nc: one-hot channels (35 Cityscapes ids as in pix2pixHD; 151 ADE20K; 183 COCO-Stuff).
# KAIST (infrared) is conditioned on Cityscapes-style label maps here (our choice). Network sizes
# are read off Table A11 (see `GCoarse`, `GFine`): 3 SPADE ResNet blocks in G_coarse (G_coarse + D
# then have Table A11's parameter count), G_fine at scale 8 (its body on I_LR at H/8), width 384,
# 6 blocks. lambda_L1 = 10 of Eq. (A3) is not in the tables: our choice.
_CITYSCAPES = dict(label_nc=35, segformer="b5", ngf=64, n_blocks=3, spade_hidden=128, ndf=64, fine_nf=384,
                   fine_blocks=6, fine_scale=8, lambda_l1=10.0, minutes=None, fine_minutes=None, lr=2e-4, batch_size=8,
                   size=(256, 512), weight_decay=1e-5,
                   epochs=200, crop=None, lambda_vgg=5.0, lambda_fm=5.0,
                   fine_lr=2e-4, fine_batch_size=8, fine_size=(256, 512), fine_weight_decay=0.0, fine_epochs=100,
                   fine_crop=None, fine_lambda_vgg=10.0, fine_lambda_fm=1.0)
PRESETS = {
    "cityscapes": _CITYSCAPES,  # Table A2 / A3, column Cityscapes
    "ade20k": dict(_CITYSCAPES, label_nc=151, batch_size=32, size=(286, 286), weight_decay=0.0, crop=(256, 256),
                   fine_batch_size=12, fine_size=(256, 256), fine_lambda_vgg=1.0, fine_lambda_fm=0.1),
    "ade20k-outdoors": dict(_CITYSCAPES, label_nc=151, batch_size=16, size=(256, 256), weight_decay=0.0,
                            fine_batch_size=12, fine_size=(256, 256)),
    "coco-stuff": dict(_CITYSCAPES, label_nc=183, segformer="b0", size=(286, 286), weight_decay=0.0, crop=(256, 256),
                       fine_batch_size=10, fine_size=(286, 286), fine_crop=(256, 256), fine_lambda_vgg=1.0),
    "kaist": dict(_CITYSCAPES, lr=1e-4, batch_size=32, size=(256, 256), weight_decay=0.0,
                  fine_batch_size=10, fine_size=(256, 256)),
    # Demo scale (not in the paper): ToyCity at 64 x 128, narrow networks, a wall-clock budget per
    # stage, a faster learning rate, and no L_VGG (no ImageNet VGG ships offline, and random VGG
    # features cost most of a CPU step; give --vgg PATH --lambda-vgg 5 --fine-lambda-vgg 10 to use it).
    "toycity": dict(_CITYSCAPES, segformer="b0", ngf=16, n_blocks=3, spade_hidden=32, ndf=16, fine_nf=16,
                    fine_blocks=2, fine_scale=2, lr=5e-4, batch_size=4, size=(64, 128), weight_decay=0.0,
                    epochs=100, minutes=6.0, lambda_vgg=0.0, fine_lr=5e-4, fine_batch_size=4, fine_size=(64, 128), fine_epochs=30,
                    fine_minutes=2.0, fine_lambda_vgg=0.0),
}
# Table A11 (Cityscapes, one input): generators + discriminators, forward/backward memory.
PAPER_COST = {"Robusta w/o G_fine": dict(gmacs=393.6, mparams=98.6, vram_gb=34),
              "G_fine": dict(gmacs=297.3, mparams=50.5, vram_gb=24)}

# ---------------------------------------------------------------------------------------------
# 2. Networks (Appendix A.1, A.3: Table A1, Fig. A1)
# ---------------------------------------------------------------------------------------------


class SPADE(nn.Module):
    """Spatially-adaptive denormalization (Park et al.; Eq. A6).

    A parameter-free BatchNorm (or InstanceNorm) normalises x; a shared 3x3 conv + ReLU on the
    label map (resized nearest to x) feeds two 3x3 convs giving gamma and beta per pixel:
    x_hat * (1 + gamma) + beta. Submodule names are SPADE's own (mlp_shared, mlp_gamma, mlp_beta).
    """

    def __init__(self, norm_nc, label_nc, norm="batch", hidden=128):
        super().__init__()
        if norm not in ("batch", "instance"):
            raise ValueError(f"SPADE norm must be 'batch' or 'instance', got {norm!r}")
        self.param_free_norm = (nn.BatchNorm2d(norm_nc, affine=False) if norm == "batch"
                                else nn.InstanceNorm2d(norm_nc, affine=False))
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)

    def forward(self, x, label):
        x_hat = self.param_free_norm(x)  # (a - mu) / sigma
        label = F.interpolate(label, size=x.shape[-2:], mode="nearest")
        actv = self.mlp_shared(label)
        return x_hat * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)  # Eq. (A6)


def norm_layer(channels, label_nc, spade, hidden):
    """SPADE (switch on) or the BatchNorm it replaces (switch off, Table A6)."""
    return SPADE(channels, label_nc, hidden=hidden) if spade else nn.BatchNorm2d(channels)


def normalize(layer, x, label):
    """Apply a `norm_layer`: SPADE reads the label map, the BatchNorm it replaces does not."""
    return layer(x, label) if isinstance(layer, SPADE) else layer(x)


def conv3x3(cin, cout):
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")


class SPADEResBlock(nn.Module):
    """Table A1 ResNet block: Conv3 - SPADE - ReLU - Conv3 - SPADE, plus the identity."""

    def __init__(self, dim, label_nc, spade=True, hidden=128):
        super().__init__()
        self.conv1, self.norm1 = conv3x3(dim, dim), norm_layer(dim, label_nc, spade, hidden)
        self.conv2, self.norm2 = conv3x3(dim, dim), norm_layer(dim, label_nc, spade, hidden)

    def forward(self, x, label):
        y = F.relu(normalize(self.norm1, self.conv1(x), label))
        return x + normalize(self.norm2, self.conv2(y), label)


def down_block(label_nc, ngf):
    """Table A1 downsampling block: Conv7(label_nc -> ngf)-BN-ReLU, Conv3 s2 (ngf -> 2 ngf)-BN-ReLU."""
    return nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(label_nc, ngf, 7), nn.BatchNorm2d(ngf), nn.ReLU(True),
                         nn.Conv2d(ngf, 2 * ngf, 3, stride=2, padding=1), nn.BatchNorm2d(2 * ngf), nn.ReLU(True))


class GCoarse(nn.Module):
    """The first generator of Robusta (Table A1, Fig. A1): one-hot label map -> image in [-1, 1].

    Two branches see the same one-hot input (N, label_nc, H, W) at the same resolution:
    the convolutional down block (-> 2 ngf = 128 channels at H/2) and a SegFormer (segment.py)
    whose all-MLP decoder features (embed_dim, H/4) go through a dense layer (per-pixel Linear),
    a bilinear resize to the latent resolution H/2 and SegFormer's fuse-conv (1x1 conv-BN-ReLU) to
    128 channels. Concatenated (256 channels), they pass n_blocks SPADE ResNet blocks,
    ConvTranspose s2 - SPADE - ReLU, and Conv3 - tanh. SPADE reads the one-hot label map.
    The paper does not give n_blocks; Table A11 implies it: with SegFormer-B5 and the 2-scale D at
    Cityscapes' 256 x 512, 3 blocks give 99.1 M parameters (Table A11: 98.6 M), pix2pixHD's 9 give
    113.8 M (each block adds 2 x (590 k conv + 630 k SPADE) = 2.4 M).

    Ablation switches (Table A6, A7): `segformer` None replaces the SegFormer branch by a second
    convolutional down block as in pix2pixHD (our reading of "SegFormer off"); `spade` False puts
    BatchNorm in place of every SPADE ("SPADE 1"); `segformer` "b0".."b5" picks its size.
    """

    def __init__(self, label_nc=35, ngf=64, n_blocks=3, segformer="b5", spade=True, spade_hidden=128):
        super().__init__()
        latent = 4 * ngf
        self.down = down_block(label_nc, ngf)  # (N, 2 ngf, H/2, W/2)
        if segformer:
            self.segformer = segment.SegFormer(segformer, num_classes=1, in_channels=label_nc)
            self.segformer.decode_head.linear_pred = nn.Identity()  # features only, no classifier
            dim = self.segformer.embed_dim
            self.dense = nn.Conv2d(dim, dim, 1)  # the dense layer, applied per pixel
            self.fuse = segment.ConvModule(dim, 2 * ngf)  # fuse-conv of Xie et al.
        else:
            self.segformer = None
            self.branch = down_block(label_nc, ngf)
        self.blocks = nn.ModuleList([SPADEResBlock(latent, label_nc, spade, spade_hidden) for _ in range(n_blocks)])
        self.up = nn.ConvTranspose2d(latent, 2 * ngf, 3, stride=2, padding=1, output_padding=1)
        self.up_norm = norm_layer(2 * ngf, label_nc, spade, spade_hidden)
        self.to_rgb = conv3x3(2 * ngf, 3)

    def forward(self, label):  # label: (N, label_nc, H, W) one-hot
        x = self.down(label)  # (N, 128, H/2, W/2)
        if self.segformer is not None:
            t = self.dense(self.segformer.features(label))  # (N, embed_dim, H/4, W/4)
            t = F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False)
            t = self.fuse(t)  # (N, 128, H/2, W/2)
        else:
            t = self.branch(label)
        x = torch.cat([x, t], 1)  # (N, 256, H/2, W/2)
        for block in self.blocks:
            x = block(x, label)
        x = self.up(x)  # (N, 128, H, W)
        x = F.relu(normalize(self.up_norm, x, label))
        return torch.tanh(self.to_rgb(x))  # (N, 3, H, W) in [-1, 1]


class SRBlock(nn.Module):
    """SRGAN residual block: Conv3 - norm - PReLU - Conv3 - norm, plus the identity (norm: SPADE or BN)."""

    def __init__(self, nf, label_nc, spade, hidden):
        super().__init__()
        self.conv1, self.norm1 = conv3x3(nf, nf), norm_layer(nf, label_nc, spade, hidden)
        self.act = nn.PReLU()
        self.conv2, self.norm2 = conv3x3(nf, nf), norm_layer(nf, label_nc, spade, hidden)

    def forward(self, x, label):
        y = self.act(normalize(self.norm1, self.conv1(x), label))
        return x + normalize(self.norm2, self.conv2(y), label)


class GFine(nn.Module):
    """The second generator: SRGAN on I_LR (Sec. A.2), conditioned on the label map by SPADE.

    Input: I_LR, G_coarse's image downsampled by `scale` (N, 3, H/s, W/s), and the label map
    (N, label_nc, H, W). Conv9 - PReLU, n_blocks residual blocks, Conv3 - norm plus a long skip,
    all at H/s; then one (Conv3 -> 4 nf, PixelShuffle 2, PReLU) per factor 2 of `scale`, and
    Conv9 -> 3 at (H, W). The output is the bicubically upsampled I_LR plus this residual, clamped
    to [-1, 1] (our choice: G_fine learns what the reduction lost). `spade` ("SPADE 2", Table A6)
    puts SPADE on the label map in place of SRGAN's BatchNorm.

    Size (Table A11, G_fine + D_fine: 50.5 M parameters, 297.3 GMACs on one 256 x 512 input under
    torchinfo's count): the paper gives no architecture, so scale / width / depth are read off
    these two figures. At full resolution (scale 1) any width that reaches 50 M parameters costs
    ~ 50 M x 131 k positions = 6.6 TMACs, 20 times too many; the figures are reachable only if the
    body runs at reduced resolution, as SRGAN's does on I_LR. With scale 8 (the body at 32 x 64),
    width 384 and 6 blocks, the three upsampling convs carry most mult-adds (at 32 x 64, 64 x 128,
    128 x 256) and the body + SPADE most parameters: `python robusta.py profile` prints the
    figures beside Table A11 (both within 10%). SRGAN's own 16 blocks of width 64 at scale 4 have
    1.5 M parameters.
    """

    def __init__(self, label_nc=35, nf=64, n_blocks=16, scale=1, spade=True, spade_hidden=128):
        super().__init__()
        if scale not in (1, 2, 4, 8):
            raise ValueError(f"GFine scale must be 1, 2, 4 or 8, got {scale}")
        self.scale = scale
        self.head = nn.Sequential(nn.Conv2d(3, nf, 9, padding=4), nn.PReLU())
        self.blocks = nn.ModuleList([SRBlock(nf, label_nc, spade, spade_hidden) for _ in range(n_blocks)])
        self.body_conv, self.body_norm = conv3x3(nf, nf), norm_layer(nf, label_nc, spade, spade_hidden)
        self.upsample = nn.Sequential(*[m for _ in range(scale.bit_length() - 1)
                                        for m in (conv3x3(nf, 4 * nf), nn.PixelShuffle(2), nn.PReLU())])
        self.tail = nn.Conv2d(nf, 3, 9, padding=4)

    def forward(self, image, label):  # image: I_LR (N, 3, H/s, W/s) in [-1, 1]; label (N, label_nc, H, W)
        x = self.head(image)  # (N, nf, H/s, W/s)
        y = x
        for block in self.blocks:
            y = block(y, label)
        y = self.body_conv(y)
        y = x + normalize(self.body_norm, y, label)
        residual = self.tail(self.upsample(y))  # (N, 3, H, W)
        if self.scale > 1:
            image = F.interpolate(image, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return (image + residual).clamp(-1, 1)


class PatchDiscriminator(nn.Module):
    """pix2pixHD's PatchGAN (n_layers 3): 4x4 convs ndf-2ndf-4ndf (stride 2), 8ndf (stride 1), 1;
    InstanceNorm, LeakyReLU 0.2. Returns the output of every layer (the last = patch logits)."""

    def __init__(self, in_nc, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(in_nc, ndf, 4, 2, 2), nn.LeakyReLU(0.2, True))]
        nf = ndf
        for n in range(1, n_layers + 1):
            prev, nf = nf, min(nf * 2, 512)
            layers.append(nn.Sequential(nn.Conv2d(prev, nf, 4, 2 if n < n_layers else 1, 2),
                                        nn.InstanceNorm2d(nf), nn.LeakyReLU(0.2, True)))
        layers.append(nn.Sequential(nn.Conv2d(nf, 1, 4, 1, 2)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """`num_d` PatchGANs on the (label, image) pair at full and 1/2, 1/4... resolution (pix2pixHD).

    forward(label, image) -> [per scale: [per layer: features]], the last of each = patch logits.
    """

    def __init__(self, label_nc=35, ndf=64, n_layers=3, num_d=2):
        super().__init__()
        self.scales = nn.ModuleList([PatchDiscriminator(label_nc + 3, ndf, n_layers) for _ in range(num_d)])

    def forward(self, label, image):
        x = torch.cat([F.interpolate(label, size=image.shape[-2:], mode="nearest"), image], 1)
        outputs = []
        for i, d in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            outputs.append(d(x))
        return outputs


# torchvision's vgg19 "E" configuration up to relu5_1 (indices 0..29 of vgg19().features)
VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512]
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"


def vgg19_features():
    """torchvision's vgg19().features[:30] as an nn.Sequential with the same indices (so the
    `features.N.*` entries of the ImageNet checkpoint load), built without the classifier."""
    layers, cin = [], 3
    for v in VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


class VGGLoss(nn.Module):
    """Perceptual loss (Eq. A5): sum_i w_i * mean |F_i(x) - F_i(G(y))| over relu1_1..relu5_1 of VGG19,
    weights 1/32, 1/16, 1/8, 1/4, 1 (pix2pixHD). Images in [0, 1], ImageNet-normalised inside.

    weights: path of torchvision's vgg19 ImageNet checkpoint (vgg19-dcbb9e9d.pth); None keeps
    random features (and says so), which still constrains structure but is not the paper's loss.
    """

    LAYERS = (1, 6, 11, 20, 29)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
    LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)

    def __init__(self, weights=None):
        super().__init__()
        self.features = vgg19_features()
        if weights:
            path = Path(weights)
            if not path.is_file():
                raise data.MissingFile(f"--vgg {path}: no file there; torchvision's VGG19 ImageNet checkpoint "
                                        f"is published at {VGG19_URL}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k[len("features."):]: v for k, v in state.items()
                     if k.startswith("features.") and int(k.split(".")[1]) < len(self.features)}
            self.features.load_state_dict(state)
        else:
            print("VGGLoss: no --vgg checkpoint given, the perceptual loss (Eq. A5) uses random VGG19 features "
                  f"(ImageNet weights: {VGG19_URL})", flush=True)
        self.features.requires_grad_(False)
        self.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):  # the VGG stays in eval mode
        return super().train(False)

    def forward(self, fake, real):
        x, y = (fake - self.mean) / self.std, (real - self.mean) / self.std
        loss = 0.0
        weights = dict(zip(self.LAYERS, self.LAYER_WEIGHTS))
        for i, layer in enumerate(self.features):
            x = layer(x)
            with torch.no_grad():
                y = layer(y)
            if i in weights:
                loss = loss + weights[i] * F.l1_loss(x, y)  # Eq. (A5): (1 / M_i) || . ||_1
        return loss


# ---------------------------------------------------------------------------------------------
# 3. Losses (Appendix A.1, A.2)
# ---------------------------------------------------------------------------------------------


def gan_loss(outputs, real, mode="ls", for_discriminator=True):
    """Adversarial loss of a MultiscaleDiscriminator, summed over its scales (pix2pixHD's GANLoss).

    Each scale's patch logits D(.) are compared with the target of `real` (1 or 0), mean over patches:
    mode "original": Eq. (A1) as binary cross-entropy, -log D(x) / -log(1 - D(G(y))) (the
    generator uses the non-saturating -log D(G(y))); "ls": least squares, Eq. (A8), (1 - D)^2 / D^2
    (pix2pixHD's default, and SRGAN's choice for G_fine); "hinge": SPADE's hinge loss.
    """
    loss = 0.0
    for feats in outputs:
        logits = feats[-1].float()
        if mode == "original":
            loss = loss + F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)))  # Eq. (A1)
        elif mode == "ls":
            loss = loss + F.mse_loss(logits, torch.full_like(logits, float(real)))  # Eq. (A8)
        elif mode == "hinge" and not for_discriminator:
            loss = loss - logits.mean()
        elif mode == "hinge":
            loss = loss + F.relu(1 - logits if real else 1 + logits).mean()
        else:
            raise ValueError(f"unknown GAN mode {mode!r}: original, ls or hinge")
    return loss


def discriminator_loss(d_real, d_fake, mode):
    """The discriminator's side of Eq. (A1) / (A8): real pairs -> 1, generated pairs -> 0, halved
    (pix2pixHD). Both halves must carry D's graph: the real term is what teaches D what real is."""
    return 0.5 * (gan_loss(d_real, True, mode) + gan_loss(d_fake, False, mode))


def feature_matching_loss(d_fake, d_real, n_layers=3):
    """Eq. (A4) with pix2pixHD's bookkeeping: for every scale k and every intermediate layer i of D_k
    (not the final patch logits), (1 / N_i) ||D_k^(i)(x) - D_k^(i)(G(y))||_1 (a mean), each term
    weighted 1 / num_D x 4 / (n_layers + 1); the real features are targets (no gradient).
    With n_layers 3 (4 intermediate layers) the total is the mean over scales of the per-layer sum,
    so lambda_FM of Tables A2/A3 multiplies exactly what it multiplied in pix2pixHD."""
    weight = 1.0 / len(d_fake) * 4.0 / (n_layers + 1)
    loss = 0.0
    for fake_feats, real_feats in zip(d_fake, d_real):
        for f, r in zip(fake_feats[:-1], real_feats[:-1]):
            loss = loss + weight * F.l1_loss(f.float(), r.detach().float())  # Eq. (A4)
    return loss


def coarse_generator_loss(d_fake, d_real, fake, real, vgg, args):
    """L_coarse (Eq. A7) = L_pix2pix (Eq. A3: cGAN A1 + lambda_L1 * L1 A2) + lambda_FM L_FM + lambda_VGG L_VGG.
    fake, real: images in [-1, 1]; L_VGG is skipped when its lambda is 0. Returns (total, dict of the parts)."""
    parts = {"gan": gan_loss(d_fake, True, args.gan_mode, for_discriminator=False),
             "l1": F.l1_loss(fake, real),  # Eq. (A2)
             "fm": feature_matching_loss(d_fake, d_real),
             "vgg": vgg(fake * 0.5 + 0.5, real * 0.5 + 0.5) if args.lambda_vgg > 0 else 0.0}
    pix2pix = parts["gan"] + args.lambda_l1 * parts["l1"]  # Eq. (A3)
    return pix2pix + args.lambda_fm * parts["fm"] + args.lambda_vgg * parts["vgg"], parts  # Eq. (A7)


def fine_generator_loss(d_fake, d_real, fake, real, vgg, args):
    """L_fine (Eq. A9) = L_cGAN^MSE (Eq. A8) + lambda_FM L_FM + lambda_VGG L_VGG, with Table A3's lambdas."""
    parts = {"gan": gan_loss(d_fake, True, "ls", for_discriminator=False),  # Eq. (A8)
             "fm": feature_matching_loss(d_fake, d_real),
             "vgg": vgg(fake * 0.5 + 0.5, real * 0.5 + 0.5) if args.fine_lambda_vgg > 0 else 0.0}
    return parts["gan"] + args.fine_lambda_fm * parts["fm"] + args.fine_lambda_vgg * parts["vgg"], parts  # Eq. (A9)


# ---------------------------------------------------------------------------------------------
# 4. Label morphology (Appendix D)
# ---------------------------------------------------------------------------------------------


def structuring_element(shape, size=None):
    """A flat structuring element: a boolean (h, w) tensor whose origin is the pixel (h // 2, w // 2).

    shape: "square" (size k: k x k), "rectangle" (size (h, w)), "cross" (size k: the plus sign of
    width 1 inside a k x k square), "disk" (size r: the pixels within Euclidean distance r of the
    origin, (2r + 1, 2r + 1)), or any boolean kernel (tensor, nested lists, array) used as is.
    """
    if not isinstance(shape, str):
        se = torch.as_tensor(shape).bool()
        if se.dim() != 2 or not se.any():
            raise data.BadInput(f"a structuring element must be a non-empty 2-D boolean kernel, got {tuple(se.shape)}")
        return se
    if shape == "square":
        return torch.ones(size, size, dtype=torch.bool)
    if shape == "rectangle":
        h, w = size
        return torch.ones(h, w, dtype=torch.bool)
    if shape == "cross":
        se = torch.zeros(size, size, dtype=torch.bool)
        se[size // 2, :] = True
        se[:, size // 2] = True
        return se
    if shape == "disk":
        d = torch.arange(-size, size + 1)
        return d[:, None] ** 2 + d[None, :] ** 2 <= size ** 2
    raise data.BadInput(f"unknown structuring element {shape!r}: square, rectangle, cross, disk or a boolean kernel")


def _window(x, length, dim, op, powers):
    """y[k] = op(x[k], ..., x[k + length - 1]) along `dim`, from cached windows of length 2^j.

    `powers` maps 2^j -> that window (powers[1] = x) and is shared between calls on the same
    tensor (the doubling trick: about log2(length) elementwise ops). For max/min two overlapping
    windows of 2^j suffice; for a sum the binary decomposition of `length` is used instead.
    """
    span = 1
    while 2 * span <= length:
        if 2 * span not in powers:
            y = powers[span]
            n = y.size(dim) - span
            powers[2 * span] = op(y.narrow(dim, 0, n), y.narrow(dim, span, n))
        span *= 2
    if op is not torch.add:
        y, rest = powers[span], length - span
        n = y.size(dim) - rest
        return y if rest == 0 else op(y.narrow(dim, 0, n), y.narrow(dim, rest, n))
    n = powers[1].size(dim) - length + 1
    parts, offset = [], 0
    while offset < length:  # length = span_1 + span_2 + ... (binary digits, largest first)
        while span > length - offset:
            span //= 2
        parts.append(powers[span].narrow(dim, offset, n))
        offset += span
    return _combine(parts, op)


def _combine(parts, op):
    """op over a list of equally shaped tensors, writing into one new tensor (inputs untouched)."""
    if len(parts) == 1:
        return parts[0]
    out = op(parts[0], parts[1])
    for part in parts[2:]:
        op(out, part, out=out)
    return out


def _rectangles(se):
    """Split a boolean kernel into disjoint rectangles (top, left, height, width): each kernel row
    into runs of consecutive True entries, identical consecutive rows merged."""
    rows = []
    for row in se.tolist():
        runs, j = [], 0
        while j < len(row):
            if row[j]:
                start = j
                while j < len(row) and row[j]:
                    j += 1
                runs.append((start, j - start))
            j += 1
        rows.append(tuple(runs))
    rectangles, i = [], 0
    while i < len(rows):
        height = 1
        while i + height < len(rows) and rows[i + height] == rows[i]:
            height += 1
        rectangles += [(i, start, height, width) for start, width in rows[i]]
        i += height
    return rectangles


def _flat_filter(x, se, origin, op, fill):
    """out(p) = op over (i, j) in se of x(p + (i - origin[0], j - origin[1])); outside the image = fill.

    x: (N, C, H, W) of any dtype. Vectorized and separable: the kernel is split into rectangles,
    each a horizontal window then a vertical window, both computed by doubling and shared between
    rectangles. A rectangle costs about log2(h) + log2(w) elementwise ops, a radius-7 disk about 30.
    """
    kh, kw = se.shape
    ci, cj = origin
    h, w = x.shape[-2:]
    xp = F.pad(x, (cj, kw - 1 - cj, ci, kh - 1 - ci), value=fill)
    horizontal, lines, vertical = {1: xp}, {}, {}
    pieces = []
    for top, left, height, width in _rectangles(se):
        if width not in lines:
            lines[width] = _window(xp, width, -1, op, horizontal)
            vertical[width] = {1: lines[width]}
        block = _window(lines[width], height, -2, op, vertical[width])
        pieces.append(block[..., top:top + h, left:left + w])
    out = _combine(pieces, op)
    return out if len(pieces) > 1 else out.contiguous()


def _extremes(dtype):
    if dtype.is_floating_point:
        return float("-inf"), float("inf")
    info = torch.iinfo(dtype)
    return info.min, info.max


def dilate(x, se):
    """Grey-level dilation with a flat element (Eq. A11): delta(x)(p) = max_{h in B} x(p - h).

    x: (N, C, H, W); se: boolean (kh, kw), origin (kh // 2, kw // 2). Pixels outside the image
    count as -inf (so borders do not grow). Flat element: b(h) = 0 on B.
    """
    se = structuring_element(se).to(x.device)
    kh, kw = se.shape
    reflected = se.flip(0, 1)  # max over x(p - h) = max over x(p + h') with h' in -B
    low, _ = _extremes(x.dtype)
    return _flat_filter(x, reflected, (kh - 1 - kh // 2, kw - 1 - kw // 2), torch.maximum, low)  # Eq. (A11)


def erode(x, se):
    """Grey-level erosion with a flat element (Eq. A10): epsilon(x)(p) = min_{h in B} x(p + h).

    Eq. (A10) as printed reads x(p - h); that is the same for the symmetric elements the paper
    uses (disks, squares). We use Serra's x(p + h) (our choice) so that erosion and dilation form
    an adjunction (dilate(x) <= y iff x <= erode(y)) and erode(x) = -dilate(-x) with the reflected
    element, whatever the element. Pixels outside the image count as +inf.
    """
    se = structuring_element(se).to(x.device)
    kh, kw = se.shape
    _, high = _extremes(x.dtype)
    return _flat_filter(x, se, (kh // 2, kw // 2), torch.minimum, high)  # Eq. (A10)


def opening(x, se):
    """Morphological opening: dilation of the erosion (anti-extensive, idempotent)."""
    return dilate(erode(x, se), se)


def closing(x, se):
    """Morphological closing: erosion of the dilation (extensive, idempotent)."""
    return erode(dilate(x, se), se)


# Class names per label id of each dataset, for the lexicographic order and for edits restricted to
# classes: Cityscapes (data.LABELS, ids 0..33 and -1), ADE20K (SceneParsing's objectInfo150, ids
# 1..150, 0 = "other") and COCO-Stuff (the stuffthingmaps values: 0..90 things incl. the 11 unused
# ids, 91..181 stuff, 182 = unlabeled as data.CocoStuff encodes it).
ADE20K_NAMES = ("other", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
                "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
                "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
                "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
                "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
                "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
                "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
                "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
                "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
                "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
                "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
                "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
                "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
                "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
                "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
                "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")
COCO_STUFF_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana",
    "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "mirror", "dining table", "window", "desk", "toilet", "door", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "blender", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",  # things: ids 0..90
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower",
    "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",
    "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete",
    "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",  # stuff: ids 91..181
    "unlabeled")
COCO_STUFF_THINGS = 91  # ids 0..90
LABEL_TABLES = {"cityscapes": {label.name: label.id for label in data.LABELS},
                "ade20k": {name: i for i, name in enumerate(ADE20K_NAMES)},
                "coco-stuff": {name: i for i, name in enumerate(COCO_STUFF_NAMES)}}
TABLE_OF = {"cityscapes": "cityscapes", "toycity": "cityscapes", "kaist": "cityscapes", "ade20k": "ade20k",
            "ade20k-outdoors": "ade20k", "coco-stuff": "coco-stuff"}  # preset -> its label table

# The lexicographic order of Appendix D: stuff (every class not listed) is the smallest element;
# listed classes rank from the highest (first) to the lowest (last); classes of one entry share a
# rank and are ordered among themselves by label id (our choice: a total order is needed).
# Cityscapes, the paper's order: traffic sign > traffic light > person > car > cycle > truck > train;
# we add rider beside person and bus, caravan, trailer beside truck (our choice).
PRIORITY = (("traffic sign",), ("traffic light",), ("person", "rider"), ("car",),
            ("bicycle", "motorcycle"), ("truck", "bus", "caravan", "trailer"), ("train",))
# ADE20K and COCO-Stuff (our choice; the paper gives Cityscapes' order only): the same order with
# each dataset's names (small objects first); for COCO-Stuff every other thing class then shares
# the lowest object rank, so that things rank above stuff. Any order: --priority.
PRIORITIES = {
    "cityscapes": PRIORITY,
    "ade20k": (("signboard",), ("traffic light",), ("person",), ("car", "van"), ("bicycle", "minibike"),
               ("truck", "bus")),
    "coco-stuff": (("stop sign", "street sign"), ("traffic light",), ("person",), ("car",), ("bicycle", "motorcycle"),
                   ("truck", "bus"), ("train",),
                   tuple(n for n in COCO_STUFF_NAMES[:COCO_STUFF_THINGS] if n not in (
                       "stop sign", "street sign", "traffic light", "person", "car", "bicycle", "motorcycle", "truck",
                       "bus", "train")))}


def parse_priority(text):
    """'traffic sign,person+rider,car' -> (("traffic sign",), ("person", "rider"), ("car",)):
    highest rank first, '+' joins the classes of one rank; names of the dataset's table, or ids."""
    return tuple(tuple(c.strip() for c in entry.split("+")) for entry in text.split(",") if entry.strip())


def _label_id(name_or_id, dataset="cityscapes"):
    """A class name of `dataset`'s label table (or an id, int or digits) -> its label id."""
    if isinstance(name_or_id, int) or str(name_or_id).isdigit():
        return int(name_or_id)
    table = LABEL_TABLES[TABLE_OF.get(dataset, dataset)]
    if name_or_id not in table:
        raise data.BadInput(f"unknown {TABLE_OF.get(dataset, dataset)} label {name_or_id!r}; names are those of "
                            f"robusta.LABEL_TABLES[{TABLE_OF.get(dataset, dataset)!r}] (or give label ids)")
    return table[name_or_id]


def lexicographic_codes(priority=None, device="cpu", dataset="cityscapes"):
    """The order of Appendix D as a table: (code (256,) uint8 from label id, ids (K+1,) int64 from code).

    Code 0 = every stuff id; the K ranked ids get codes 1..K, increasing with rank, so that
    max/min of codes realise sup/inf of the lexicographic order. `priority`: highest first, a list
    of class names (of `dataset`'s label table) or ids or tuples of them (one rank); default the
    dataset's `PRIORITIES` entry.
    """
    entries = PRIORITIES[TABLE_OF.get(dataset, dataset)] if priority is None else priority
    ranked = []
    for entry in reversed(list(entries)):  # lowest rank first
        group = entry if isinstance(entry, (tuple, list)) else (entry,)
        ranked += sorted(_label_id(c, dataset) for c in group)
    if len(set(ranked)) != len(ranked) or len(ranked) > 254:
        raise data.BadInput(f"priority lists a class twice or more than 254 classes: {entries}")
    code = torch.zeros(256, dtype=torch.uint8, device=device)
    ranks = torch.arange(1, len(ranked) + 1, device=device).to(torch.uint8)
    code[torch.tensor(ranked, dtype=torch.long, device=device)] = ranks
    ids = torch.tensor([0] + ranked, dtype=torch.long, device=device)
    return code, ids


def _chosen(labels, classes, dataset):
    """Boolean mask of the pixels whose class is among `classes` (names or ids)."""
    return torch.isin(labels, torch.tensor([_label_id(c, dataset) for c in classes], device=labels.device))


def dilate_labels(labels, se, priority=None, classes=None, dataset="cityscapes"):
    """Dilation of a label-id map (N, H, W) under the lexicographic order (Appendix D, Eq. A11).

    Each pixel takes the highest-ranked class in its window (-B, Eq. A11); stuff never grows, so
    a stuff pixel changes only where an object grows over it. With `classes`, only those classes
    grow (over stuff and lower-ranked objects).
    """
    code, ids = lexicographic_codes(priority, labels.device, dataset)
    codes = code.take(labels)  # (N, H, W) uint8
    growing = codes if classes is None else torch.where(_chosen(labels, classes, dataset), codes, 0)
    grown = dilate(growing[:, None], se)[:, 0]  # Eq. (A11) on the codes
    changed = grown > codes
    out = labels.clone()
    out[changed] = ids[grown[changed].long()]
    return out


def erode_labels(labels, se, priority=None, classes=None, dataset="cityscapes"):
    """Erosion of a label-id map (N, H, W) under the lexicographic order (Appendix D, Eq. A10).

    An object pixel whose window (B) holds a lower-ranked pixel is freed and takes the infimum of
    its window: a lower-ranked object class, or, when the infimum is stuff, the most frequent stuff
    label in the window (our choice; ties go to the smaller id). With `classes`, only those classes
    shrink. The image border does not erode (outside = +inf).
    """
    code, ids = lexicographic_codes(priority, labels.device, dataset)
    codes = code.take(labels)  # (N, H, W) uint8
    shrunk = erode(codes[:, None], se)[:, 0]  # Eq. (A10) on the codes
    freed = shrunk < codes
    if classes is not None:
        freed &= _chosen(labels, classes, dataset)
    out = labels.clone()
    out[freed] = ids[shrunk[freed].long()]
    to_stuff = freed & (shrunk == 0)
    if to_stuff.any():
        out[to_stuff] = _window_mode(labels, structuring_element(se), to_stuff, codes == 0)
    return out


def _window_mode(labels, se, where, valid):
    """The most frequent valid label in the window p + B of each pixel p of `where` -> (P,) int64.

    Window counts of each candidate label are box sums over the element (`_flat_filter` with +,
    in uint8 when |B| < 256) over the bounding box of the P pixels and their windows, read at the P
    pixels. Ties go to the smaller id.
    """
    kh, kw = se.shape
    rows, cols = where.any(0).any(1).nonzero()[:, 0], where.any(0).any(0).nonzero()[:, 0]
    y0, y1 = max(int(rows.min()) - kh // 2, 0), int(rows.max()) + kh - kh // 2
    x0, x1 = max(int(cols.min()) - kw // 2, 0), int(cols.max()) + kw - kw // 2
    labels, where, valid = (t[:, y0:y1, x0:x1] for t in (labels, where, valid))
    present = torch.zeros(256, dtype=torch.bool, device=labels.device)
    present[labels[valid]] = True
    present = present.nonzero()[:, 0]  # (S,) the candidate labels
    dtype = torch.uint8 if se.sum() < 256 else torch.int32
    compact = torch.full((256,), len(present), dtype=torch.uint8, device=labels.device)
    compact[present] = torch.arange(len(present), device=labels.device).to(torch.uint8)
    index = torch.where(valid, compact.take(labels), len(present))  # (N, H, W): candidate index, S = none
    hits = (index == torch.arange(len(present), device=labels.device).view(-1, 1, 1, 1)).to(dtype)  # (S, N, H, W)
    counts = _flat_filter(hits, se, (kh // 2, kw // 2), torch.add, 0)
    return present[counts[:, where].argmax(0)]


def parse_edit(text):
    """'dilate:disk:5', 'erode:square:7', 'open:rectangle:5x9', 'close:cross:3:person,car' -> dict.

    Fields: operation (dilate, erode, open, close), element shape, size (an int, or HxW for a
    rectangle), and optionally the comma-separated classes the edit is restricted to.
    """
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] not in ("dilate", "erode", "open", "close"):
        raise data.BadInput(f"bad edit {text!r}: expected OP:SHAPE:SIZE[:CLASS,CLASS], "
                            "OP in dilate, erode, open, close")
    size = tuple(int(s) for s in parts[2].split("x")) if "x" in parts[2] else int(parts[2])
    classes = parts[3].split(",") if len(parts) == 4 else None
    return {"op": parts[0], "shape": parts[1], "size": size, "classes": classes}


def edit_labels(labels, edit, priority=None, dataset="cityscapes"):
    """Apply one parsed (or textual) morphological edit to a label-id map (N, H, W) of `dataset`
    (its label table names the classes; its `PRIORITIES` entry is the default order)."""
    edit = parse_edit(edit) if isinstance(edit, str) else edit
    se = structuring_element(edit["shape"], edit["size"])
    steps = {"dilate": [dilate_labels], "erode": [erode_labels], "open": [erode_labels, dilate_labels],
             "close": [dilate_labels, erode_labels]}[edit["op"]]
    for step in steps:
        labels = step(labels, se, priority, edit["classes"], dataset)
    return labels


# ---------------------------------------------------------------------------------------------
# 5. Training (Appendix A.2): stage 1 G_coarse + D (Eq. A7), stage 2 G_fine + D_fine (Eq. A9)
# ---------------------------------------------------------------------------------------------

# --dataset -> data.py reader; ToyCity is a Cityscapes tree (its "source" domain). ADE20K-outdoors
# is read as an ADE20K root holding only the outdoor subset (as SPADE distributes it).
DATASETS = {"toycity": "Cityscapes", "cityscapes": "Cityscapes", "ade20k": "ADE20K", "ade20k-outdoors": "ADE20K",
            "coco-stuff": "CocoStuff"}


def build_networks(args):
    """(G_coarse, D, G_fine or None, D_fine or None) from the options (Table A1, Table A6 switches)."""
    g_coarse = GCoarse(args.label_nc, args.ngf, args.n_blocks, None if args.segformer == "none" else args.segformer,
                       not args.no_spade, args.spade_hidden)
    d = MultiscaleDiscriminator(args.label_nc, args.ndf, num_d=args.num_d)
    if args.no_fine:
        return g_coarse, d, None, None
    g_fine = GFine(args.label_nc, args.fine_nf, args.fine_blocks, args.fine_scale, not args.no_spade_fine,
                   args.spade_hidden)
    return g_coarse, d, g_fine, MultiscaleDiscriminator(args.label_nc, args.ndf, num_d=args.num_d)


def image_dataset(args, split, size, crop=None, augment=None):
    """The paired (image, label ids) dataset of args.dataset at `size`; with `augment` (default: for
    the train split) randomly cropped to `crop` and flipped."""
    if args.dataset == "kaist":
        raise data.BadInput("KAIST has no reader in data.py: the kaist preset serves `profile` only")
    cls = getattr(data, DATASETS[args.dataset])
    if args.dataset == "toycity":
        root = Path(args.data_root) if args.data_root else data.toycity() / "source"
    elif args.data_root is None:
        raise data.BadInput(f"--data-root is required for --dataset {args.dataset}")
    else:
        root = Path(args.data_root)
    transform = None
    if split == "train" if augment is None else augment:
        transform = data.Compose(([data.RandomScaleCrop(tuple(crop), scale=(1.0, 1.0))] if crop else [])
                                 + [data.RandomFlip()])
    return cls(root, split, size=tuple(size), transform=transform)


def linear_decay(base_lr, step, total):
    """pix2pixHD's schedule (our choice, the paper gives only the rate): constant for the first
    half of training, then linearly to 0."""
    return base_lr * min(1.0, 2.0 * (total - step) / max(1, total))


def adam(model, lr, weight_decay, args):
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(args.beta1, 0.999), weight_decay=weight_decay)


def optimizers(nets, args):
    """One Adam per network (Tables A2/A3: lr, weight decay per stage): opt_g / opt_d over G_coarse /
    D, opt_gf / opt_df over G_fine / D_fine."""
    opts = {"opt_g": adam(nets["g_coarse"], args.lr, args.weight_decay, args),
            "opt_d": adam(nets["d"], args.lr, args.weight_decay, args)}
    if nets["g_fine"] is not None:
        opts.update(opt_gf=adam(nets["g_fine"], args.fine_lr, args.fine_weight_decay, args),
                    opt_df=adam(nets["d_fine"], args.fine_lr, args.fine_weight_decay, args))
    return opts


def gan_step(run, g, d, opt_g, opt_d, label, inputs, real, generator_loss, mode, vgg, args):
    """One alternating update: D on real and generated pairs (Eq. A1 or A8), then G on its loss
    (Eq. A7 or A9).

    D step: one pass over [generated (detached), real] pairs; both halves keep D's graph, so the
    real term (target 1) and the generated term (target 0) both train D. G step: the updated D
    scores the generated pairs (with G's graph) and, without gradient, the real pairs, whose
    intermediate features are the feature-matching targets of Eq. (A4): both from the same D.
    """
    n = real.shape[0]
    with run.autocast():
        fake = g(*inputs)
        outputs = d(torch.cat([label, label]), torch.cat([fake.detach(), real]))
        d_fake = [[f[:n] for f in feats] for feats in outputs]
        d_real = [[f[n:] for f in feats] for feats in outputs]
        loss_d = discriminator_loss(d_real, d_fake, mode)  # Eq. (A1) / (A8), D's side
    opt_d.zero_grad(set_to_none=True)
    run.scaler.scale(loss_d).backward()
    run.scaler.step(opt_d)
    with run.autocast():
        with torch.no_grad():
            d_real = d(label, real)  # targets of Eq. (A4), from the updated D
        loss_g, parts = generator_loss(d(label, fake), d_real, fake.float(), real, vgg, args)
    opt_g.zero_grad(set_to_none=True)
    run.scaler.scale(loss_g).backward()
    run.scaler.step(opt_g)
    run.scaler.update()
    return fake.detach(), {"loss_g": loss_g.detach(), "loss_d": loss_d.detach(),
                           **{k: v.detach() for k, v in parts.items() if torch.is_tensor(v)}}


def checkpoint_state(run, nets, opts, stage, step, total, offset, args):
    """Everything a resumed run needs; "step" counts both stages (log.jsonl's x axis)."""
    state = {"stage": stage, "stage_step": step, "total": total, "offset": offset, "step": offset + step,
             "scaler": run.scaler.state_dict(), "rng": run.rng_state(), "args": segment.jsonable(args)}
    state.update({k: segment.unwrap(v).state_dict() for k, v in nets.items() if v is not None})
    state.update({k: v.state_dict() for k, v in opts.items() if v is not None})
    return state


@torch.no_grad()
def sample_rows(g_coarse, g_fine, samples, args, device):
    """Picture rows label | real | coarse | fine for a few fixed samples."""
    rows = []
    for sample in samples:
        ids = sample["label_ids"][None].to(device)
        coarse, fine = render(g_coarse, g_fine, ids, args.label_nc)
        colour = data.colorize(ids[0], kind="id").permute(2, 0, 1).float() / 255 if args.label_nc == data.NUM_IDS \
            else (ids[0] / max(1, args.label_nc - 1)).expand(3, -1, -1)
        rows.append([colour, sample["image"]] + [x[0] for x in (coarse, fine) if x is not None])
    return rows


def write_pictures(run, g_coarse, g_fine, samples, args, tag):
    """Save the epoch's grid (label | real | coarse | fine) and refresh index.html."""
    modes = [(m, m.training) for m in (g_coarse, g_fine) if m is not None]
    for m, _ in modes:
        m.eval()
    path = run.save_grid(run.dir / "samples" / f"{tag}.png", sample_rows(g_coarse, g_fine, samples, args, run.device))
    for m, was_training in modes:
        m.train(was_training)
    grids = sorted((run.dir / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
    run.write_index(f"Robusta on {args.dataset}", [("Samples: label | real | G_coarse | G_fine (newest first)",
                                                     [(p.stem, p) for p in grids])])
    return path


def restore(state, nets, opts, move):
    """Load a checkpoint's networks (state None: fresh start), `move` them (run.wrap: to the run's
    device, DDP), and only then load the optimizers' state: torch casts it to the device of the
    parameters it finds, so loading it before the move would leave Adam's moments on the CPU.
    Returns the moved networks."""
    for k, m in nets.items():
        if m is not None and state is not None and k in state:
            m.load_state_dict(state[k])
    nets = {k: move(m) if m is not None else None for k, m in nets.items()}
    for k, opt in opts.items():
        if opt is not None and state is not None and k in state:
            opt.load_state_dict(state[k])
    return nets


def check_vgg(args):
    """Every paper preset trains with L_VGG (Eq. A5) on ImageNet VGG19 features: without --vgg it
    stops (one line) unless L_VGG is switched off. Only the toycity demo falls back to random VGG
    features (and says so)."""
    uses_vgg = args.lambda_vgg > 0 or (not args.no_fine and args.fine_lambda_vgg > 0)
    preset = args.preset or args.dataset
    if uses_vgg and not args.vgg and preset != "toycity":
        raise data.MissingFile(f"--dataset {preset} trains with L_VGG (Eq. A5): give --vgg vgg19-dcbb9e9d.pth, "
                               f"torchvision's VGG19 ImageNet weights published at {VGG19_URL} "
                               f"(or --lambda-vgg 0 --fine-lambda-vgg 0 to train without L_VGG)")


def train(args):
    """Two-stage training (Sec. A.2); returns the path of the final checkpoint (<run>/last.pt)."""
    check_vgg(args)
    run = segment.Run(args)
    g_coarse, d, g_fine, d_fine = build_networks(args)
    needs_vgg = args.lambda_vgg > 0 or (g_fine is not None and args.fine_lambda_vgg > 0)
    vgg = VGGLoss(args.vgg).to(run.device) if needs_vgg else None
    nets = {"g_coarse": g_coarse, "d": d, "g_fine": g_fine, "d_fine": d_fine}
    opts = optimizers(nets, args)
    stage, step, total, offset = "coarse", 0, None, 0
    state = run.resume()
    nets = restore(state, nets, opts, run.wrap)
    if state is not None:
        run.scaler.load_state_dict(state["scaler"])
        run.set_rng_state(state["rng"])
        stage, step, total, offset = state["stage"], state["stage_step"], state["total"], state["offset"]
    val = image_dataset(args, "val", args.fine_size if g_fine is not None else args.size)
    samples = [val[i] for i in range(min(args.samples, len(val)))]  # fixed pictures for every epoch's grid

    stages = [("coarse", args.size, args.crop, args.batch_size, args.epochs, args.minutes)]
    if g_fine is not None:
        stages.append(("fine", args.fine_size, args.fine_crop, args.fine_batch_size, args.fine_epochs,
                       args.fine_minutes))
    order = ["coarse", "fine", "done"]
    for name, size, crop, batch_size, epochs, minutes in stages:
        if order.index(name) < order.index(stage):  # finished before a resume
            continue
        if name != stage:  # a new stage starts after the steps of the previous one
            stage, step, total, offset = name, 0, None, offset + (total or 0)
        loader = run.loader(image_dataset(args, "train", size, crop), batch_size, shuffle=True)
        total = total or epochs * len(loader)
        g, dd = (nets["g_coarse"], nets["d"]) if name == "coarse" else (nets["g_fine"], nets["d_fine"])
        opt_g, opt_d = (opts["opt_g"], opts["opt_d"]) if name == "coarse" else (opts["opt_gf"], opts["opt_df"])
        base_lr = args.lr if name == "coarse" else args.fine_lr
        nets["g_coarse"].train(name == "coarse")  # stage 2: G_coarse frozen, BN in eval mode
        nets["g_coarse"].requires_grad_(name == "coarse")
        g.train()
        if run.is_main:
            what = "G_coarse + D, L_coarse (Eq. A7)" if name == "coarse" else "G_fine + D_fine, L_fine (Eq. A9)"
            print(f"[{args.name}] stage {name}: {what}, {total} steps of batch {batch_size} at {size[0]}x{size[1]}",
                  flush=True)
        t_start, s_start = None, step
        for step, batch in run.batches(loader, step, total):
            for opt in (opt_g, opt_d):
                for group in opt.param_groups:
                    group["lr"] = linear_decay(base_lr, step, total)
            real = batch["image"].to(run.device) * 2 - 1  # (N, 3, H, W) in [-1, 1]
            label = data.one_hot(batch["label_ids"].to(run.device), args.label_nc)  # (N, label_nc, H, W)
            if name == "coarse":
                _, scalars = gan_step(run, g, dd, opt_g, opt_d, label, (label,), real, coarse_generator_loss,
                                      args.gan_mode, vgg, args)
            else:  # stage 2: G_fine super-resolves the frozen G_coarse's rendering, downsampled (I_LR)
                with torch.no_grad(), run.autocast():
                    coarse = low_resolution(nets["g_coarse"](label).float(), args.fine_scale)  # I_LR
                _, scalars = gan_step(run, g, dd, opt_g, opt_d, label, (coarse, label), real, fine_generator_loss,
                                      "ls", vgg, args)
            run.check_finite(scalars["loss_g"] + scalars["loss_d"], step)
            done = step + 1
            if done == s_start + 2:
                t_start = time.time()
            if minutes and t_start and done == s_start + 5:
                total = min(total, segment.budget_steps(run, done, (time.time() - t_start) / 3, minutes))
            if done % args.log_every == 0 or done == total:
                run.log(offset + done, **{f"{name}/{k}": float(v) for k, v in scalars.items()})
                run.progress(done, total, **{k: float(v) for k, v in scalars.items() if "loss" in k})
            if done % len(loader) == 0 or done == total:
                write_pictures(run, segment.unwrap(nets["g_coarse"]), segment.unwrap(nets["g_fine"])
                               if name == "fine" else None, samples, args, f"{name}_step{done:06d}")
            if done % args.checkpoint_every == 0 or done == total:
                run.save(checkpoint_state(run, nets, opts, name, done, total, offset, args))
            if done >= total:
                break
        step = total
    if stage != "done":
        run.save(checkpoint_state(run, nets, opts, "done", step, total, offset, args))
    run.close()
    return run.dir / "last.pt"


# ---------------------------------------------------------------------------------------------
# 6. Generation: (edited) label maps -> a Cityscapes-layout training set + manifest
# ---------------------------------------------------------------------------------------------


def load_generators(checkpoint, device="cpu"):
    """(G_coarse, G_fine or None, options Namespace) from a checkpoint of `train`, in eval mode."""
    path = Path(checkpoint)
    if not path.is_file():
        raise data.MissingFile(f"generator checkpoint not found at {path} (runs/<name>/last.pt written by "
                                f"`python robusta.py train`)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    args = argparse.Namespace(**state["args"])
    g_coarse, _, g_fine, _ = build_networks(args)
    g_coarse.load_state_dict(state["g_coarse"])
    if g_fine is not None:
        if "g_fine" not in state or state["stage"] == "coarse":
            g_fine = None  # stage 2 not reached yet: G_coarse alone
        else:
            g_fine.load_state_dict(state["g_fine"])
    return g_coarse.to(device).eval(), g_fine.to(device).eval() if g_fine is not None else None, args


def low_resolution(image, scale):
    """I_LR of Sec. A.2 / Eq. (A8): an image (N, 3, H, W) area-downsampled by `scale` (our choice:
    G_coarse renders at the resolution it was trained at, and its image is then reduced, as SRGAN
    reduces I_HR; G_fine brings it back to (H, W))."""
    return image if scale == 1 else F.avg_pool2d(image, scale)


@torch.no_grad()
def render(g_coarse, g_fine, label_ids, label_nc):
    """Label ids (N, H, W) -> (G_coarse image, G_fine image or None), each (N, 3, H, W) in [0, 1].
    G_fine reads I_LR, G_coarse's image downsampled by its scale, and the full-resolution label map."""
    label = data.one_hot(label_ids, label_nc)  # (N, label_nc, H, W)
    coarse = g_coarse(label).float()
    fine = g_fine(low_resolution(coarse, g_fine.scale), label).float() * 0.5 + 0.5 if g_fine is not None else None
    return coarse * 0.5 + 0.5, fine


def paste_outliers(label_ids, count, generator, ids=None):
    """Paste `count` objects with label ids outside the 19 train classes (default data.OUTLIER_IDS)
    into a label map (H, W): random ellipses or boxes on the lower half of the image, 1/16 to 1/5 of
    the image height (our choice). Returns a new map."""
    ids = list(ids or data.OUTLIER_IDS)
    out = label_ids.clone()
    h, w = out.shape
    ys, xs = torch.arange(h)[:, None], torch.arange(w)[None]
    for _ in range(count):
        r = torch.rand(5, generator=generator).tolist()
        ry, rx = h * (1 / 16 + r[0] * (1 / 5 - 1 / 16)), h * (1 / 16 + r[1] * (1 / 5 - 1 / 16))
        cy, cx = h / 2 + r[2] * (h / 2 - ry), r[3] * w
        dy, dx = (ys - cy) / ry, (xs - cx) / rx
        mask = dy ** 2 + dx ** 2 <= 1 if r[4] < 0.5 else (dy.abs() <= 1) & (dx.abs() <= 1)
        out[mask.to(out.device)] = ids[int(torch.randint(len(ids), (1,), generator=generator))]
    return out


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _generate_batch(pending, g_coarse, g_fine, label_nc, edits, outliers, corruption, severity, seed,
                    priority, dataset, images_dir, labels_dir, device):
    """Edit, paste outliers, render, corrupt and write one batch of (index, sample) pairs."""
    ids = torch.stack([s["label_ids"] for _, s in pending]).to(device)  # (B, H, W)
    for edit in edits:
        ids = edit_labels(ids, edit, priority, dataset)
    if outliers:
        ids = torch.stack([paste_outliers(m, outliers, torch.Generator().manual_seed(seed + i))
                           for m, (i, _) in zip(ids, pending)])
    coarse, fine = render(g_coarse, g_fine, ids, label_nc)
    for (i, sample), label_ids, image in zip(pending, ids.cpu(), (fine if fine is not None else coarse).cpu()):
        if corruption:
            image = data.corrupt(image, corruption, severity, seed=seed + i)
        stem = sample["name"]
        data.write_label(labels_dir / f"{stem}_gtFine_labelIds.png", label_ids)
        data.write_label(labels_dir / f"{stem}_gtFine_trainIds.png", data.ID_TO_TRAINID[label_ids.clamp(0, 255)])
        data.write_label(labels_dir / f"{stem}_gtFine_anomaly.png",
                         torch.from_numpy(data.anomaly_mask(label_ids.clamp(0, 255).numpy())).long())
        tmp = images_dir / f"{stem}.tmp.png"
        data.write_image(tmp, image)
        os.replace(tmp, images_dir / f"{stem}_leftImg8bit.png")  # last and atomic: marks the image done


VAL_SPLITS = {"val": "val", "validation": "val", "val2017": "val", "test": "test", "testing": "test"}
SPLIT_NAMES = {**VAL_SPLITS, "train": "train", "training": "train", "train2017": "train"}


def split_of(path):
    """The split a folder of label maps comes from, read off its path (gtFine/val/... -> "val");
    "train" when no part of the path names one."""
    return next((SPLIT_NAMES[p] for p in reversed(Path(path).parts) if p in SPLIT_NAMES), "train")


def output_split(source_split, split=None, allow_val_in_train=False):
    """The split a generated set is written to: by default the split its label maps come from.
    Images rendered from validation (or test) label maps written into a train split would let a
    segmenter train on the evaluation set's layouts (Sec. F.4): refused unless asked explicitly."""
    split = split or SPLIT_NAMES.get(source_split, source_split)
    if source_split in VAL_SPLITS and split == "train" and not allow_val_in_train:
        raise data.BadInput(f"refusing to write images rendered from {source_split} label maps into a train split "
                            f"(a segmenter trained on it would see the evaluation layouts, Sec. F.4); render the "
                            f"train label maps, or pass --allow-val-in-train")
    return split


def generate(checkpoint, source, out_root, edits=(), outliers=0, corruption=None, severity=3, seed=0,
             batch_size=4, device="cpu", priority=None, source_split="train", split=None, city="robusta",
             allow_val_in_train=False):
    """Render a dataset from label maps and write it in the Cityscapes layout that segment.py reads.

    source: a dataset whose samples hold "label_ids" (N, H, W) and "name" (a split of a data.py
    reader, or data.LabelFolder). Each map gets, in order: the morphological `edits` ("dilate:disk:5",
    see `parse_edit`), `outliers` pasted outlier objects, rendering by G_coarse (+ G_fine), and
    optionally data.corrupt(corruption, severity). The output split is `split`, by default
    `source_split` (the split the label maps come from; see `output_split`). Written under out_root:
    leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png, gtFine/<split>/<city>/<stem>_gtFine_{labelIds,
    trainIds,anomaly}.png, and manifest.json (checkpoint sha256, edits, seeds). Image i uses seed
    `seed + i`. An interrupted run resumes: images already written (written last, atomically) are skipped.
    """
    out_root = Path(out_root)
    split = output_split(source_split, split, allow_val_in_train)
    g_coarse, g_fine, args = load_generators(checkpoint, device)
    edits = [parse_edit(e) if isinstance(e, str) else e for e in edits]
    images_dir, labels_dir = out_root / "leftImg8bit" / split / city, out_root / "gtFine" / split / city
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256(checkpoint), "edits": edits,
                "source_split": source_split, "split": split,
                "outliers": outliers, "outlier_ids": list(data.OUTLIER_IDS), "corruption": corruption,
                "severity": severity if corruption else None, "seed": seed, "seeds": "image i: seed + i",
                "generator": "G_coarse" if g_fine is None else "G_coarse + G_fine", "count": len(source),
                "priority": [list(e) for e in priority or PRIORITIES[TABLE_OF.get(args.dataset, args.dataset)]]}
    (out_root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    pending, skipped, rendered, start = [], 0, 0, time.time()
    for index in range(len(source)):
        sample = source[index]
        if (images_dir / f"{sample['name']}_leftImg8bit.png").exists():
            skipped += 1  # finished by an earlier, interrupted run
        else:
            pending.append((index, sample))
        if len(pending) < batch_size and index < len(source) - 1:
            continue
        if pending:
            _generate_batch(pending, g_coarse, g_fine, args.label_nc, edits, outliers, corruption, severity,
                            seed, priority, args.dataset, images_dir, labels_dir, device)
            rendered += len(pending)
            pending = []
        rate = rendered / max(time.time() - start, 1e-9)
        print(f"generate: {index + 1}/{len(source)} ({100 * (index + 1) / len(source):.0f}%) rendered {rendered}, "
              f"skipped {skipped} already written, {rate:.2f} images/s", flush=True)
    return out_root


# ---------------------------------------------------------------------------------------------
# 7. Evaluation (C.1.2, E.1.3), cost profile (Table A11), command line
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_generators(g_coarse, g_fine, dataset, label_nc, segmenter=None, inception=None,
                        device="cpu", batch_size=4, num_classes=data.NUM_CLASSES):
    """Image-quality metrics of rendered validation label maps (Sec. C.1.2, E.1.3) -> dict.

    - spectral distance (E.1.3, Fig. A3): per image pair (generated vs the real image of the same
      label map), filter_rate 0, 1, 2, for G_coarse and G_fine;
    - mIoU of `segmenter` (trained on real images) on the generated images against the input labels
      (the SPADE/OASIS protocol), beside its mIoU on the real images;
    - FID (metrics.frechet_distance of pytorch-fid Inception pool features) with the weights
      `inception`; skipped without them.
    Streamed: one batch of images is in memory at a time (Inception features: 2048 floats per image).
    """
    keys = ["coarse"] + (["fine"] if g_fine is not None else [])
    confusion = {k: metrics.ConfusionMatrix(num_classes) for k in ["real"] + keys}
    spectral = {(k, rate): 0.0 for k in keys for rate in (0, 1, 2)}
    fid_model = metrics.load_fid_inception(inception, device) if inception else None
    features = {k: [] for k in ["real"] + keys}
    count = 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        ids = batch["label_ids"].to(device)
        coarse, fine = render(g_coarse, g_fine, ids, label_nc)
        images = {"real": batch["image"].to(device), "coarse": coarse, "fine": fine}
        for key in keys:
            fake = images[key]
            real = images["real"] if fake.shape == images["real"].shape else F.interpolate(
                images["real"], size=fake.shape[-2:], mode="bilinear", align_corners=False)
            for rate in (0, 1, 2):  # E.1.3: full spectrum, low and high cut-off of the high-pass filter
                spectral[key, rate] += len(fake) * metrics.spectral_distance(real, fake, rate, paired=True)
        for key in ["real"] + keys:
            x = images[key]
            if fid_model is not None:
                features[key].append(fid_model(x).double().cpu())
            if segmenter is not None:
                x = F.interpolate(x, size=ids.shape[-2:], mode="bilinear", align_corners=False)
                confusion[key].update(segment.predict(segmenter, x).argmax(1).cpu(), batch["labels"])
        count += len(ids)
    results = {}
    for key in keys:
        for rate in (0, 1, 2):
            results[f"{key}/spectral_distance_f{rate}"] = spectral[key, rate] / count
        if segmenter is not None:
            results[f"{key}/miou"] = float(confusion[key].miou())
        if fid_model is not None:
            stats = [(f.mean(0), torch.cov(f.T)) for f in (torch.cat(features["real"]), torch.cat(features[key]))]
            results[f"{key}/fid"] = metrics.frechet_distance(*stats[0], *stats[1])
    if segmenter is not None:
        results["real/miou"] = float(confusion["real"].miou())
    if not inception:
        print("evaluate: FID skipped - give --inception PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, "
              "published at https://github.com/mseitzer/pytorch-fid/releases)", flush=True)
    return results


def num_classes(dataset_name):
    """Classes of the segmenter evaluated on generated images (19 Cityscapes trainIds, 150 ADE20K, ...)."""
    return getattr(data, DATASETS.get(dataset_name, "Cityscapes")).__dict__.get("num_classes", data.NUM_CLASSES)


# The published segmenters that score generated images (C.1.2, as in SPADE / OASIS), loaded by segment.py
EVALUATORS = tuple(getattr(segment, "EVALUATORS", ("drn-d-105", "upernet-101", "deeplabv2-cocostuff",
                                                   *(f"segformer-b{i}" for i in range(6)))))
EVALUATOR_OF = {"cityscapes": "drn-d-105", "ade20k": "upernet-101", "ade20k-outdoors": "upernet-101",
                "coco-stuff": "deeplabv2-cocostuff", "toycity": "deeplabv3plus-r18"}


def segmenter_model(args):
    """--segmenter-model, or the paper's evaluator of --dataset (C.1.2)."""
    return args.segmenter_model or EVALUATOR_OF.get(args.dataset, "deeplabv3plus-r101")


def load_segmenter(path, model_name, classes, device):
    """The segmenter of the mIoU-on-generated protocol (C.1.2), in eval mode: a published evaluator
    (`EVALUATORS`, via segment.load_evaluator: RGB in [0, 1] -> logits at input size) or a
    segment.py model (segment.MODELS) from its checkpoint."""
    if model_name in EVALUATORS:
        return segment.load_evaluator(model_name, path, num_classes=classes).to(device).eval()
    model = segment.build_model(model_name, classes)
    model.load_state_dict(segment.load_weights(path))
    return model.to(device).eval()


def profile(presets=None, device="cpu", memory=False):
    """Parameters, mult-adds (one input) and, with `memory`, peak forward/backward memory of the
    generators + discriminators of each dataset preset, printed beside Table A11 (Cityscapes).

    G_fine reads I_LR (size / fine_scale) and D_fine scores its full-size output. Mult-adds under
    both conventions of metrics.count_macs: "torchinfo" (Table A11's) and "aten" (ours). Counting
    runs on the meta device (no memory, no time); memory runs the real networks at the preset's
    resolution on `device` (slow on a CPU at the paper's sizes).
    """
    rows = []
    for name in presets or [p for p in PRESETS]:
        args = options_from_preset(name)
        for part in ("Robusta w/o G_fine", "G_fine"):
            def build(dev):
                with torch.device(dev):
                    g_coarse, d, g_fine, d_fine = build_networks(args)
                g, dd = (g_coarse, d) if part == "Robusta w/o G_fine" else (g_fine, d_fine)
                size = args.size if part == "Robusta w/o G_fine" else args.fine_size
                label = torch.zeros(1, args.label_nc, *size, device=dev)
                low = [n // args.fine_scale for n in size]
                inputs = (label,) if part == "Robusta w/o G_fine" else (torch.zeros(1, 3, *low, device=dev), label)
                return g, dd, label, inputs
            g, dd, label, inputs = build("meta")
            row = {"preset": name, "networks": part,
                   "mparams": (metrics.count_parameters(g) + metrics.count_parameters(dd)) / 1e6}
            for convention in ("torchinfo", "aten"):
                row[f"gmacs_{convention}"] = metrics.count_macs(lambda: dd(label, g(*inputs)),
                                                                convention=convention) / 1e9
            if memory:
                g, dd, label, inputs = build(device)

                def step():
                    gan_loss(dd(label, g(*inputs)), True).backward()
                row["memory_gb"] = metrics.peak_memory(step, device) / 2**30
            rows.append(row)
    print(f"{'preset':<16} {'networks':<20} {'Mparams':>8} {'GMACs torchinfo':>16} {'GMACs aten':>11} "
          f"{'memory GB':>10}   paper (Table A11: Mparams, GMACs torchinfo, VRAM)")
    for r in rows:
        paper = PAPER_COST[r["networks"]] if r["preset"] == "cityscapes" else None
        mem = f"{r['memory_gb']:10.2f}" if "memory_gb" in r else f"{'-':>10}"
        print(f"{r['preset']:<16} {r['networks']:<20} {r['mparams']:8.1f} {r['gmacs_torchinfo']:16.1f} "
              f"{r['gmacs_aten']:11.1f} {mem}   "
              + (f"{paper['mparams']} M, {paper['gmacs']} GMA, {paper['vram_gb']} GB" if paper else "-"))
    print("Conventions (metrics.count_macs): torchinfo = parameters x output positions per leaf module, as "
          "Table A11 counted; aten = the convolutions, matmuls (incl. attention) and norms actually executed.")
    return rows


def add_train_args(p):
    """Options of training (and of the whole pipeline). Unset values come from the preset."""
    g = p.add_argument_group("data (Table A2/A3 presets; an explicit flag overrides its preset value)")
    g.add_argument("--dataset", default="toycity", choices=sorted(PRESETS), help="dataset (toycity = demo scale)")
    g.add_argument("--data-root", default=None, help="dataset root (toycity: a Cityscapes tree; default: the cache)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS), help="hyperparameter row (default: --dataset)")
    g.add_argument("--label-nc", type=int, default=None, help="one-hot label channels (Cityscapes 35)")
    g = p.add_argument_group("networks (Table A1; ablation switches of Tables A6/A7)")
    g.add_argument("--segformer", default=None, choices=[f"b{i}" for i in range(6)] + ["none"],
                   help="SegFormer branch of G_coarse (Table A2: b5; Table A7); 'none' = a second conv branch")
    g.add_argument("--no-spade", action="store_true", help="SPADE 1 off: BatchNorm in G_coarse (Table A6)")
    g.add_argument("--no-spade-fine", action="store_true", help="SPADE 2 off: BatchNorm in G_fine (Table A6)")
    g.add_argument("--no-fine", action="store_true", help="G_coarse only, no second stage (Table A6)")
    g.add_argument("--ngf", type=int, default=None, help="G_coarse base width (Table A1: 64)")
    g.add_argument("--n-blocks", type=int, default=None, help="SPADE ResNet blocks of G_coarse (Table A11: 3)")
    g.add_argument("--spade-hidden", type=int, default=None, help="SPADE hidden channels (SPADE: 128)")
    g.add_argument("--ndf", type=int, default=None, help="discriminator base width (pix2pixHD: 64)")
    g.add_argument("--num-d", type=int, default=2, help="discriminator scales (pix2pixHD: 2)")
    g.add_argument("--fine-nf", type=int, default=None, help="G_fine width (Table A11: 384; SRGAN: 64)")
    g.add_argument("--fine-blocks", type=int, default=None, help="G_fine residual blocks (Table A11: 6; SRGAN: 16)")
    g.add_argument("--fine-scale", type=int, default=None, choices=[1, 2, 4, 8],
                   help="G_fine's factor: its body runs on I_LR at 1 / scale (Table A11 implies 8)")
    g = p.add_argument_group("stage 1: G_coarse (Table A2)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (Table A2: 2e-4)")
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (pix2pixHD: 0.5)")
    g.add_argument("--batch-size", type=int, default=None, help="batch size per process (Table A2)")
    g.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="resize resolution (Table A2)")
    g.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"), help="random crop (Table A2)")
    g.add_argument("--weight-decay", type=float, default=None, help="weight decay (Table A2)")
    g.add_argument("--epochs", type=int, default=None, help="epochs (Table A2: 200)")
    g.add_argument("--minutes", type=float, default=None, help="cap stage 1 at about this many minutes")
    g.add_argument("--gan-mode", default="ls", choices=["original", "ls", "hinge"],
                   help="cGAN loss of stage 1: Eq. (A1) 'original', least squares (pix2pixHD) or hinge")
    g.add_argument("--lambda-l1", type=float, default=None, help="lambda of L1 in L_pix2pix, Eq. (A3) (our choice: 10)")
    g.add_argument("--lambda-fm", type=float, default=None, help="lambda_FM of Eq. (A7) (Table A2: 5)")
    g.add_argument("--lambda-vgg", type=float, default=None, help="lambda_VGG of Eq. (A7) (Table A2: 5)")
    g.add_argument("--vgg", default=None, help="torchvision's vgg19-dcbb9e9d.pth for L_VGG (Eq. A5)")
    g = p.add_argument_group("stage 2: G_fine (Table A3)")
    g.add_argument("--fine-lr", type=float, default=None, help="learning rate (Table A3: 2e-4)")
    g.add_argument("--fine-batch-size", type=int, default=None, help="batch size (Table A3)")
    g.add_argument("--fine-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="resolution (Table A3)")
    g.add_argument("--fine-crop", type=int, nargs=2, default=None, metavar=("H", "W"), help="random crop (Table A3)")
    g.add_argument("--fine-weight-decay", type=float, default=None, help="weight decay (Table A3: 0)")
    g.add_argument("--fine-epochs", type=int, default=None, help="epochs (Table A3: 100)")
    g.add_argument("--fine-minutes", type=float, default=None, help="cap stage 2 at about this many minutes")
    g.add_argument("--fine-lambda-fm", type=float, default=None, help="lambda_FM of Eq. (A9) (Table A3)")
    g.add_argument("--fine-lambda-vgg", type=float, default=None, help="lambda_VGG of Eq. (A9) (Table A3)")
    g = p.add_argument_group("logging")
    g.add_argument("--samples", type=int, default=4, help="validation label maps in each epoch's picture grid")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    segment.add_run_args(p, "robusta")


def add_eval_args(p):
    g = p.add_argument_group("evaluation")
    g.add_argument("--segmenter", default=None, help="weights of the segmenter that scores generated images (mIoU, "
                   "C.1.2; see --segmenter-model); the demo trains one on real ToyCity when absent")
    g.add_argument("--segmenter-model", default=None, choices=list(dict.fromkeys([*segment.MODELS, *EVALUATORS])),
                   help="architecture of --segmenter: a published evaluator (segment.load_evaluator) or a "
                        "segment.py model; default: the paper's evaluator of --dataset (C.1.2: DRN-D-105 for "
                        "Cityscapes, UperNet-101 for ADE20K, DeepLab-v2 for COCO-Stuff; toycity: deeplabv3plus-r18)")
    g.add_argument("--segmenter-minutes", type=float, default=1.5,
                   help="demo: minutes to train that segmenter (DeepLab-v3+ ResNet-18)")
    g.add_argument("--inception", default=None, help="pytorch-fid Inception weights for FID (skipped without)")
    g.add_argument("--max-images", type=int, default=None, help="evaluate / generate the first N maps only")


def resolve(args):
    """Fill every unset option from the preset (Tables A2/A3) of --preset or --dataset."""
    for key, value in PRESETS[args.preset or args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def options_from_preset(name):
    """The training options of a preset, as the command line would resolve them."""
    return resolve(build_parser().parse_args(["train", "--dataset", name]))


PRIORITY_HELP = ("lexicographic order of the edits (Appendix D), highest rank first, '+' joins classes of one "
                 "rank, unlisted classes are stuff: e.g. 'traffic sign,traffic light,person+rider,car' "
                 "(default: the dataset's, robusta.PRIORITIES)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    for name, text in (("run", "train, generate and evaluate (the default; no arguments = the ToyCity demo)"),
                       ("train", "two-stage training only")):
        q = sub.add_parser(name, help=text)
        add_train_args(q)
        add_eval_args(q)
    q = sub.add_parser("generate", help="render a Cityscapes-layout dataset from (edited) label maps")
    q.add_argument("--checkpoint", required=True, help="runs/<name>/last.pt of `train`")
    q.add_argument("--labels", default=None, help="a folder of label-id PNGs (data.LabelFolder) instead of a dataset")
    q.add_argument("--dataset", default="toycity", choices=sorted(DATASETS), help="dataset whose split is rendered")
    q.add_argument("--data-root", default=None, help="its root (toycity: default cache)")
    q.add_argument("--split", default="train", help="split of --dataset whose label maps are rendered")
    q.add_argument("--out-split", default=None,
                   help="split written (default: the source's: --split, or the split named in --labels' path)")
    q.add_argument("--allow-val-in-train", action="store_true",
                   help="allow writing images of val/test label maps into a train split (Sec. F.4: leaks the "
                        "evaluation set into training)")
    q.add_argument("--edit", action="append", default=[], help="morphological edit OP:SHAPE:SIZE[:CLASSES], repeatable "
                   "(e.g. dilate:disk:5, erode:square:7:person,car)")
    q.add_argument("--priority", default=None, help=PRIORITY_HELP)
    q.add_argument("--outliers", type=int, default=0, help="outlier objects pasted into each map")
    q.add_argument("--corruption", default=None, help="a data.CORRUPTIONS name applied to the rendered images")
    q.add_argument("--severity", type=int, default=3, help="corruption severity 1..5")
    q.add_argument("--out-root", required=True, help="output folder (Cityscapes layout + manifest.json)")
    q.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--max-images", type=int, default=None, help="the first N maps only")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q = sub.add_parser("evaluate", help="FID, mIoU on generated images, spectral distance")
    q.add_argument("--checkpoint", required=True, help="runs/<name>/last.pt of `train`")
    q.add_argument("--dataset", default="toycity", choices=sorted(DATASETS))
    q.add_argument("--data-root", default=None)
    q.add_argument("--split", default="val")
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_eval_args(q)
    q = sub.add_parser("profile", help="parameters / mult-adds / memory per preset beside Table A11")
    q.add_argument("--presets", nargs="*", default=None, choices=sorted(PRESETS), help="default: all")
    q.add_argument("--memory", action="store_true", help="also measure forward/backward peak memory (slow on CPU)")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q = sub.add_parser("edit", help="apply morphological edits to label-id PNGs")
    q.add_argument("--labels", required=True, help="a label-id PNG or a folder of them")
    q.add_argument("--edit", action="append", required=True, help="OP:SHAPE:SIZE[:CLASSES], repeatable")
    q.add_argument("--out", required=True, help="output folder (edited _labelIds.png + _color.png)")
    q.add_argument("--dataset", default="cityscapes", choices=sorted(TABLE_OF),
                   help="whose label ids the maps hold (names of classes and default order, Appendix D)")
    q.add_argument("--priority", default=None, help=PRIORITY_HELP)
    return p


def eval_dataset(args, size):
    """The validation split of args.dataset at `size`, cut to --max-images."""
    dataset = image_dataset(args, getattr(args, "split", "val"), size)
    if args.max_images:
        dataset = torch.utils.data.Subset(dataset, range(min(args.max_images, len(dataset))))
    return dataset


def demo_segmenter(args, size):
    """A segmenter trained briefly on the real images (segment.py), for the mIoU protocol."""
    argv = ["--dataset", "toycity", "--model", "deeplabv3plus-r18", "--size", str(size[0]), str(size[1]),
            "--batch-size", "8", "--train-minutes", str(args.segmenter_minutes),
            "--no-eval", "--name", f"{args.name}-segmenter", "--out", args.out, "--device", args.device,
            "--workers", str(args.workers), "--seed", str(args.seed)]
    if args.data_root:
        argv += ["--data-root", str(Path(args.data_root).parent)]
    model, _ = segment.train_segmenter(segment.parse_args(argv))
    return model.to(args.device).eval()


def run_pipeline(args):
    """train -> evaluate on the validation label maps (against an untrained generator of the same
    architecture) -> generate a training set from the train label maps (plain, and the first 8
    dilated) into split "train" -> runs/<name>/index.html and results.json."""
    checkpoint = train(args)
    device = torch.device(args.device)
    g_coarse, g_fine, _ = load_generators(checkpoint, device)
    size = args.size if g_fine is None else args.fine_size
    val = eval_dataset(args, size)
    segmenter = None
    if args.segmenter:
        segmenter = load_segmenter(args.segmenter, segmenter_model(args), num_classes(args.dataset), device)
    elif args.dataset == "toycity":
        segmenter = demo_segmenter(args, size)
    else:
        print("evaluate: mIoU on generated images skipped - give --segmenter PATH (a segment.py checkpoint)")
    classes = num_classes(args.dataset)
    results = {"trained": evaluate_generators(g_coarse, g_fine, val, args.label_nc, segmenter, args.inception,
                                              device, num_classes=classes)}
    segment.seed_everything(args.seed)
    untrained = [m.to(device).eval() if m is not None else None for m in build_networks(args)[::2]]
    results["untrained"] = evaluate_generators(*untrained, val, args.label_nc, segmenter, args.inception, device,
                                               num_classes=classes)
    out = Path(args.out) / args.name
    generated = {}
    train_maps = image_dataset(args, "train", size, augment=False)  # a generated training set: train maps only
    few = torch.utils.data.Subset(train_maps, range(min(8, len(train_maps))))
    for tag, source, edits in (("generated", train_maps, []), ("generated_dilated", few, ["dilate:disk:2"])):
        start = time.time()
        generate(checkpoint, source, out / tag, edits=edits, device=device)
        generated[tag] = len(source) / (time.time() - start)
    results["generation_images_per_s"] = generated
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    run = segment.Run(argparse.Namespace(**{**vars(args), "resume": "auto"}))
    grids = sorted((out / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
    lines = [f"{k}: {v:.4g}" for k, v in results["trained"].items()]
    base = [f"{k}: {v:.4g}" for k, v in results["untrained"].items()]
    edited = sorted((out / "generated_dilated" / "leftImg8bit").rglob("*_leftImg8bit.png"))[:4]
    plain = sorted((out / "generated" / "leftImg8bit").rglob("*_leftImg8bit.png"))[:4]
    run.write_index(f"Robusta on {args.dataset}", [
        ("Trained generator - " + "; ".join(lines), []),
        ("Untrained generator (same architecture) - " + "; ".join(base), []),
        ("Generated training set (train label maps)", [(p.name, p) for p in plain]),
        ("Generated from dilated train label maps (dilate:disk:2)", [(p.name, p) for p in edited]),
        ("Samples: label | real | G_coarse | G_fine (newest first)", [(p.stem, p) for p in grids])])
    print(f"[{args.name}] wrote {out / 'index.html'}", flush=True)
    return results


def edit_files(args):
    """`edit`: apply --edit ops to label-id PNGs, writing _labelIds.png and a colour picture."""
    source = data.LabelFolder(args.labels) if Path(args.labels).is_dir() else None
    files = [Path(args.labels)] if source is None else source.files
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    priority = parse_priority(args.priority) if args.priority else None
    for path in files:
        ids = data.read_label(path)[None]
        for e in args.edit:
            ids = edit_labels(ids, e, priority, args.dataset)
        stem = path.name[: -len(".png")].replace("_gtFine_labelIds", "")
        data.write_label(out / f"{stem}_gtFine_labelIds.png", ids[0])
        if TABLE_OF[args.dataset] == "cityscapes":  # Cityscapes colours
            data.write_image(out / f"{stem}_gtFine_color.png",
                             data.colorize(ids[0], kind="id").permute(2, 0, 1) / 255)
    print(f"edit: {len(files)} label maps -> {out}")


# ---------------------------------------------------------------------------------------------
# 8. The seeded ToyCity experiment: Tables A5/A6 (image quality), A10 + F.2 (robustness), Fig. A2
# ---------------------------------------------------------------------------------------------

TEST_CORRUPTIONS = ("gaussian_noise", "motion_blur", "fog", "contrast")     # segment's toycity-demo preset
TRAIN_CORRUPTIONS = ("shot_noise", "defocus_blur", "snow", "brightness")    # disjoint from the test ones


def experiment_parser():
    p = argparse.ArgumentParser(prog="robusta.py experiment", description=(
        "Robusta at ToyCity scale, seeded: image quality of G_coarse with / without the SegFormer branch and "
        "with / without G_fine (Tables A5, A6), a segmenter trained on real vs real + Robusta-generated data "
        "(edited label maps, pasted outliers, corrupted renderings; Table A10, F.2) on clean, corrupted and "
        "outlier splits, and the morphology sequence of Fig. A2. mean +- std over seeds."))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (>= 3 for a std)")
    p.add_argument("--epochs", type=int, default=6, help="stage-1 epochs of each generator (50 steps of batch 4)")
    p.add_argument("--fine-epochs", type=int, default=2, help="stage-2 epochs (G_fine)")
    p.add_argument("--segmenter-steps", type=int, default=240, help="steps of each robustness segmenter")
    p.add_argument("--evaluator-steps", type=int, default=300,
                   help="steps of the fixed segmenter that scores generated images (seed 0)")
    p.add_argument("--segmenter-batch-size", type=int, default=8, help="batch size of both segmenters")
    p.add_argument("--edit", default="dilate:disk:1", help="morphological edit of the generated training set")
    p.add_argument("--outliers", type=int, default=1, help="outlier objects pasted into each generated map")
    p.add_argument("--size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"), help="image size")
    p.add_argument("--quick", action="store_true",
                   help="one epoch per stage, a sixth of the segmenter steps (a smoke test)")
    p.add_argument("--out", default="runs/robusta-experiment", help="output folder (quick: <out>-quick)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def segmenter_robustness(model, splits, device):
    """Clean / target / corrupted mIoU (%) and OOD detection of a segmenter on the experiment's splits."""
    loader = lambda ds: segment.eval_loader(ds, batch_size=4)  # noqa: E731
    out = {"clean": 100 * segment.evaluate(model, loader(splits["val"]), device).miou(),
           "target": 100 * segment.evaluate(model, loader(splits["target"]), device).miou()}
    corr = segment.evaluate_corruptions(model, splits["val"], device, TEST_CORRUPTIONS, (3,), batch_size=4)
    out["corrupted"] = 100 * corr["mean"]
    out["per_corruption"] = {k: 100 * v for k, v in corr["per_corruption"].items()}
    for name in ("outlier-source", "outlier-target"):
        out[name] = {kind: {k: 100 * v for k, v in m.items()}
                     for kind, m in segment.evaluate_ood(model, loader(splits[name]), device).items()}
    return out


def morphology_figure(g_coarse, g_fine, sample, label_nc, path, radii=(0, 1, 2, 3, 4)):
    """Fig. A2: one label map dilated with disks of increasing radius (top) and its renderings (bottom)."""
    labels, images = [], []
    for r in radii:
        ids = sample["label_ids"][None]
        if r:
            ids = edit_labels(ids, f"dilate:disk:{r}")
        coarse, fine = render(g_coarse, g_fine, ids.to(next(g_coarse.parameters()).device), label_nc)
        labels.append(data.colorize(ids[0], kind="id").permute(2, 0, 1).float() / 255)
        images.append((fine if fine is not None else coarse)[0].cpu())
    return segment.save_grid(path, [labels, images])


def experiment(argv=()):
    """`python robusta.py experiment [--quick]`: resumable; writes <out>/experiment.json, results.md
    (mean +- std over seeds) and the figures samples.png, morphology.png, generated.png."""
    e = experiment_parser().parse_args(list(argv))
    if e.quick:
        e.epochs, e.fine_epochs = 1, 1
        e.segmenter_steps, e.evaluator_steps = e.segmenter_steps // 6, e.evaluator_steps // 6
        e.out = e.out + "-quick" if e.out == "runs/robusta-experiment" else e.out
    if e.threads:
        torch.set_num_threads(e.threads)
    segment.announce_demo("robusta")
    out, device, size = Path(e.out), torch.device(e.device), tuple(e.size)
    settings = {k: v for k, v in vars(e).items() if k not in ("out", "device", "threads")}
    exp = segment.Experiment(out, "Robusta (Tables A5, A6, A10; F.2; Fig. A2) on ToyCity", settings)
    toy = data.toycity()
    common = ["--out", str(out), "--device", e.device, "--workers", "0", "--resume", "auto"]
    # an outlier split in the *source* look: the pasted objects are then the only novelty (ToyCity's
    # outlier/ is in the target look, where a source-trained model is uncertain everywhere)
    outlier_source = out / "outlier-source"
    if not (outlier_source / ".complete").is_file():
        reference = data.Cityscapes(toy / "outlier", "val")  # same scenes, same resolution, other look
        data.make_toycity(outlier_source, len(reference), size=tuple(reference[0]["image"].shape[-2:]),
                          domain="outlier", seed=0, split="val", look="source")
        (outlier_source / ".complete").write_text("ok")
    splits = {"val": data.Cityscapes(toy / "source", "val", size=size),
              "target": data.Cityscapes(toy / "target", "val", size=size),
              "outlier-source": data.Cityscapes(outlier_source, "val", size=size),
              "outlier-target": data.Cityscapes(toy / "outlier", "val", size=size)}

    def segmenter(name, steps, seed, generated=()):
        argv = ["--dataset", "toycity", "--data-root", str(toy), "--model", "deeplabv3plus-r18",
                "--size", *map(str, size), "--crop", *map(str, size), "--batch-size", str(e.segmenter_batch_size),
                "--steps", str(steps), "--train-minutes", "0", "--no-eval", "--name", name, "--seed", str(seed),
                "--log-every", "25", *common]
        for g in generated:
            argv += ["--generated", str(g)]
        return segment.train_segmenter(segment.parse_args(argv))[0].to(device).eval()

    def train_evaluator():
        segmenter("evaluator", e.evaluator_steps, 0)
        return {"checkpoint": str(out / "evaluator" / "last.pt")}

    exp.cell("evaluator", train_evaluator)
    evaluator = load_segmenter(out / "evaluator" / "last.pt", "deeplabv3plus-r18", data.NUM_CLASSES, device)

    def generator(name, seed, extra):
        args = build_parser().parse_args(["train", "--epochs", str(e.epochs), "--fine-epochs", str(e.fine_epochs),
                                          "--minutes", "0", "--fine-minutes", "0", "--size", *map(str, size),
                                          "--fine-size", *map(str, size), "--seed", str(seed), "--name", name,
                                          "--log-every", "25", *extra, *common])
        resolve(args)
        return train(args)

    def quality(checkpoint):
        g_coarse, g_fine, args = load_generators(checkpoint, device)
        return evaluate_generators(g_coarse, g_fine, splits["val"], args.label_nc, evaluator, None, device)

    train_maps = data.Cityscapes(toy / "source", "train", size=size)
    quality_rows, robust = {}, {}
    for seed in e.seeds:
        full = out / f"generator-s{seed}" / "last.pt"
        quality_rows["full", seed] = exp.cell(full.parent.name, lambda: quality(generator(full.parent.name, seed, [])))
        bare = out / f"generator-nosegformer-s{seed}" / "last.pt"
        quality_rows["bare", seed] = exp.cell(bare.parent.name, lambda: quality(
            generator(bare.parent.name, seed, ["--segformer", "none", "--no-fine"])))

        def generated_data():
            roots = [generate(full, train_maps, out / f"generated-s{seed}" / "edited", [e.edit], e.outliers,
                              seed=1000 * seed, device=device)]
            for j, name in enumerate(TRAIN_CORRUPTIONS):  # Table A10: "+ Corrupted-CS", other corruption types
                part = torch.utils.data.Subset(train_maps, range(j, len(train_maps), len(TRAIN_CORRUPTIONS)))
                roots.append(generate(full, part, out / f"generated-s{seed}" / name, [e.edit], e.outliers, name, 3,
                                      seed=1000 * seed + 500, device=device))
            return [str(r) for r in roots]

        roots = exp.cell(f"generated-s{seed}", generated_data)
        robust["real", seed] = exp.cell(f"segmenter-real-s{seed}", lambda: segmenter_robustness(
            segmenter(f"segmenter-real-s{seed}", e.segmenter_steps, seed), splits, device))
        robust["robusta", seed] = exp.cell(f"segmenter-robusta-s{seed}", lambda: segmenter_robustness(
            segmenter(f"segmenter-robusta-s{seed}", e.segmenter_steps, seed, roots), splits, device))

    def column(rows, kind, key, scale=1.0):
        return [scale * rows[kind, s][key] for s in e.seeds if key in rows[kind, s]]

    q = [("G_coarse without SegFormer", "bare", "coarse"), ("G_coarse (SegFormer B0)", "full", "coarse"),
         ("G_coarse + G_fine", "full", "fine"), ("real images", "full", "real")]
    rows = [(name, [column(quality_rows, kind, f"{part}/miou", 100)] +
             [column(quality_rows, kind, f"{part}/spectral_distance_f{r}") for r in range(3)])
            for name, kind, part in q]
    exp.table(["generator (Table A6 rows)", "mIoU on generated (%) ↑", "spectral f0 ↓", "spectral f1 ↓",
               "spectral f2 ↓"], rows, decimals=[2, 3, 3, 3],
              note=f"{e.epochs} + {e.fine_epochs} epochs of batch 4 over {len(train_maps)} maps at "
                   f"{size[0]}x{size[1]}; "
                   f"mIoU of a fixed DeepLab-v3+ R18 trained {e.evaluator_steps} steps on real source images (seed 0), "
                   f"on the {len(splits['val'])} source-val label maps; spectral distance (E.1.3) per image pair, "
                   f"filter rate 0/1/2. FID needs the pytorch-fid Inception weights (not shipped): not reported.")
    rob_rows = []
    for kind, name in (("real", "real only"), ("robusta", "real + Robusta-generated")):
        cols = [[robust[kind, s][k] for s in e.seeds] for k in ("clean", "corrupted", "target")]
        for split in ("outlier-source",):
            for metric in ("auroc", "aupr", "fpr95"):
                cols.append([robust[kind, s][split]["maxlogit"][metric] for s in e.seeds])
        rob_rows.append((name, cols))
    exp.table(["training data (Table A10, F.2)", "clean mIoU ↑", "corrupted mIoU ↑", "target mIoU ↑",
               "AUROC ↑", "AUPR ↑", "FPR95 ↓"], rob_rows,
              note=f"DeepLab-v3+ R18 from scratch, {e.segmenter_steps} steps of batch {e.segmenter_batch_size}. "
                   f"Generated = the {len(train_maps)} train label maps edited ({e.edit}) with {e.outliers} pasted "
                   f"outlier(s) each, rendered by that seed's G_coarse + G_fine, and the same maps once more, "
                   f"a quarter under each of {', '.join(TRAIN_CORRUPTIONS)} (severity 3). Corrupted = mean mIoU under "
                   f"{', '.join(TEST_CORRUPTIONS)} (severity 3; none of them seen in training). Outliers: the "
                   f"source-look outlier val split, max-logit score, pasted objects vs pixels of the 19 classes.")
    # figures from the first seed
    g_coarse, g_fine, g_args = load_generators(out / f"generator-s{e.seeds[0]}" / "last.pt", device)
    bare_coarse, _, _ = load_generators(out / f"generator-nosegformer-s{e.seeds[0]}" / "last.pt", device)
    rows = []
    for i in range(min(4, len(splits["val"]))):
        sample = splits["val"][i]
        ids = sample["label_ids"][None].to(device)
        plain, _ = render(bare_coarse, None, ids, g_args.label_nc)
        coarse, fine = render(g_coarse, g_fine, ids, g_args.label_nc)
        rows.append([data.colorize(ids[0].cpu(), kind="id").permute(2, 0, 1).float() / 255, sample["image"],
                     plain[0], coarse[0], fine[0]])
    segment.save_grid(out / "samples.png", rows)
    morphology_figure(g_coarse, g_fine, splits["val"][0], g_args.label_nc, out / "morphology.png")
    edited = sorted((out / f"generated-s{e.seeds[0]}").rglob("*_leftImg8bit.png"))
    picks = [edited[0]] + [next(p for p in edited if p.parts[-5] == c) for c in TRAIN_CORRUPTIONS]
    labels = [Path(str(p).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
              for p in picks]
    segment.save_grid(out / "generated.png", [
        [data.colorize(data.read_label(p), kind="id").permute(2, 0, 1).float() / 255 for p in labels],
        [data.read_image(p) for p in picks]])
    print(f"[experiment] wrote {out / 'samples.png'} (label | real | G_coarse w/o SegFormer | G_coarse | "
          f"G_coarse + G_fine), {out / 'morphology.png'} (Fig. A2), {out / 'generated.png'}; "
          f"{exp.seconds() / 60:.1f} min of runs; tables in {out / 'results.md'}", flush=True)
    return quality_rows, robust


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run"] + argv  # `python robusta.py [--dataset ...]`: the whole pipeline
    if argv and argv[0] == "experiment":
        return experiment(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in ("run", "train"):
        resolve(args)
        if args.dataset == "toycity" and not args.data_root:
            segment.announce_demo("robusta")
        return run_pipeline(args) if args.command == "run" else train(args)
    if args.command == "generate":
        _, _, trained = load_generators(args.checkpoint)
        size = trained.size if trained.no_fine else trained.fine_size
        if args.labels:
            source, source_split = data.LabelFolder(args.labels, size=size), split_of(args.labels)
        else:
            source = image_dataset(argparse.Namespace(dataset=args.dataset, data_root=args.data_root), args.split,
                                   size, augment=False)
            source_split = args.split
        if args.max_images:
            source = torch.utils.data.Subset(source, range(min(args.max_images, len(source))))
        return generate(args.checkpoint, source, args.out_root, args.edit, args.outliers, args.corruption,
                        args.severity, args.seed, args.batch_size, args.device,
                        parse_priority(args.priority) if args.priority else None, source_split=source_split,
                        split=args.out_split, allow_val_in_train=args.allow_val_in_train)
    if args.command == "evaluate":
        g_coarse, g_fine, trained = load_generators(args.checkpoint, args.device)
        size = trained.size if g_fine is None else trained.fine_size
        args.label_nc = trained.label_nc
        classes = num_classes(args.dataset)
        segmenter = None
        if args.segmenter:
            segmenter = load_segmenter(args.segmenter, segmenter_model(args), classes, args.device)
        results = evaluate_generators(g_coarse, g_fine, eval_dataset(args, size), trained.label_nc,
                                      segmenter, args.inception,
                                      args.device, args.batch_size, classes)
        print(json.dumps(results, indent=2))
        return results
    if args.command == "profile":
        return profile(args.presets, args.device, args.memory)
    return edit_files(args)


if __name__ == "__main__":
    data.cli(main)
