"""Data for Robusta (Hariat et al., WACV 2024) and ASH (Tjio et al.): labels, readers, transforms,
corruptions and ToyCity, the embedded procedural street-scene dataset.

Contents, in reading order:
1. The Cityscapes label table (`LABELS`, cityscapesScripts' 34 labels + license plate) and its
   lookups: `ID_TO_TRAINID`, `TRAINID_TO_COLOR`, `colorize`, `one_hot` (the 35-channel generator
   input of pix2pixHD/SPADE/Robusta), `instance_edges` (pix2pixHD's extra boundary channel).
2. Files: `read_image`, `read_label`, `read_style_image` (paintings of any size and mode), `read_mat`
   (MATLAB v5 numeric arrays: GTA5's split.mat), `write_image`, `write_label` (PNG), with errors
   that name the file (`UserError`: `MissingFile`, `BadInput`; `cli` prints them on one line).
3. Paired transforms that keep label maps exact: `Resize`, `RandomScaleCrop`, `RandomFlip`,
   `Compose`, and `RESOLUTIONS`, the per-dataset sizes of Robusta Tables A2/A3.
4. Dataset readers (torch Datasets returning dicts): `Cityscapes`, `GTA5`, `Synthia`, `Mapillary`,
   `ADE20K`, `CocoStuff`, `BDD100K`, `StreetHazards`, `StyleFolder`, `LabelFolder`; `check_split`
   (a pass over a split that lists every bad file).
5. Corruptions in the manner of ImageNet-C / Cityscapes-C (Hendrycks & Dietterich, ICLR 2019):
   `CORRUPTIONS`, `corrupt(image, name, severity, seed)` (Robusta Table A10, Corrupted-Cityscapes).
6. ToyCity: `make_toycity` (procedural scenes written as a Cityscapes tree, in a "source",
   "target" or "outlier" domain), `make_paintings` (style images), `toycity()` (cached).

Run:
    python data.py toycity --out DIR [--size 256 512 --num 200 --seed 0]
    python data.py check --dataset gta5 --root GTA5 [--split all]    # lists every bad file of a split
"""
import argparse
import contextlib
import io
import math
import os
import shutil
import struct
import sys
import threading
import time
import warnings
import zlib
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

# --------------------------------------------------------------------------------------------
# 1. The Cityscapes label table (cityscapesScripts/helpers/labels.py)
# --------------------------------------------------------------------------------------------

Label = namedtuple("Label", "name id trainId category categoryId hasInstances ignoreInEval color")

LABELS = [
    #     name                     id  trainId  category        catId  instances  ignore  color
    Label("unlabeled",              0, 255, "void",             0, False, True,  (0, 0, 0)),
    Label("ego vehicle",            1, 255, "void",             0, False, True,  (0, 0, 0)),
    Label("rectification border",   2, 255, "void",             0, False, True,  (0, 0, 0)),
    Label("out of roi",             3, 255, "void",             0, False, True,  (0, 0, 0)),
    Label("static",                 4, 255, "void",             0, False, True,  (0, 0, 0)),
    Label("dynamic",                5, 255, "void",             0, False, True,  (111, 74, 0)),
    Label("ground",                 6, 255, "void",             0, False, True,  (81, 0, 81)),
    Label("road",                   7, 0,   "flat",             1, False, False, (128, 64, 128)),
    Label("sidewalk",               8, 1,   "flat",             1, False, False, (244, 35, 232)),
    Label("parking",                9, 255, "flat",             1, False, True,  (250, 170, 160)),
    Label("rail track",            10, 255, "flat",             1, False, True,  (230, 150, 140)),
    Label("building",              11, 2,   "construction",     2, False, False, (70, 70, 70)),
    Label("wall",                  12, 3,   "construction",     2, False, False, (102, 102, 156)),
    Label("fence",                 13, 4,   "construction",     2, False, False, (190, 153, 153)),
    Label("guard rail",            14, 255, "construction",     2, False, True,  (180, 165, 180)),
    Label("bridge",                15, 255, "construction",     2, False, True,  (150, 100, 100)),
    Label("tunnel",                16, 255, "construction",     2, False, True,  (150, 120, 90)),
    Label("pole",                  17, 5,   "object",           3, False, False, (153, 153, 153)),
    Label("polegroup",             18, 255, "object",           3, False, True,  (153, 153, 153)),
    Label("traffic light",         19, 6,   "object",           3, False, False, (250, 170, 30)),
    Label("traffic sign",          20, 7,   "object",           3, False, False, (220, 220, 0)),
    Label("vegetation",            21, 8,   "nature",           4, False, False, (107, 142, 35)),
    Label("terrain",               22, 9,   "nature",           4, False, False, (152, 251, 152)),
    Label("sky",                   23, 10,  "sky",              5, False, False, (70, 130, 180)),
    Label("person",                24, 11,  "human",            6, True,  False, (220, 20, 60)),
    Label("rider",                 25, 12,  "human",            6, True,  False, (255, 0, 0)),
    Label("car",                   26, 13,  "vehicle",          7, True,  False, (0, 0, 142)),
    Label("truck",                 27, 14,  "vehicle",          7, True,  False, (0, 0, 70)),
    Label("bus",                   28, 15,  "vehicle",          7, True,  False, (0, 60, 100)),
    Label("caravan",               29, 255, "vehicle",          7, True,  True,  (0, 0, 90)),
    Label("trailer",               30, 255, "vehicle",          7, True,  True,  (0, 0, 110)),
    Label("train",                 31, 16,  "vehicle",          7, True,  False, (0, 80, 100)),
    Label("motorcycle",            32, 17,  "vehicle",          7, True,  False, (0, 0, 230)),
    Label("bicycle",               33, 18,  "vehicle",          7, True,  False, (119, 11, 32)),
    Label("license plate",         -1, -1,  "vehicle",          7, False, True,  (0, 0, 142)),
]

NUM_IDS = 35         # one-hot channels of the generator input: ids 0..33 + a spare (pix2pixHD/SPADE)
NUM_CLASSES = 19     # trainIds 0..18
IGNORE_INDEX = 255
NAME_TO_ID = {l.name: l.id for l in LABELS}
CLASS_NAMES = [l.name for l in sorted((l for l in LABELS if 0 <= l.trainId < 255), key=lambda l: l.trainId)]
INSTANCE_CLASS_IDS = [l.id for l in LABELS if l.hasInstances]
# ids ToyCity pastes as anomalies in its "outlier" domain: outside the 19 train classes (our choice).
OUTLIER_IDS = [NAME_TO_ID["dynamic"], NAME_TO_ID["caravan"], NAME_TO_ID["trailer"]]


def _lookup(pairs, fill, dtype, width=None):
    shape = (256,) if width is None else (256, width)
    table = torch.full(shape, fill, dtype=dtype)
    for key, value in pairs:
        table[key] = torch.tensor(value, dtype=dtype)
    return table


ID_TO_TRAINID = _lookup([(l.id, l.trainId) for l in LABELS if l.id >= 0], IGNORE_INDEX, torch.int64)  # (256,)
TRAINID_TO_ID = _lookup([(l.trainId, l.id) for l in LABELS if 0 <= l.trainId < 255], 0, torch.int64)  # (256,)
TRAINID_TO_COLOR = _lookup([(l.trainId, l.color) for l in LABELS if 0 <= l.trainId < 255], 0, torch.uint8, 3)
ID_TO_COLOR = _lookup([(l.id, l.color) for l in LABELS if l.id >= 0], 0, torch.uint8, 3)  # (256, 3)


def colorize(labels, kind="trainId"):
    """Colour a (..., H, W) map of trainIds (kind="trainId") or label ids (kind="id") with the
    Cityscapes palette -> uint8 (..., H, W, 3); numpy in, numpy out; tensor in, tensor out."""
    table = {"trainId": TRAINID_TO_COLOR, "id": ID_TO_COLOR}[kind]
    if isinstance(labels, np.ndarray):
        return table.numpy()[np.clip(labels, 0, 255)]
    return table.to(labels.device)[labels.long().clamp(0, 255)]


def one_hot(label_ids, num_classes=NUM_IDS):
    """(N, H, W) label ids -> float (N, num_classes, H, W), the semantic input of pix2pixHD/SPADE.
    Ids outside [0, num_classes) get an all-zero vector."""
    valid = (label_ids >= 0) & (label_ids < num_classes)
    out = F.one_hot(torch.where(valid, label_ids, 0).long(), num_classes)  # (N, H, W, C)
    return (out * valid[..., None]).permute(0, 3, 1, 2).float()


def instance_edges(instance_ids):
    """(N, H, W) instance ids -> float (N, 1, H, W): 1 where a 4-neighbour belongs to another
    instance (pix2pixHD's boundary map, the optional 36th generator channel)."""
    t = instance_ids
    edge = torch.zeros_like(t, dtype=torch.bool)
    dx = t[:, :, 1:] != t[:, :, :-1]
    dy = t[:, 1:, :] != t[:, :-1, :]
    edge[:, :, 1:] |= dx
    edge[:, :, :-1] |= dx
    edge[:, 1:, :] |= dy
    edge[:, :-1, :] |= dy
    return edge[:, None].float()


# --------------------------------------------------------------------------------------------
# 2. Files, and the errors a user can cause
# --------------------------------------------------------------------------------------------

class UserError(Exception):
    """A mistake of the user's, not a bug: a missing file or folder, a wrong option value, bad data.
    The command lines of every module print it as one line `error: ...` and exit with status 2
    (argparse's convention) instead of a traceback; `--debug` shows the traceback."""


class MissingFile(UserError, FileNotFoundError):
    """A dataset root, weight file, checkpoint or other path that does not exist."""


class BadInput(UserError, ValueError):
    """An option value or a file's content that cannot be used (corrupt image, label id out of range)."""


def cli(main, argv=None):
    """Run a module's `main(argv)` as a command line: a UserError is printed as `error: <message>`
    on one line (stderr) with exit status 2; with `--debug` anywhere in argv it keeps its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        return main([a for a in argv if a != "--debug"])
    except UserError as e:
        if debug:
            raise
        print("error: " + _one_line(e), file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _one_line(error):
    """An error's message on one line (how `cli` prints it and how a skipped sample reports it)."""
    return " ".join(str(error).split())


# what Pillow raises on a file it cannot decode (unknown format, truncated, corrupt, too large)
PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def _open_lazy(path):
    """Open an image file without decoding its pixels (header only)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path}: no such file")
    try:
        return Image.open(path)
    except PIL_ERRORS as e:
        raise BadInput(f"{path}: cannot read image ({_one_line(e)})") from e


def _loaded(img, path):
    try:
        img.load()
    except PIL_ERRORS as e:
        raise BadInput(f"{path}: cannot read image ({_one_line(e)})") from e
    return img


def _open(path):
    return _loaded(_open_lazy(path), path)


def read_image(path):
    """An RGB image file -> float tensor (3, H, W) in [0, 1]."""
    img = _open(path).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)


def _label_array(path):
    """A single-channel (8-bit, 16-bit or palette) label PNG -> numpy (H, W) of its values, in the
    file's own integer type (uint8 for 8-bit files: the readers look them up without a copy)."""
    img = _open(path)
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise BadInput(f"{path}: label file has mode {img.mode}; expected a single-channel (L, P, I;16) PNG "
                       "of label ids (a colour PNG such as *_color.png is not a label map)")
    values = np.asarray(img)
    return values.astype(np.uint8) if values.dtype == bool else values


def read_label(path):
    """A single-channel (8-bit, 16-bit or palette) label PNG -> int64 tensor (H, W) of its values."""
    return torch.from_numpy(_label_array(path).astype(np.int64))


def read_png16_rgb(path):
    """A 16-bit RGB PNG (SYNTHIA's GT/LABELS) -> int64 tensor (3, H, W) of the 16-bit values.
    Pillow converts such files to 8 bits by keeping each sample's high byte; decoding a second
    time with the little-endian raw mode keeps the low byte instead, and value = 256 * high + low."""
    planes = []
    for rawmode in ("RGB;16B", "RGB;16L"):
        img = _open_lazy(path)
        if img.mode != "RGB" or img.tile[0][3] != "RGB;16B":
            raise BadInput(f"{path}: not a 16-bit RGB PNG (mode {img.mode}), as SYNTHIA's labels are")
        img.tile = [(t[0], t[1], t[2], rawmode) for t in img.tile]
        planes.append(np.asarray(_loaded(img, path)).astype(np.int64))
    return torch.from_numpy(planes[0] * 256 + planes[1]).permute(2, 0, 1)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
STYLE_MAX_SIDE = 1024  # longer side of a style image after loading (our choice; AdaIN trains on 512 resizes)
_LENIENT = {"lock": threading.Lock(), "readers": 0, "saved": None}


@contextlib.contextmanager
def _lenient_pil():
    """While style images are read: no decompression-bomb limit, and truncated files load what they
    hold (pytorch-AdaIN sets both for good for its style folder; here only for the duration, the
    previous values restored when the last overlapping reader, in any thread, is done)."""
    with _LENIENT["lock"]:
        if _LENIENT["readers"] == 0:
            _LENIENT["saved"] = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        _LENIENT["readers"] += 1
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, True
    try:
        yield
    finally:
        with _LENIENT["lock"]:
            _LENIENT["readers"] -= 1
            if _LENIENT["readers"] == 0:
                Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = _LENIENT["saved"]


def read_style_image(path, max_side=STYLE_MAX_SIDE):
    """A painting or photo of any size and mode (Painter by Numbers) -> float (3, H, W) in [0, 1],
    its longer side brought down to at most max_side. Reads images beyond Pillow's decompression-bomb
    limit and what a truncated file holds (`_lenient_pil`); a large JPEG is decoded at the smallest
    1/2..1/8 scale still above the target (draft mode). CMYK, greyscale and palette images become RGB,
    16-bit greyscale is scaled to 8 bits, and transparency is composited over white (our choice: a
    transparent area shows as blank canvas, not as whatever colour is stored under it)."""
    with _lenient_pil():
        img = _open_lazy(path)
        w, h = img.size
        scale = min(1.0, max_side / max(w, h))
        target = (max(1, round(w * scale)), max(1, round(h * scale)))
        img.draft(None, target)
        img = _loaded(img, path)
    if img.mode.startswith("I"):                                     # 16-bit (I;16*) or 32-bit (I) greyscale
        img = Image.fromarray(np.clip(np.asarray(img) / 257, 0, 255).round().astype(np.uint8))
    if img.mode.endswith(("A", "a")) or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    try:
        img = img.convert("RGB")
    except (ValueError, OSError) as e:                               # a mode Pillow cannot convert (LAB, ...)
        raise BadInput(f"{path}: cannot convert image mode {img.mode} to RGB ({_one_line(e)})") from e
    if img.size != target:
        img = img.resize(target, Image.BILINEAR, reducing_gap=2.0)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)


# MATLAB v5 MAT-files (GTA5's split.mat): data types of the data elements, classes of the arrays
MAT_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
MAT_CLASSES = {6: np.float64, 7: np.float32, 8: np.int8, 9: np.uint8, 10: np.int16, 11: np.uint16,
               12: np.int32, 13: np.uint32, 14: np.int64, 15: np.uint64}
MI_MATRIX, MI_COMPRESSED = 14, 15


def read_mat(path):
    """The numeric arrays of a MATLAB v5 MAT-file (what `save` writes up to -v7; GTA5's split.mat)
    -> {name: ndarray in MATLAB's shape, of the array's class}. Reads the uncompressed and the
    zlib-compressed (miCOMPRESSED) elements, whatever type the values are stored in (MATLAB stores
    integer-valued doubles as miUINT8/miUINT16/...); skips cell, struct, char, sparse and complex arrays."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path}: no such file")
    raw = path.read_bytes()
    order = {b"IM": "<", b"MI": ">"}.get(raw[126:128])
    if raw.startswith(b"MATLAB 7.3"):
        raise BadInput(f"{path}: a MATLAB 7.3 (HDF5) MAT-file; save it with -v7, or list the images in a text file")
    if len(raw) < 128 or order is None:
        raise BadInput(f"{path}: not a MATLAB 5 MAT-file (no 'MATLAB 5.0 MAT-file' header)")
    arrays = {}
    try:
        _mat_elements(raw[128:], order, arrays)
    except (struct.error, zlib.error, ValueError, KeyError) as e:
        raise BadInput(f"{path}: corrupt MAT-file ({_one_line(e)})") from e
    return arrays


def _mat_element(buf, pos, order):
    """(data type, data bytes, position of the next element) of the element at `pos`: a tag of 8 bytes
    then data padded to 8 bytes, or a small element (type and size in 4 bytes, up to 4 data bytes)."""
    word, nbytes = struct.unpack_from(order + "II", buf, pos)
    if word >> 16:
        return word & 0xFFFF, buf[pos + 4: pos + 4 + (word >> 16)], pos + 8
    end = pos + 8 + nbytes
    if end > len(buf):
        raise ValueError(f"element of {nbytes} bytes at {pos} runs past the end")
    return word, buf[pos + 8: end], end if word == MI_COMPRESSED else pos + 8 + (nbytes + 7) // 8 * 8


def _mat_elements(buf, order, arrays):
    pos = 0
    while pos + 8 <= len(buf):
        kind, body, pos = _mat_element(buf, pos, order)
        if kind == MI_COMPRESSED:
            _mat_elements(zlib.decompress(body), order, arrays)
        elif kind == MI_MATRIX:
            _mat_matrix(body, order, arrays)


def _mat_matrix(body, order, arrays):
    """One miMATRIX element: array flags, dimensions, name, real part (column-major)."""
    _, flags, pos = _mat_element(body, 0, order)
    _, dims, pos = _mat_element(body, pos, order)
    _, name, pos = _mat_element(body, pos, order)
    flags = struct.unpack_from(order + "I", flags)[0]
    cls, is_complex = flags & 0xFF, flags & 0x800
    if cls not in MAT_CLASSES or is_complex:
        return
    kind, real, _ = _mat_element(body, pos, order)
    shape = tuple(np.frombuffer(dims, order + "i4"))
    values = np.frombuffer(real, order + MAT_TYPES[kind]).astype(MAT_CLASSES[cls])
    arrays[name.decode("ascii")] = values.reshape(shape, order="F")


def write_image(path, image, compress_level=1):
    """Write a float tensor (3, H, W) in [0, 1] or a uint8 array (H, W, 3) to an image file
    (PNG compress_level 0..9: 1 is fast; 0 is faster still for noisy images that barely compress)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, compress_level=compress_level)


def write_label(path, labels):
    """Write an integer map (H, W) >= 0 as a PNG: 8-bit when all values < 256, else 16-bit."""
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels.min() < 0 or labels.max() > 65535:
        raise BadInput(f"{path}: cannot write labels: values must be in 0..65535, got {labels.min()}..{labels.max()}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if labels.max() < 256:
        Image.fromarray(labels.astype(np.uint8)).save(path, compress_level=1)
    else:
        Image.fromarray(labels.astype(np.uint16)).save(path, compress_level=1)


# --------------------------------------------------------------------------------------------
# 3. Paired transforms (sample dict -> sample dict)
# --------------------------------------------------------------------------------------------

# Training resolutions (H, W) of Robusta's generators, Table A2 (G_coarse) and Table A3 (G_fine).
# "resize" is the resize resolution, "crop" the random crop (None = no crop). The paper writes
# W x H for Cityscapes (512 x 256).
RESOLUTIONS = {  # Table A2, Table A3
    #                 Table A2 (G_coarse)                    Table A3 (G_fine)
    "ade20k":        {"coarse": ((286, 286), (256, 256)), "fine": ((256, 256), None)},
    "ade20k-outdoor": {"coarse": ((256, 256), None),      "fine": ((256, 256), None)},
    "cityscapes":    {"coarse": ((256, 512), None),       "fine": ((256, 512), None)},
    "coco-stuff":    {"coarse": ((286, 286), (256, 256)), "fine": ((286, 286), (256, 256))},
    "kaist":         {"coarse": ((256, 256), None),       "fine": ((256, 256), None)},
}

IMAGE_KEYS = ("image",)
# what label-like maps are padded with when a crop leaves the image (trainIds: ignore)
LABEL_PAD = {"labels": IGNORE_INDEX, "label_ids": 0, "instance": 0, "anomaly": 255}


def _resize_sample(sample, size, labels=True):
    """Resize the images of a sample to size=(H, W) (bilinear, antialiased) and, unless labels=False,
    its label-like maps (nearest); each map independently of the size it has."""
    out = dict(sample)
    for key, value in sample.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape[-2:]) == tuple(size):
            continue
        if key in IMAGE_KEYS:
            out[key] = F.interpolate(value[None], size=size, mode="bilinear", align_corners=False,
                                     antialias=True)[0].clamp_(0, 1)
        elif key in LABEL_PAD and labels:
            out[key] = F.interpolate(value[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(value.dtype)
    return out


class Resize:
    """Resize every map of a sample to size=(H, W): bilinear (antialiased) images, nearest labels."""

    def __init__(self, size):
        self.size = tuple(size)

    def __call__(self, sample):
        return _resize_sample(sample, self.size)


class RandomScaleCrop:
    """Random rescale by a factor in `scale`, then a random crop=(H, W); where the crop leaves the
    image, images are padded with 0 and label maps with LABEL_PAD (trainIds with 255)."""

    def __init__(self, crop, scale=(0.5, 2.0), generator=None):
        self.crop, self.scale, self.generator = tuple(crop), scale, generator

    def _uniform(self, low, high):
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def __call__(self, sample):
        h, w = sample["image"].shape[-2:] if "image" in sample else sample["labels"].shape[-2:]
        s = self._uniform(*self.scale)
        sample = _resize_sample(sample, (max(1, round(h * s)), max(1, round(w * s))))
        h, w = sample["image"].shape[-2:] if "image" in sample else sample["labels"].shape[-2:]
        ch, cw = self.crop
        top = int(self._uniform(0, max(h - ch, 0) + 1 - 1e-9))
        left = int(self._uniform(0, max(w - cw, 0) + 1 - 1e-9))
        out = dict(sample)
        for key, value in sample.items():
            if key in IMAGE_KEYS or key in LABEL_PAD:
                pad = 0 if key in IMAGE_KEYS else LABEL_PAD[key]
                canvas = torch.full((*value.shape[:-2], ch, cw), pad, dtype=value.dtype)
                part = value[..., top:top + ch, left:left + cw]
                canvas[..., :part.shape[-2], :part.shape[-1]] = part
                out[key] = canvas
        return out


class RandomFlip:
    """Horizontal flip of every map with probability p."""

    def __init__(self, p=0.5, generator=None):
        self.p, self.generator = p, generator

    def __call__(self, sample):
        if torch.rand((), generator=self.generator).item() >= self.p:
            return sample
        return {k: v.flip(-1) if (k in IMAGE_KEYS or k in LABEL_PAD) else v for k, v in sample.items()}


class Compose:
    """Apply paired transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, sample):
        for t in self.transforms:
            sample = t(sample)
        return sample


# --------------------------------------------------------------------------------------------
# 4. Dataset readers
# --------------------------------------------------------------------------------------------

def _require(path, dataset, layout, published=None):
    """Raise one clear MissingFile when a path of a dataset's layout is missing: the path, the
    layout expected and where the dataset is published (written to read well on one line too)."""
    if not Path(path).exists():
        where = f";\n  the dataset is published at {published}" if published else ""
        raise MissingFile(f"{dataset}: missing {path};\n  expected layout: {layout}{where}")


def _files(folder, pattern):
    return sorted(Path(folder).rglob(pattern))


def _table(pairs, fill=-1):
    """A (256,) int64 lookup raw value -> value, `fill` for raw values not in `pairs`."""
    table = torch.full((256,), fill, dtype=torch.int64)
    for raw, value in pairs:
        table[raw] = value
    return table


# raw label value -> Cityscapes label id (-1: not a valid value) for datasets stored in Cityscapes ids
CITYSCAPES_IDS = _table((l.id, l.id) for l in LABELS if l.id >= 0)


def _valid_values(raw, id_table, path, dataset):
    """Raw label values (H, W) (an integer array or tensor) as uint8, after checking that each is in
    the table (in 0..255 with id_table >= 0); else BadInput naming the file and the values."""
    raw, id_table = np.asarray(raw), np.asarray(id_table)
    if raw.dtype == np.uint8 or (raw.min() >= 0 and raw.max() <= 255):
        raw = raw.astype(np.uint8, copy=False)
        if not (id_table < 0)[raw].any():
            return raw
    bad = (raw < 0) | (raw > 255) | (id_table[np.clip(raw, 0, 255)] < 0)
    raise BadInput(f"{path}: label values outside the {dataset} label table: {np.unique(raw[bad])[:20].tolist()}")


def encode_labels(raw, id_table, train_table, path, dataset="Cityscapes"):
    """Raw label values (H, W) (an integer array or tensor) -> (label ids, trainIds) int64 tensors by
    the (256,) lookup tables; a value outside the table (not in 0..255, or id_table < 0) raises
    BadInput naming the file and the values."""
    raw = _valid_values(raw, id_table, path, dataset)
    return torch.from_numpy(np.asarray(id_table)[raw]), torch.from_numpy(np.asarray(train_table)[raw])


def _size_mismatch(s, image_shape, label_shape):
    (h, w), (lh, lw) = image_shape, label_shape
    return f"{s['image']}: size mismatch image {h}x{w} vs label {lh}x{lw} ({s['label']})"


def _verified_shape(path):
    """(H, W) of an image file, checked the cheapest way that still finds truncated and corrupted
    files: a PNG's chunks against their CRCs (Pillow's verify, without inflating the pixels), a JPEG
    decoded at 1/8 scale (draft mode: every byte is still read and entropy-decoded), others decoded."""
    img = _open_lazy(path)
    w, h = img.size
    try:
        if img.format == "PNG":
            img.verify()
        else:
            img.draft(None, (max(1, w // 8), max(1, h // 8)))
            img.load()
    except PIL_ERRORS as e:
        raise BadInput(f"{path}: cannot read image ({_one_line(e)})") from e
    return h, w


def _names_in(listing):
    """Image names listed in a text file, one per line (folders and extension ignored)."""
    return {Path(line.strip()).stem for line in Path(listing).read_text().splitlines() if line.strip()}


def _keep_listed(samples, names, source, dataset):
    """The samples whose name (or image file stem) is in `names`; warns about listed names that
    are not in the dataset (e.g. pairs removed by hand) and raises if none is."""
    kept = [s for s in samples if s["name"] in names or Path(s["image"]).stem in names]
    if not kept:
        raise BadInput(f"{dataset}: none of the {len(names)} images listed in {source} is in the dataset "
                       f"(e.g. {sorted(names)[:3]} vs {[s['name'] for s in samples[:3]]})")
    found = {s["name"] for s in kept} | {Path(s["image"]).stem for s in kept}
    missing = len(names - found)
    if missing:
        warnings.warn(f"{dataset}: {missing} of the {len(names)} images listed in {source} are not in the "
                      f"dataset; reading the {len(kept)} found", stacklevel=3)
    return kept


def _split_list(root, split, dataset, published, looked=(), note=""):
    """(names, source) of root/<split>.txt (one image name per line); MissingFile naming every place
    looked at (`looked`: those the caller tried first) when there is no such file."""
    listing = Path(root) / f"{split}.txt"
    if listing.is_file():
        return _names_in(listing), str(listing)
    places = " and ".join([*looked, str(listing)])
    raise MissingFile(f"{dataset}: no split {split!r}{note}: looked for {places};\n  split 'all' reads every "
                      "image; a split file (split_file=, --split-file) reads the images it lists, one name per line;\n"
                      f"  the dataset is published at {published}")


class SegmentationFiles(torch.utils.data.Dataset):
    """Base of the readers: a list of image / label files and the label encoding.

    `samples` are dicts with "image", "label", optional "instance" / "anomaly" paths and "name".
    A reader's label encoding is two (256,) lookup tables from the raw PNG value: `id_table` to
    the generator's label ids (-1 marks a value that may not occur) and `train_table` to the
    segmenter's trainIds (255 = ignore). `num_ids` is the one-hot width of label ids, `num_classes`
    the number of trainIds.

    Options of every reader:
    - size: (H, W) resizes the image (bilinear) and the label maps (nearest); an int is the shorter
      side of a resize that keeps the aspect ratio (`keep_aspect` readers, Mapillary, always keep it).
    - full_labels: `size` resizes the image only; the label maps ("labels", "label_ids", "anomaly",
      "instance") keep the file's resolution (evaluation upsamples the logits to them).
    - skip_bad: a sample that cannot be read (unreadable or truncated file, label values outside
      the table, image/label size mismatch with no size set) is returned as
      {"name": str, "bad": "<file>: <problem>"} instead of raising (the trainers drop and log it).
    - split_file: keep only the samples listed in this text file (one image name per line).
    With a size set, an image/label size mismatch (GTA5 has such pairs) is repaired with or without
    skip_bad: both are resized independently to the size and the sample carries
    "repaired": "<file>: size mismatch image HxW vs label hxw (<label>), resized independently"
    (with full_labels: "..., image resized, label kept")."""

    num_ids, num_classes, class_names = NUM_IDS, NUM_CLASSES, CLASS_NAMES
    id_table, train_table = CITYSCAPES_IDS, ID_TO_TRAINID
    keep_aspect = False

    def __init__(self, samples, size=None, transform=None, skip_bad=False, full_labels=False, split_file=None):
        def positive(v):
            return isinstance(v, (int, np.integer)) and v > 0
        if size is not None and not (positive(size) or isinstance(size, (tuple, list)) and len(size) == 2
                                     and all(map(positive, size))):
            raise BadInput(f"{type(self).__name__}: size must be (H, W) or a shorter side, positive ints; got {size!r}")
        if split_file is not None:
            if not Path(split_file).is_file():
                raise MissingFile(f"{type(self).__name__}: split file {split_file} not found "
                                  "(a text file of image names, one per line)")
            samples = _keep_listed(samples, _names_in(split_file), split_file, type(self).__name__)
        self.samples, self.size, self.transform = samples, size, transform
        self.skip_bad, self.full_labels = skip_bad, full_labels

    def __len__(self):
        return len(self.samples)

    def read_raw_label(self, path):
        """The label file's values, numpy (H, W)."""
        return _label_array(path)

    def encode(self, raw, path):
        return encode_labels(raw, self.id_table, self.train_table, path, type(self).__name__)

    def extra(self, s, raw):
        """Instance and anomaly maps, where the dataset has them."""
        out = {}
        if "instance" in s:
            out["instance"] = read_label(s["instance"])
        if "anomaly" in s:
            out["anomaly"] = torch.from_numpy(_label_array(s["anomaly"]).astype(np.uint8))
        return out

    def output_size(self, shape):
        """The (H, W) that `size` gives an image of shape (h, w)."""
        shorter_side = isinstance(self.size, (int, np.integer))
        if not (shorter_side or self.keep_aspect):
            return tuple(self.size)
        short = int(self.size) if shorter_side else min(self.size)
        h, w = shape
        if h <= w:
            return short, max(1, round(w * short / h))
        return max(1, round(h * short / w)), short

    def read(self, s):
        """The sample of the files `s` (one entry of `samples`), resized; raises on bad data."""
        image = read_image(s["image"])
        raw = self.read_raw_label(s["label"])
        label_ids, labels = self.encode(raw, s["label"])
        sample = {"image": image, "label_ids": label_ids, "labels": labels, "name": s["name"]}
        sample.update(self.extra(s, raw))
        if raw.shape[-2:] != image.shape[-2:]:
            problem = _size_mismatch(s, image.shape[-2:], raw.shape[-2:])
            if self.size is None:
                raise BadInput(problem)
            sample["repaired"] = problem + (", image resized, label kept" if self.full_labels else
                                            ", resized independently")
        if self.size is not None:
            sample = _resize_sample(sample, self.output_size(image.shape[-2:]), labels=not self.full_labels)
        return sample

    def __getitem__(self, index):
        s = self.samples[index]
        try:
            sample = self.read(s)
        except UserError as e:
            if not self.skip_bad:
                raise
            return {"name": s["name"], "bad": _one_line(e)}
        return self.transform(sample) if self.transform is not None else sample

    def check(self, index):
        """The problems of sample `index`, each "<file>: <problem>" (see `check_split`)."""
        s, problems, shape = self.samples[index], [], None
        try:
            shape = _verified_shape(s["image"])
        except UserError as e:
            problems.append(_one_line(e))
        try:
            raw = _valid_values(self.read_raw_label(s["label"]), self.id_table, s["label"], type(self).__name__)
            self.extra(s, raw)
            if shape is not None and tuple(raw.shape[-2:]) != shape:
                problems.append(_size_mismatch(s, shape, raw.shape[-2:]))
        except UserError as e:
            problems.append(_one_line(e))
        return problems


def _pairs(dataset, images_dir, labels_dir, image_pattern, label_path, layout, published):
    """Samples for every image under images_dir matching image_pattern; label_path(image) names its
    label file. Checks the layout and raises one clear error naming what is missing."""
    for p in (images_dir, labels_dir):
        _require(p, dataset, layout, published)
    samples = []
    for img in _files(images_dir, image_pattern):
        label = label_path(img)
        _require(label, dataset, layout, published)
        samples.append({"image": img, "label": label, "name": img.stem})
    if not samples:
        raise MissingFile(f"{dataset}: no {image_pattern} files under {images_dir};\n  expected layout: {layout};\n"
                          f"  the dataset is published at {published}")
    return samples


CITYSCAPES_URL = "https://www.cityscapes-dataset.com/downloads/ (leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip)"


class Cityscapes(SegmentationFiles):
    """Cityscapes (Cordts et al., 2016), and every ToyCity tree.

    root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
    root/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png    (label ids 0..33)
    root/gtFine/<split>/<city>/<stem>_gtFine_instanceIds.png (16-bit: id * 1000 + k for instances)
    root/gtFine/<split>/<city>/<stem>_gtFine_anomaly.png     (ToyCity's outlier domain only)"""

    LAYOUT = ("root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png,\n"
              "    root/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png (+ _instanceIds.png)")

    def __init__(self, root, split="train", size=None, transform=None, skip_bad=False, full_labels=False,
                 split_file=None):
        root = Path(root)
        images_dir, labels_dir = root / "leftImg8bit" / split, root / "gtFine" / split

        def label_path(img):
            return labels_dir / img.parent.name / img.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        samples = _pairs("Cityscapes", images_dir, labels_dir, "*_leftImg8bit.png", label_path, self.LAYOUT,
                         CITYSCAPES_URL)
        for s in samples:
            s["name"] = s["name"][: -len("_leftImg8bit")]
            for key, suffix in (("instance", "instanceIds"), ("anomaly", "anomaly")):
                path = Path(str(s["label"]).replace("_labelIds.png", f"_{suffix}.png"))
                if path.exists():
                    s[key] = path
        super().__init__(samples, size, transform, skip_bad, full_labels, split_file)


class GTA5(SegmentationFiles):
    """GTA5 (Richter et al., 2016) as the download unpacks: root/images/00001.png, root/labels/00001.png
    (palette PNGs of Cityscapes label ids). split="all" (the default) reads every image, as domain
    generalisation from GTA5 trains on; "train" / "val" / "test" read the official split,
    root/split.mat (trainIds / valIds / testIds, image numbers), else the names listed in
    root/<split>.txt. A few pairs differ in size: see SegmentationFiles for how a size set
    repairs them, `check_split` for listing them."""

    LAYOUT = "root/images/<n>.png, root/labels/<n>.png (Cityscapes label ids)"
    URL = "https://download.visinf.tu-darmstadt.de/data/from_games/"

    def __init__(self, root, split="all", size=None, transform=None, skip_bad=False, full_labels=False,
                 split_file=None):
        root = Path(root)
        samples = _pairs("GTA5", root / "images", root / "labels", "*.png", lambda p: root / "labels" / p.name,
                         self.LAYOUT, self.URL)
        if split != "all":
            samples = _keep_listed(samples, *self.split_names(root, split), "GTA5")
        super().__init__(samples, size, transform, skip_bad, full_labels, split_file)

    def split_names(self, root, split):
        """(names, source) of the official split in root/split.mat, else of root/<split>.txt."""
        mat, key = root / "split.mat", f"{split}Ids"
        arrays = read_mat(mat) if mat.is_file() else {}
        if key in arrays:
            return {f"{int(i):05d}" for i in arrays[key].ravel()}, f"{mat} ({key})"
        return _split_list(root, split, "GTA5", self.URL, looked=[f"{mat} ({key})"])


# SYNTHIA class -> Cityscapes trainId (SYNTHIA-RAND-CITYSCAPES README; as in AdaptSegNet/ADVENT).
# SYNTHIA has no terrain, truck or train: the 16-class evaluation (ASH Tables 2, 3) leaves them out.
SYNTHIA_TO_TRAINID = {1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17, 15: 6,
                      16: 9, 17: 12, 18: 14, 19: 15, 20: 16, 21: 3}


class Synthia(SegmentationFiles):
    """SYNTHIA-RAND-CITYSCAPES (Ros et al., 2016): root/RGB/<n>.png, root/GT/LABELS/<n>.png. Labels are
    16-bit 3-channel PNGs with the class in the first channel (instance in the second); classes map
    to Cityscapes by SYNTHIA_TO_TRAINID (others: ignore). SYNTHIA has no official split:
    split="all" (the default) reads every image, another split the names in root/<split>.txt."""

    LAYOUT = "root/RGB/<n>.png, root/GT/LABELS/<n>.png (16-bit, class in channel 0)"
    URL = "https://synthia-dataset.net/downloads/ (SYNTHIA-RAND-CITYSCAPES)"
    train_table = _table(((k, v) for k, v in SYNTHIA_TO_TRAINID.items()), IGNORE_INDEX)
    id_table = _table([(k, 0) for k in range(23)] + [(k, int(TRAINID_TO_ID[v])) for k, v in SYNTHIA_TO_TRAINID.items()])

    def __init__(self, root, split="all", size=None, transform=None, skip_bad=False, full_labels=False,
                 split_file=None):
        root = Path(root)
        labels = root / "GT" / "LABELS"
        samples = _pairs("SYNTHIA", root / "RGB", labels, "*.png", lambda p: labels / p.name, self.LAYOUT, self.URL)
        if split != "all":
            names = _split_list(root, split, "SYNTHIA", self.URL, note=" (SYNTHIA has no official split)")
            samples = _keep_listed(samples, *names, "SYNTHIA")
        super().__init__(samples, size, transform, skip_bad, full_labels, split_file)

    def read_raw_label(self, path):
        return read_png16_rgb(path)[0].numpy()


# Mapillary Vistas v1.2 class -> Cityscapes trainId, the mapping used by domain-generalisation
# benchmarks (e.g. tue-mps/benchmark-vfm-ss); other classes: ignore.
MAPILLARY_TO_TRAINID = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7, 30: 8,
                        29: 9, 27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17,
                        52: 18}


class Mapillary(SegmentationFiles):
    """Mapillary Vistas v1.2 (Neuhold et al., 2017): root/{training,validation}/images/<n>.jpg and
    .../labels/<n>.png (palette PNGs of the 66 class ids), mapped to the 19 Cityscapes classes.
    Images vary in size and aspect ratio, so a resize keeps each one's aspect ratio (our rule): the
    shorter side becomes `size` (an int) or min(size) (a pair (H, W): 512 for (512, 1024))."""

    LAYOUT = "root/{training,validation}/images/<n>.jpg, root/{training,validation}/labels/<n>.png (v1.2)"
    URL = "https://www.mapillary.com/dataset/vistas"
    SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}
    train_table = _table(((k, v) for k, v in MAPILLARY_TO_TRAINID.items()), IGNORE_INDEX)
    id_table = _table([(k, 0) for k in range(66)] + [(k, int(TRAINID_TO_ID[v])) for k, v in MAPILLARY_TO_TRAINID.items()])
    keep_aspect = True

    def __init__(self, root, split="val", size=None, transform=None, skip_bad=False, full_labels=False,
                 split_file=None):
        base = Path(root) / self.SPLITS.get(split, split)
        samples = _pairs("Mapillary Vistas", base / "images", base / "labels", "*.jpg",
                         lambda p: base / "labels" / f"{p.stem}.png", self.LAYOUT, self.URL)
        super().__init__(samples, size, transform, skip_bad, full_labels, split_file)


class ADE20K(SegmentationFiles):
    """ADE20K scene parsing (Zhou et al., 2017), root = ADEChallengeData2016:
    root/images/{training,validation}/ADE_*.jpg, root/annotations/{training,validation}/ADE_*.png
    (0 = other, 1..150 the classes). Label ids are the raw values (151 one-hot channels, 0 the
    "don't care" channel as in SPADE); trainIds are value - 1 with 0 -> 255."""

    LAYOUT = "root/images/{training,validation}/<n>.jpg, root/annotations/{training,validation}/<n>.png"
    URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
    SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}
    num_ids, num_classes, class_names = 151, 150, None
    id_table = _table((k, k) for k in range(151))
    train_table = _table([(0, IGNORE_INDEX)] + [(k, k - 1) for k in range(1, 151)], IGNORE_INDEX)

    def __init__(self, root, split="train", size=None, transform=None, skip_bad=False, full_labels=False,
                 split_file=None):
        root, sub = Path(root), self.SPLITS.get(split, split)
        labels = root / "annotations" / sub
        samples = _pairs("ADE20K", root / "images" / sub, labels, "*.jpg", lambda p: labels / f"{p.stem}.png",
                         self.LAYOUT, self.URL)
        super().__init__(samples, size, transform, skip_bad, full_labels, split_file)


class CocoStuff(SegmentationFiles):
    """COCO-Stuff 164k (Caesar et al., 2018): root/images/{train2017,val2017}/<n>.jpg and
    root/stuffthingmaps/{train2017,val2017}/<n>.png (0..181, 255 = unlabeled). TrainIds are the raw
    values; label ids map 255 to 182, the "don't care" channel (183 one-hot channels, as in SPADE)."""

    LAYOUT = "root/images/{train2017,val2017}/<n>.jpg, root/stuffthingmaps/{train2017,val2017}/<n>.png"
    URL = "https://github.com/nightrome/cocostuff (stuffthingmaps_trainval2017.zip, train2017.zip, val2017.zip)"
    SPLITS = {"train": "train2017", "val": "val2017"}
    num_ids, num_classes, class_names = 183, 182, None
    id_table = _table([(k, k) for k in range(182)] + [(255, 182)])
    train_table = _table([(k, k) for k in range(182)], IGNORE_INDEX)

    def __init__(self, root, split="train", size=None, transform=None, skip_bad=False, full_labels=False,
                 split_file=None):
        root, sub = Path(root), self.SPLITS.get(split, split)
        labels = root / "stuffthingmaps" / sub
        samples = _pairs("COCO-Stuff", root / "images" / sub, labels, "*.jpg", lambda p: labels / f"{p.stem}.png",
                         self.LAYOUT, self.URL)
        super().__init__(samples, size, transform, skip_bad, full_labels, split_file)


class BDD100K(SegmentationFiles):
    """BDD100K semantic segmentation (Yu et al., 2020): root/images/10k/{train,val}/<n>.jpg and
    root/labels/sem_seg/masks/{train,val}/<n>.png (Cityscapes trainIds, 255 = ignore)."""

    LAYOUT = "root/images/10k/{train,val}/<n>.jpg, root/labels/sem_seg/masks/{train,val}/<n>.png (trainIds)"
    URL = "https://bdd-data.berkeley.edu/ (10K Images, Segmentation labels)"
    id_table = _table([(t, int(TRAINID_TO_ID[t])) for t in range(19)] + [(255, 0)])
    train_table = _table([(t, t) for t in range(19)], IGNORE_INDEX)

    def __init__(self, root, split="train", size=None, transform=None, skip_bad=False, full_labels=False,
                 split_file=None):
        root = Path(root)
        labels = root / "labels" / "sem_seg" / "masks" / split
        samples = _pairs("BDD100K", root / "images" / "10k" / split, labels, "*.jpg",
                         lambda p: labels / f"{p.stem}.png", self.LAYOUT, self.URL)
        super().__init__(samples, size, transform, skip_bad, full_labels, split_file)


# StreetHazards PNG value -> Cityscapes label id. Values are the classes + 1 (the official loader
# subtracts 1): 1 unlabeled, 2 building, 3 fence, 4 other, 5 pedestrian, 6 pole, 7 road line,
# 8 road, 9 sidewalk, 10 vegetation, 11 car, 12 wall, 13 traffic sign, 14 anomaly.
STREETHAZARDS_ANOMALY = 14
STREETHAZARDS_TO_ID = {0: 0, 1: 0, 2: 11, 3: 13, 4: 4, 5: 24, 6: 17, 7: 7, 8: 7, 9: 8,
                       10: 21, 11: 26, 12: 12, 13: 20, 14: 0}


class StreetHazards(SegmentationFiles):
    """StreetHazards (Hendrycks et al., 2022): root/train/images/{training,validation}/<town>/<n>.png,
    root/test/images/test/<town>/<n>.png, annotations in the same places under annotations/.
    Classes map to Cityscapes ids (road line -> road, other -> static); the anomaly class becomes
    "anomaly" = 1 (0 on the 19 classes, 255 elsewhere) and is ignored in trainIds."""

    LAYOUT = ("root/train/{images,annotations}/{training,validation}/<town>/<n>.png,\n"
              "    root/test/{images,annotations}/test/<town>/<n>.png")
    URL = "https://github.com/hendrycks/anomaly-seg (streethazards_train.tar, streethazards_test.tar)"
    SPLITS = {"train": ("train", "training"), "val": ("train", "validation"), "test": ("test", "test")}
    id_table = _table(STREETHAZARDS_TO_ID.items())
    train_table = ID_TO_TRAINID[id_table.clamp(0)]

    def __init__(self, root, split="test", size=None, transform=None, skip_bad=False, full_labels=False,
                 split_file=None):
        if split not in self.SPLITS:
            raise BadInput(f"StreetHazards: split must be one of {sorted(self.SPLITS)}, got {split!r}")
        part, sub = self.SPLITS[split]
        base = Path(root) / part
        images, labels = base / "images" / sub, base / "annotations" / sub
        samples = _pairs("StreetHazards", images, labels, "*.png", lambda p: labels / p.relative_to(images),
                         self.LAYOUT, self.URL)
        super().__init__(samples, size, transform, skip_bad, full_labels, split_file)

    def extra(self, s, raw):
        anomaly = np.full(raw.shape, 255, np.uint8)
        anomaly[self.train_table.numpy()[raw] != IGNORE_INDEX] = 0
        anomaly[raw == STREETHAZARDS_ANOMALY] = 1
        return {"anomaly": torch.from_numpy(anomaly)}


class StyleFolder(torch.utils.data.Dataset):
    """Every image under root, recursively (Painter by Numbers, ImageNet, ToyCity paintings, ...):
    {"image": (3, H, W) in [0, 1], "name": path relative to root}; size=(H, W) resizes.
    Painter by Numbers as downloaded: files that are not images (by extension) are ignored; huge,
    truncated, CMYK, greyscale, 16-bit, palette and transparent paintings are read by
    `read_style_image` (the longer side brought down to max_side, raised to max(size) if larger);
    a file that still cannot be read is skipped with one warning naming it, the next readable file
    taking its place."""

    def __init__(self, root, size=None, max_side=STYLE_MAX_SIDE):
        root = Path(root)
        _require(root, "style images", "root/**/<n>.{jpg,png,...}",
                 "https://www.kaggle.com/c/painter-by-numbers (train.zip), or any image folder")
        self.root, self.size = root, size
        self.max_side = max(max_side, *size) if size is not None else max_side
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        self.unreadable = set()
        if not self.files:
            raise MissingFile(f"style images: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        for k in range(len(self.files)):
            path = self.files[(index + k) % len(self.files)]
            if path in self.unreadable:
                continue
            try:
                image = read_style_image(path, self.max_side)
            except UserError as e:
                self.unreadable.add(path)
                warnings.warn(f"style images: skipping {_one_line(e)}", stacklevel=2)
                continue
            sample = {"image": image, "name": str(path.relative_to(self.root))}
            return _resize_sample(sample, tuple(self.size)) if self.size is not None else sample
        raise BadInput(f"style images: none of the {len(self.files)} image files under {self.root} can be read")

    def check(self, index):
        """The problem of image `index` as a one-item list ([] if readable; see `check_split`)."""
        try:
            read_style_image(self.files[index], self.max_side)
        except UserError as e:
            return [_one_line(e)]
        return []


class LabelFolder(torch.utils.data.Dataset):
    """Label-id PNGs under root, recursively (e.g. edited label maps to generate from):
    {"label_ids", "labels", "name"}. In a Cityscapes gtFine tree only *_labelIds.png are read."""

    def __init__(self, root, size=None):
        root = Path(root)
        _require(root, "label folder", "root/**/<n>.png (Cityscapes label ids)")
        files = sorted(root.rglob("*.png"))
        ids_only = [p for p in files if p.name.endswith("_labelIds.png")]
        self.files, self.size = ids_only or files, size
        if not self.files:
            raise MissingFile(f"label folder: no .png label maps under {root}")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        ids, labels = encode_labels(read_label(path), CITYSCAPES_IDS, ID_TO_TRAINID, path)
        sample = {"label_ids": ids, "labels": labels, "name": path.name[: -len(".png")].replace("_gtFine_labelIds", "")}
        return _resize_sample(sample, tuple(self.size)) if self.size is not None else sample


# `python data.py check --dataset NAME`: name -> reader
READERS = {"cityscapes": Cityscapes, "gta5": GTA5, "synthia": Synthia, "mapillary": Mapillary, "ade20k": ADE20K,
           "coco-stuff": CocoStuff, "bdd100k": BDD100K, "streethazards": StreetHazards, "style": StyleFolder}


def check_split(dataset, threads=None, log=print):
    """Pass over every sample of a reader (any SegmentationFiles reader, or a StyleFolder) and list its
    problems, each "<file>: <problem>", in sample order: unreadable or truncated files, image/label
    size mismatches, label values outside the dataset's table. Decodes no more than that needs:
    label maps fully (their values are checked), images as `_verified_shape` says (PNG: CRCs only,
    JPEG: at 1/8 scale); in `threads` threads (Pillow and zlib release the GIL). `log` (print; None: silent) gets every problem and a
    summary line with the time per thousand images. The trainers' --check-data calls it."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        problems = [p for found in pool.map(dataset.check, range(len(dataset))) for p in found]
    seconds = time.perf_counter() - start
    if log is not None:
        for p in problems:
            log(p)
        log(f"check {type(dataset).__name__}: {len(dataset)} samples, {len(problems)} problems, {seconds:.1f} s "
            f"({1000 * seconds / max(len(dataset), 1):.1f} s per 1000 images)")
    return problems


# --------------------------------------------------------------------------------------------
# 5. Corruptions (Hendrycks & Dietterich, ICLR 2019; Cityscapes-C as in Michaelis et al., 2019)
# --------------------------------------------------------------------------------------------
# Parameter tables per severity 1..5 are those of the `imagecorruptions` package (bethgelab),
# which adapts ImageNet-C to images of any size; they build Corrupted-Cityscapes (Robusta
# Table A10). Everything works on float arrays (H, W, 3) in [0, 1] with numpy / torch / Pillow;
# the randomness comes from one numpy Generator seeded by `seed`.

SEVERITY_PARAMS = {
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],                             # std
    "shot_noise": [60, 25, 12, 5, 3],                                             # photons per unit
    "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],                              # salt & pepper amount
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],          # disk radius, alias blur
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],  # sigma, max delta, iterations
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],               # radius, sigma
    "zoom_blur": [(1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)],  # max zoom, step
    "snow": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
    "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],        # image weight, frost weight
    "fog": [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)],              # strength, wibble decay
    "spatter": [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)],      # ..., 0 = water, 1 = mud
    "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],                                      # added to HSV value
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],                                       # contrast factor
    "elastic_transform": [0.05, 0.065, 0.085, 0.1, 0.12],                         # alpha / 250
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],                                       # downscale factor
    "jpeg_compression": [25, 18, 15, 10, 7],                                      # JPEG quality
}


def _gaussian_blur(image, sigma):
    """Separable Gaussian blur of a float array (H, W, C) by shifted sums, reflect padding;
    sigma is a number or (sigma_y, sigma_x)."""
    sy, sx = (sigma, sigma) if np.isscalar(sigma) else sigma
    H, W = image.shape[:2]
    for axis, n, s in ((1, W, sx), (0, H, sy)):
        if s <= 0:
            continue
        r = max(1, int(math.ceil(3 * s)))
        k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * s ** 2))
        k = (k / k.sum()).astype(np.float32)
        pad = [(0, 0)] * image.ndim
        pad[axis] = (r, r)
        p = np.pad(image, pad, mode="reflect" if r < n else "edge")
        image = sum(k[i] * (p[:, i:i + W] if axis == 1 else p[i:i + H]) for i in range(2 * r + 1))
    return image


def _value_noise(rng, size, cell):
    """Smooth noise of unit variance whose features are about `cell` pixels wide."""
    H, W = size
    if cell == 1:
        return rng.standard_normal(size, dtype=np.float32)
    g = torch.from_numpy(rng.standard_normal((H // cell + 2, W // cell + 2), dtype=np.float32))
    n = F.interpolate(g[None, None], size=(H + 2 * cell, W + 2 * cell), mode="bilinear", align_corners=False)
    n = n[0, 0, cell:cell + H, cell:cell + W].numpy()
    return n / (n.std() + 1e-6)


def _motion_blur(x, radius, sigma, angle):
    """Blur (H, W, C) along a line at `angle` degrees: a one-sided Gaussian-weighted sum of copies
    shifted by up to 2 * radius pixels, the border repeated (as imagecorruptions' motion blur)."""
    H, W = x.shape[:2]
    width = 2 * radius + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).astype(np.float32)
    sin, cos = np.sin(np.deg2rad(angle)), np.cos(np.deg2rad(angle))
    shifts = [(-math.ceil(i * cos - 0.5), -math.ceil(i * sin - 0.5)) for i in range(width)]
    shifts = [(dx, dy) for dx, dy in shifts if abs(dx) < W and abs(dy) < H]
    p = max(max(abs(dx), abs(dy)) for dx, dy in shifts)
    padded = np.pad(x, ((p, p), (p, p), (0, 0)), mode="edge")
    out = np.zeros_like(x)
    for i, (dx, dy) in enumerate(shifts):                     # out(y, x) += k_i * x(y - dy, x - dx)
        out += k[i] * padded[p - dy: p - dy + H, p - dx: p - dx + W]
    return out


def _convolve(x, kernel):
    """2-D convolution of each channel of (H, W, C) with a small kernel, by FFT, reflect padding."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    p = np.pad(x, ((ph, ph), (pw, pw), (0, 0)), mode="reflect")
    shape = p.shape[:2]
    spec = np.fft.rfft2(p, axes=(0, 1)) * np.fft.rfft2(kernel, s=shape)[..., None]
    out = np.fft.irfft2(spec, s=shape, axes=(0, 1))
    return out[2 * ph: 2 * ph + x.shape[0], 2 * pw: 2 * pw + x.shape[1]].astype(np.float32)


def _resize(x, size):
    """Bilinear resize of (H, W, C) to size=(H', W')."""
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)


def _clipped_zoom(x, factor):
    """Zoom into the centre of (H, W, C) by `factor`, keeping the size."""
    H, W = x.shape[:2]
    ch, cw = int(math.ceil(H / factor)), int(math.ceil(W / factor))
    top, left = (H - ch) // 2, (W - cw) // 2
    return _resize(x[top:top + ch, left:left + cw], (H, W))


def _plasma_fractal(size, decay, rng):
    """Diamond-square height map (size x size, size a power of 2) in [0, 1]: the fog texture."""
    m = np.zeros((size, size), np.float64)
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = m[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        m[half:size:step, half:size:step] = square / 4 + wibble * rng.uniform(-wibble, wibble, square.shape)
        centres = m[half:size:step, half:size:step]
        grid = m[0:size:step, 0:size:step]
        s1 = centres + np.roll(centres, 1, axis=0) + grid + np.roll(grid, -1, axis=1)
        m[0:size:step, half:size:step] = s1 / 4 + wibble * rng.uniform(-wibble, wibble, s1.shape)
        s2 = centres + np.roll(centres, 1, axis=1) + grid + np.roll(grid, -1, axis=0)
        m[half:size:step, 0:size:step] = s2 / 4 + wibble * rng.uniform(-wibble, wibble, s2.shape)
        step, wibble = half, wibble / decay
    m -= m.min()
    return (m / m.max()).astype(np.float32)


# The frost sheet after ImageNet-C's photographs (frost1-5; frost6 is never drawn): their mean grey
# levels span 0.48..0.82 and their pooled RGB means are 0.57, 0.66, 0.70 (a blue tint); our level
# range is set so that the mean change per severity matches the reference's (docs/data.md).
FROST_LEVEL, FROST_TINT, FROST_GRID = (0.48, 0.88), (0.87, 1.0, 1.07), 640


def _frost_layer(shape, rng):
    """A procedural frost sheet (H, W, 3) in [0, 1], our stand-in for ImageNet-C's frost photographs
    (not shipped): a blue-white sheet at a random grey level in the photographs' range, crossed by
    needle crystals (streaks whose direction, in six steps of 30 degrees, drifts smoothly across the
    sheet) and a soft cloudiness; drawn on a grid of at most FROST_GRID pixels (crystal sizes in
    pixels as the photographs' for images up to their size, scaled with larger images, as the
    reference's resized photographs) and resized to the image."""
    H, W = shape
    scale = min(1.0, FROST_GRID / max(H, W))
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    direction = (rng.uniform(0, 6) + 3 * _value_noise(rng, (h, w), 32)).astype(int) % 6   # (h, w) in 0..5
    seeds = rng.standard_normal((h, w, 1), dtype=np.float32) ** 2 * (rng.random((h, w, 1)) < 0.08)
    needles = np.zeros((h, w), np.float32)
    for i in range(6):
        inside = direction == i
        for angle in (30 * i, 30 * i + 180):                     # both ways along the needle
            needles[inside] += _motion_blur(seeds, 10, 5, angle)[..., 0][inside]
    needles = (needles - needles.mean()) / (needles.std() + 1e-6)
    grey = rng.uniform(*FROST_LEVEL) + 0.11 * np.clip(needles, -2, 3) + 0.06 * _value_noise(rng, (h, w), 40)
    layer = np.clip(grey[..., None] * np.array(FROST_TINT, np.float32), 0, 1)
    return layer if (h, w) == (H, W) else _resize(layer, (H, W))


def _box3(x):
    """3x3 mean of (H, W), reflected border (OpenCV's blur)."""
    H, W = x.shape
    p = np.pad(x, 1, mode="reflect")
    return sum(p[i:i + H, j:j + W] for i in range(3) for j in range(3)) / 9


def _edge_distance(inside, cap=20):
    """Euclidean distance (H, W), capped, from every pixel to the nearest boundary pixel of the
    boolean map `inside`: nearest boundary in the row, then the minimum over rows within the cap."""
    H, W = inside.shape
    p = np.pad(inside, 1, mode="edge")
    boundary = inside & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
    x = np.arange(W)
    left = np.maximum.accumulate(np.where(boundary, x, -2 * W), axis=1)
    right = np.minimum.accumulate(np.where(boundary, x, 3 * W)[:, ::-1], axis=1)[:, ::-1]
    row = np.minimum(np.minimum(x - left, right - x), cap + 1).astype(np.float32) ** 2
    d2 = row.copy()
    for dy in range(1, cap + 1):
        d2[dy:] = np.minimum(d2[dy:], row[:-dy] + dy * dy)
        d2[:-dy] = np.minimum(d2[:-dy], row[dy:] + dy * dy)
    return np.minimum(np.sqrt(d2), cap)


def _equalize_hist(u8):
    """Histogram equalisation of a uint8 map (OpenCV's equalizeHist: the lowest value -> 0)."""
    hist = np.bincount(u8.ravel(), minlength=256)
    low = hist[np.flatnonzero(hist)[0]]
    if low == u8.size:
        return u8
    return np.clip(np.round((np.cumsum(hist) - low) * 255 / (u8.size - low)), 0, 255).astype(np.uint8)[u8]


EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float32)


def _drop_shading(liquid):
    """Shading of the water drops of `liquid` (H, W) (0 outside the drops), imagecorruptions'
    chain: distance to the drop edges (capped at 20 px; the drop boundary stands in for Canny's
    edges), 3x3 blur, histogram equalisation, emboss (clipped to 0..255), 3x3 blur, times the
    drop layer, normalised to a maximum of 1."""
    drops = (liquid * 255).astype(np.uint8)
    dist = _equalize_hist(_box3(_edge_distance(drops > 0)).astype(np.uint8))
    H, W = dist.shape
    p = np.pad(dist.astype(np.float32), 1, mode="reflect")
    embossed = np.clip(np.round(sum(EMBOSS[i, j] * p[i:i + H, j:j + W] for i in range(3) for j in range(3))), 0, 255)
    m = drops * np.round(_box3(embossed))
    return m / m.max() if m.max() > 0 else m


def _gaussian_noise(x, c, rng):
    return x + rng.normal(0, c, x.shape).astype(np.float32)


def _shot_noise(x, c, rng):
    return (rng.poisson(x * c) / c).astype(np.float32)


def _impulse_noise(x, c, rng):
    hit = rng.random(x.shape) < c                                  # salt & pepper, half each, per value
    return np.where(hit, (rng.random(x.shape) < 0.5).astype(np.float32), x)


def _defocus_blur(x, c, rng):
    radius, alias = c
    r = max(8, radius)
    L = np.arange(-r, r + 1)
    disk = ((L[:, None] ** 2 + L[None, :] ** 2) <= radius ** 2).astype(np.float32)
    disk = _gaussian_blur(disk[..., None] / disk.sum(), alias)[..., 0]  # anti-aliased disk
    return _convolve(x, disk / disk.sum())


def _glass_blur(x, c, rng):
    """Blur, locally shuffle pixels, blur. Vectorised (our choice): each iteration every pixel takes
    the value of a random neighbour within max_delta, instead of the original's sequential swaps."""
    sigma, delta, iterations = c
    H, W = x.shape[:2]
    x = np.round(np.clip(_gaussian_blur(x, sigma), 0, 1) * 255) / 255
    for _ in range(iterations):
        dy, dx = rng.integers(-delta, delta, (2, H, W))
        x = x[np.clip(np.arange(H)[:, None] + dy, 0, H - 1), np.clip(np.arange(W)[None, :] + dx, 0, W - 1)]
    return _gaussian_blur(x, sigma)


def _motion_blur_corruption(x, c, rng):
    radius, sigma = c
    return _motion_blur(x, radius, sigma, rng.uniform(-45, 45))


def _zoom_blur(x, c, rng):
    top, step = c
    zooms = np.arange(1, top, step)
    return (x + sum(_clipped_zoom(x, z) for z in zooms)) / (len(zooms) + 1)


def _snow(x, c, rng):
    loc, scale, zoom, threshold, radius, sigma, mix = c
    layer = rng.normal(loc, scale, x.shape[:2] + (1,)).astype(np.float32)
    layer = _clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = _motion_blur(np.clip(layer, 0, 1), radius, sigma, rng.uniform(-135, -45))
    layer = np.round(layer * 255) / 255
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = mix * x + (1 - mix) * np.maximum(x, gray[..., None] * 1.5 + 0.5)
    return x + layer + np.rot90(layer, 2)


def _frost(x, c, rng):
    return c[0] * x + c[1] * _frost_layer(x.shape[:2], rng)


def _fog(x, c, rng):
    strength, decay = c
    size = 1 << (max(x.shape[:2]) - 1).bit_length()
    top = x.max()
    x = x + strength * _plasma_fractal(size, decay, rng)[: x.shape[0], : x.shape[1], None]
    return x * top / (top + strength)


def _spatter(x, c, rng):
    """Water drops (severities 1-3) shaded as imagecorruptions does (`_drop_shading`), or mud (4-5)."""
    loc, scale, sigma, threshold, intensity, mud = c
    liquid = _gaussian_blur(rng.normal(loc, scale, x.shape[:2] + (1,)).astype(np.float32), sigma)
    liquid[liquid < threshold] = 0
    if not mud:
        m = _drop_shading(liquid[..., 0])[..., None] * intensity
        return x + m * np.array([175, 238, 238], np.float32) / 255             # pale turquoise
    m = _gaussian_blur((liquid > threshold).astype(np.float32), intensity)
    m[m < 0.8] = 0
    return x * (1 - m) + m * np.array([63, 42, 20], np.float32) / 255          # mud brown


def _brightness(x, c, rng):
    """Add c to the HSV value channel: with hue and saturation fixed, RGB scales by V'/V."""
    v = x.max(axis=2, keepdims=True)
    v2 = np.clip(v + c, 0, 1)
    return np.where(v > 0, x * v2 / np.maximum(v, 1e-8), v2)


def _contrast(x, c, rng):
    mean = x.mean(axis=(0, 1), keepdims=True)
    return (x - mean) * c + mean


def _elastic_transform(x, c, rng):
    H, W = x.shape[:2]
    alpha, sigma, max_d = 250 * c, (H * 0.01, W * 0.01), H * 0.005
    d = rng.uniform(-max_d, max_d, (H, W, 2)).astype(np.float32)
    d = _gaussian_blur(d, sigma) * alpha                                   # (H, W, 2): dx, dy in pixels
    gx = (np.arange(W, dtype=np.float32)[None, :] + d[..., 0]) / max(W - 1, 1) * 2 - 1
    gy = (np.arange(H, dtype=np.float32)[:, None] + d[..., 1]) / max(H - 1, 1) * 2 - 1
    grid = torch.from_numpy(np.stack([gx, gy], -1))[None]
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    return out[0].numpy().transpose(1, 2, 0)


def _pil(x):
    return Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))


def _pixelate(x, c, rng):
    H, W = x.shape[:2]
    small = _pil(x).resize((max(1, int(W * c)), max(1, int(H * c))), Image.BOX)
    return np.asarray(small.resize((W, H), Image.NEAREST), np.float32) / 255


def _jpeg_compression(x, c, rng):
    buffer = io.BytesIO()
    _pil(x).save(buffer, "JPEG", quality=c)
    return np.asarray(Image.open(buffer).convert("RGB"), np.float32) / 255


CORRUPTION_FUNCTIONS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur_corruption,
    "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog, "spatter": _spatter,
    "brightness": _brightness, "contrast": _contrast, "elastic_transform": _elastic_transform,
    "pixelate": _pixelate, "jpeg_compression": _jpeg_compression,
}
CORRUPTIONS = list(CORRUPTION_FUNCTIONS)


def corrupt(image, name, severity, seed=0):
    """Corrupt a float image (3, H, W) in [0, 1] (or a batch (N, 3, H, W), image i with seed + i)
    with corruption `name` at severity 1..5 (0 returns the image); deterministic given the seed."""
    if name not in CORRUPTION_FUNCTIONS:
        raise BadInput(f"unknown corruption {name!r}; choose from {CORRUPTIONS}")
    if severity == 0:
        return image.clone()
    if not 1 <= severity <= 5:
        raise BadInput(f"severity must be 0..5, got {severity}")
    if image.dim() == 4:
        return torch.stack([corrupt(im, name, severity, seed + i) for i, im in enumerate(image)])
    x = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float32)
    out = CORRUPTION_FUNCTIONS[name](x, SEVERITY_PARAMS[name][severity - 1], np.random.default_rng(seed))  # Table A10
    out = torch.from_numpy(np.ascontiguousarray(np.clip(out, 0, 1), dtype=np.float32)).permute(2, 0, 1)
    return out.to(device=image.device, dtype=image.dtype)


# --------------------------------------------------------------------------------------------
# 6. ToyCity: procedural street scenes written as a Cityscapes tree
# --------------------------------------------------------------------------------------------
# A scene is drawn as label maps first (painter's algorithm, far objects first, so near ones
# occlude them), then an image is rendered from the label map by a per-domain renderer. Geometry
# is a pinhole camera over a flat road: a point at depth z (in camera heights, t = 1/z) and lateral
# offset u lands at x = xv + u * t * F, y = yh + (1 - v) * t * F for height v above the ground,
# with horizon yh, vanishing column xv and F = H - yh pixels per camera height at z = 1.

ID = NAME_TO_ID
# detail codes: appearance inside a class that the label map does not carry (our choice)
PLAIN, GLASS, TYRE, MARKING, LAMP, TOP, SKIN, TROUSERS, BARS, TRUNK = range(10)
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
DOMAINS = ("source", "target", "outlier")

# Object templates in object-local world units (X lateral from the centre, V height above the
# ground, both in camera heights). A part: (shape, params, label name, detail).
CAR = [("rect", (-0.55, 0.55, 0.15, 0.62), "car", PLAIN),
       ("poly", ((-0.47, 0.6), (0.47, 0.6), (0.36, 0.98), (-0.36, 0.98)), "car", PLAIN),
       ("poly", ((-0.4, 0.64), (0.4, 0.64), (0.31, 0.92), (-0.31, 0.92)), "car", GLASS),
       ("rect", (-0.52, -0.3, 0.0, 0.2), "car", TYRE), ("rect", (0.3, 0.52, 0.0, 0.2), "car", TYRE),
       ("rect", (-0.5, -0.34, 0.42, 0.52), "car", LAMP), ("rect", (0.34, 0.5, 0.42, 0.52), "car", LAMP)]
TRUCK = [("rect", (-0.75, 0.75, 0.35, 2.3), "truck", PLAIN), ("rect", (-0.75, 0.75, 0.25, 0.4), "truck", TYRE),
         ("rect", (-0.7, -0.4, 0.0, 0.3), "truck", TYRE), ("rect", (0.4, 0.7, 0.0, 0.3), "truck", TYRE),
         ("rect", (-0.7, -0.5, 0.45, 0.55), "truck", LAMP), ("rect", (0.5, 0.7, 0.45, 0.55), "truck", LAMP)]
BUS = [("rect", (-0.8, 0.8, 0.2, 2.2), "bus", PLAIN), ("rect", (-0.72, 0.72, 1.35, 1.95), "bus", GLASS),
       ("rect", (-0.72, -0.45, 0.0, 0.25), "bus", TYRE), ("rect", (0.45, 0.72, 0.0, 0.25), "bus", TYRE),
       ("rect", (-0.7, -0.5, 0.4, 0.5), "bus", LAMP), ("rect", (0.5, 0.7, 0.4, 0.5), "bus", LAMP)]
PERSON = [("line", (-0.07, 0.0, -0.05, 0.52, 0.055), "person", TROUSERS),
          ("line", (0.07, 0.0, 0.05, 0.52, 0.055), "person", TROUSERS),
          ("rect", (-0.16, 0.16, 0.5, 0.98), "person", TOP),
          ("line", (-0.17, 0.95, -0.21, 0.55, 0.04), "person", TOP),
          ("line", (0.17, 0.95, 0.21, 0.55, 0.04), "person", TOP),
          ("ellipse", (0.0, 1.08, 0.095, 0.11), "person", SKIN)]
BICYCLE = [("ring", (-0.38, 0.27, 0.27, 0.05), "bicycle", TYRE), ("ring", (0.38, 0.27, 0.27, 0.05), "bicycle", TYRE),
           ("line", (-0.38, 0.27, -0.02, 0.62, 0.025), "bicycle", PLAIN),
           ("line", (-0.02, 0.62, 0.3, 0.62, 0.025), "bicycle", PLAIN),
           ("line", (0.3, 0.62, 0.38, 0.27, 0.025), "bicycle", PLAIN),
           ("line", (-0.02, 0.62, 0.02, 0.27, 0.025), "bicycle", PLAIN),
           ("line", (0.02, 0.27, 0.3, 0.62, 0.025), "bicycle", PLAIN)]
MOTORCYCLE = [("ellipse", (-0.4, 0.25, 0.25, 0.25), "motorcycle", TYRE),
              ("ellipse", (0.4, 0.25, 0.25, 0.25), "motorcycle", TYRE),
              ("poly", ((-0.45, 0.35), (0.45, 0.35), (0.35, 0.72), (-0.25, 0.72)), "motorcycle", PLAIN)]
RIDER = [("line", (0.0, 0.62, 0.08, 0.3, 0.06), "rider", TROUSERS),
         ("line", (0.0, 0.66, 0.12, 1.05, 0.12), "rider", TOP),
         ("line", (0.12, 0.98, 0.3, 0.72, 0.04), "rider", TOP),
         ("ellipse", (0.15, 1.2, 0.09, 0.105), "rider", SKIN)]
TREE = [("rect", (-0.07, 0.07, 0.0, 1.6), "vegetation", TRUNK),
        ("ellipse", (0.0, 2.3, 0.95, 0.85), "vegetation", PLAIN),
        ("ellipse", (-0.45, 1.95, 0.55, 0.5), "vegetation", PLAIN),
        ("ellipse", (0.45, 2.0, 0.55, 0.5), "vegetation", PLAIN)]
# outlier objects (ids outside the 19 train classes) pasted into the "outlier" domain
OUTLIER_OBJECTS = {
    "dynamic": [("ellipse", (0.0, 0.35, 0.45, 0.3), "dynamic", PLAIN), ("ellipse", (0.42, 0.6, 0.17, 0.15), "dynamic", PLAIN),
                ("rect", (-0.35, -0.25, 0.0, 0.2), "dynamic", PLAIN), ("rect", (0.2, 0.3, 0.0, 0.2), "dynamic", PLAIN)],
    "caravan": [("poly", ((-0.8, 0.2), (0.8, 0.2), (0.8, 1.6), (0.6, 1.85), (-0.6, 1.85), (-0.8, 1.6)), "caravan", BARS),
                ("rect", (-0.5, 0.5, 0.0, 0.25), "caravan", TYRE)],
    "trailer": [("rect", (-0.75, 0.75, 0.25, 0.75), "trailer", BARS), ("rect", (-0.6, -0.35, 0.0, 0.3), "trailer", TYRE),
                ("rect", (0.35, 0.6, 0.0, 0.3), "trailer", TYRE)],
}


def _part_mask(shape, p, X, V, min_half):
    """Boolean mask of one template part on object-local coordinate grids X, V."""
    if shape == "rect":
        x1, x2, v1, v2 = p
        cx, hw = (x1 + x2) / 2, max((x2 - x1) / 2, min_half)
        return (np.abs(X - cx) <= hw) & (V >= v1) & (V <= v2)
    if shape == "ellipse":
        cx, cv, rx, rv = p
        return ((X - cx) / max(rx, min_half)) ** 2 + ((V - cv) / max(rv, min_half)) ** 2 <= 1
    if shape == "ring":
        cx, cv, r, w = p
        d = np.sqrt((X - cx) ** 2 + (V - cv) ** 2)
        return np.abs(d - r) <= max(w / 2, min_half)
    if shape == "line":  # a segment (x1, v1) -> (x2, v2) with half-width hw
        x1, v1, x2, v2, hw = p
        dx, dv = x2 - x1, v2 - v1
        s = np.clip(((X - x1) * dx + (V - v1) * dv) / (dx * dx + dv * dv), 0, 1)
        return (X - x1 - s * dx) ** 2 + (V - v1 - s * dv) ** 2 <= max(hw, min_half) ** 2
    if shape == "poly":  # convex, counter-clockwise in (X, V)
        m = np.ones(X.shape, bool)
        pts = list(p)
        for (xa, va), (xb, vb) in zip(pts, pts[1:] + pts[:1]):
            m &= (xb - xa) * (V - va) - (vb - va) * (X - xa) >= 0
        return m
    raise ValueError(shape)


class _Scene:
    """Label id, instance id, detail and block-variant maps of one scene, and the camera."""

    def __init__(self, size, rng):
        self.H, self.W = size
        self.yh = self.H * rng.uniform(0.36, 0.48)     # horizon row
        self.xv = self.W * rng.uniform(0.38, 0.62)     # vanishing column
        self.F = self.H - self.yh                      # pixels per camera height at depth z = 1
        self.label = np.full(size, ID["sky"], np.uint8)
        self.instance = np.full(size, ID["sky"], np.int32)
        self.detail = np.zeros(size, np.uint8)
        self.variant = np.zeros(size, np.uint8)
        self.counts = {}
        self.yy = np.arange(self.H, dtype=np.float32)[:, None] + 0.5
        self.xx = np.arange(self.W, dtype=np.float32)[None, :] + 0.5

    def new_instance(self, label_id):
        self.counts[label_id] = self.counts.get(label_id, -1) + 1
        return label_id * 1000 + self.counts[label_id]

    def draw(self, parts, u, z, scale=1.0, flip=False):
        """Draw a template standing on the ground at lateral u, depth z (far objects first)."""
        s = self.F / z * scale                        # pixels per world unit at this depth
        x0, y0 = self.xv + u * self.F / z, self.yh + self.F / z
        ext = [_part_extent(shape, p) for shape, p, _, _ in parts]
        xmin, xmax = min(e[0] for e in ext), max(e[1] for e in ext)
        vmax = max(e[3] for e in ext)
        if (xmax - xmin) * s < 1.5:
            return
        if flip:
            xmin, xmax = -xmax, -xmin
        c0, c1 = max(int(x0 + xmin * s) - 1, 0), min(int(x0 + xmax * s) + 2, self.W)
        r0, r1 = max(int(y0 - vmax * s) - 1, 0), min(int(y0) + 2, self.H)
        if c0 >= c1 or r0 >= r1:
            return
        X, V = np.broadcast_arrays((self.xx[:, c0:c1] - x0) / s * (-1 if flip else 1), (y0 - self.yy[r0:r1]) / s)
        instances = {}
        for shape, p, name, detail in parts:
            m = _part_mask(shape, p, X, V, 0.5 / s)
            if not m.any():
                continue
            lid = ID[name]
            if lid in INSTANCE_CLASS_IDS and lid not in instances:
                instances[lid] = self.new_instance(lid)
            self.label[r0:r1, c0:c1][m] = lid
            self.instance[r0:r1, c0:c1][m] = instances.get(lid, lid)
            self.detail[r0:r1, c0:c1][m] = detail
            self.variant[r0:r1, c0:c1][m] = 0

    def ground(self):
        """t = 1/z and lateral u of every pixel below the horizon (NaN above)."""
        t = (self.yy - self.yh) / self.F
        t = np.where(t > 0, t, np.nan)
        with np.errstate(invalid="ignore"):
            u = (self.xx - self.xv) / (t * self.F)
        return t, u

    def facade(self, u_plane, z_edges, heights, label_id, detail_fn=None, variants=None):
        """Vertical surfaces on the plane u = u_plane, split in depth into blocks z_edges[k]..z_edges[k+1]
        of heights[k] (0 = gap). Columns on the plane's side of the vanishing column see it."""
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (self.xx - self.xv) / (u_plane * self.F)                      # (1, W)
        z = np.where(t > 0, 1 / np.maximum(t, 1e-6), 1e6)
        k = np.clip(np.searchsorted(z_edges, z) - 1, 0, len(heights) - 1)
        inside = (z >= z_edges[0]) & (z < z_edges[-1])
        h = np.where(inside, np.asarray(heights)[k], 0.0)
        y_bot = self.yh + t * self.F
        v = (y_bot - self.yy) / (np.maximum(t, 1e-6) * self.F)              # height above ground (H, W)
        m = (v >= 0) & (v <= h) & (t > 0)
        self.label[m] = label_id
        self.instance[m] = label_id
        kk = np.broadcast_to(k, m.shape)[m]
        self.variant[m] = 0 if variants is None else np.asarray(variants)[kk]
        self.detail[m] = PLAIN if detail_fn is None else np.where(
            detail_fn(np.broadcast_to(z, m.shape)[m], v[m], kk), detail_fn.code, PLAIN)


def _part_extent(shape, p):
    """(xmin, xmax, vmin, vmax) of a template part."""
    if shape == "rect":
        return p
    if shape in ("ellipse", "ring"):
        r = p[2] + (p[3] if shape == "ring" else 0)
        rv = p[3] if shape == "ellipse" else r
        return (p[0] - r, p[0] + r, p[1] - rv, p[1] + rv)
    if shape == "line":
        x1, v1, x2, v2, hw = p
        return (min(x1, x2) - hw, max(x1, x2) + hw, min(v1, v2) - hw, max(v1, v2) + hw)
    xs, vs = zip(*p)
    return (min(xs), max(xs), min(vs), max(vs))


def _depths(rng, n, near, far):
    """n depths log-uniform in [near, far]."""
    return np.exp(rng.uniform(np.log(near), np.log(far), n))


def toycity_scene(size, rng, outlier_rng=None):
    """Draw one scene's maps. Returns a _Scene (label ids, instance ids, detail, variant)."""
    sc = _Scene(size, rng)
    H, W = size
    road = rng.uniform(0.8, 1.3)                       # half-width of the road (camera heights)
    shift = rng.uniform(-0.25, 0.25)                   # road centre relative to the camera
    side = {s: dict(walk=rng.uniform(0.4, 0.9), strip=rng.uniform(0.4, 1.2) if rng.random() < 0.5 else 0.0)
            for s in (-1, 1)}

    # far skyline just above the horizon: distant buildings and trees
    edges = np.sort(rng.integers(0, W, rng.integers(4, 12)))
    seg = np.searchsorted(edges, np.arange(W))
    heights = rng.uniform(0.01, 0.07, len(edges) + 1) * H
    kinds = np.where(rng.random(len(edges) + 1) < 0.5, ID["building"], ID["vegetation"])
    far = (sc.yy <= sc.yh) & (sc.yy >= sc.yh - heights[seg][None, :])
    sc.label[far] = np.broadcast_to(kinds[seg][None, :], far.shape)[far]
    sc.instance[far] = sc.label[far]

    # ground: road, sidewalks, terrain strips, lane markings
    t, u = sc.ground()
    below = np.broadcast_to(~np.isnan(t), u.shape)
    ur = np.where(below, u - shift, 0)
    a = np.abs(ur)
    walk = np.where(ur < 0, side[-1]["walk"], side[1]["walk"])
    g = np.where(a < road, ID["road"], np.where(a < road + walk, ID["sidewalk"], ID["terrain"]))
    sc.label[below] = g[below]
    sc.instance[below] = g[below]
    z = np.where(below, 1 / np.where(below, t, 1), 1e6)
    centre = (np.abs(ur) < 0.035) & (np.mod(z * 0.7, 1) < 0.5)
    edge_line = (a > road - 0.09) & (a < road - 0.05)
    marks = below & (z < 40) & (centre | edge_line)
    if rng.random() < 0.25:  # zebra crossing
        z0 = rng.uniform(1.5, 4)
        marks |= below & (a < road) & (z > z0) & (z < z0 + 0.9) & (np.mod(ur * 2.5, 1) < 0.5)
    sc.detail[marks] = MARKING
    tiles = below & (g == ID["sidewalk"]) & ((np.mod(z * 1.5, 1) < 0.06) | (np.mod(ur * 2.5, 1) < 0.04))
    sc.detail[tiles] = BARS

    # building facades on both sides, with windows that follow the perspective
    for s in (-1, 1):
        u_plane = shift + s * (road + side[s]["walk"] + side[s]["strip"])
        lengths = rng.uniform(1.0, 5.0, 40)
        z_edges = np.concatenate([[rng.uniform(0.2, 0.6)], rng.uniform(0.2, 0.6) + np.cumsum(lengths)])
        hs = rng.uniform(1.2, 5.0, 40) * (rng.random(40) > 0.25)
        variants = rng.integers(1, 256, 40)
        wz, wv, phase = rng.uniform(0.8, 2.0), rng.uniform(0.9, 1.6), rng.random(40)
        has_windows = rng.random(40) < 0.85

        def windows(zz, v, k, wz=wz, wv=wv, phase=phase, has_windows=has_windows):
            return (has_windows[k] & (np.abs(np.mod(zz * wz + phase[k], 1) - 0.5) < 0.22)
                    & (np.abs(np.mod(v * wv, 1) - 0.55) < 0.22) & (v > 0.7))  # 1-D: the facade's pixels
        windows.code = GLASS
        sc.facade(u_plane, z_edges, hs, ID["building"], windows, variants)

    # fences and walls along the outer edge of the sidewalks
    for s in (-1, 1):
        if rng.random() < 0.45:
            name = "fence" if rng.random() < 0.6 else "wall"
            z0 = rng.uniform(0.5, 6)
            z_edges = np.array([z0, z0 + rng.uniform(2, 15)])
            hgt = rng.uniform(0.45, 1.0) if name == "fence" else rng.uniform(0.35, 1.2)
            u_plane = shift + s * (road + side[s]["walk"])

            def bars(zz, v, k, f=rng.uniform(3, 6)):
                return (np.mod(zz * f, 1) < 0.25) | (np.abs(v - 0.8 * v.max(initial=0)) < 0.04)
            bars.code = BARS
            sc.facade(u_plane, z_edges, [hgt], ID[name], bars if name == "fence" else None)

    # objects: (depth, lateral, template, flip); drawn far to near
    objects = []
    for s in (-1, 1):
        edge = shift + s * (road + side[s]["walk"] - 0.12)
        first = rng.uniform(1.0, 4.0)
        for zp in np.arange(first, 40, rng.uniform(3.0, 7.0)):
            height = rng.uniform(2.6, 3.8)
            pole = [("rect", (-0.045, 0.045, 0.0, height), "pole", PLAIN)]
            r = rng.random()
            if r < 0.3:
                sign = rng.integers(3)
                top = height + 0.05
                shapes = [("ellipse", (0.0, top - 0.3, 0.25, 0.25), "traffic sign", PLAIN),
                          ("rect", (-0.25, 0.25, top - 0.55, top), "traffic sign", PLAIN),
                          ("poly", ((-0.28, top - 0.5), (0.28, top - 0.5), (0.0, top)), "traffic sign", PLAIN)]
                pole.append(shapes[sign])
            elif r < 0.55:
                pole += [("rect", (-0.14, 0.14, height - 0.8, height), "traffic light", PLAIN),
                         ("ellipse", (0.0, height - 0.62, 0.07, 0.07), "traffic light", LAMP),
                         ("ellipse", (0.0, height - 0.4, 0.07, 0.07), "traffic light", LAMP),
                         ("ellipse", (0.0, height - 0.18, 0.07, 0.07), "traffic light", LAMP)]
            objects.append((zp, edge, pole, False, 1.0))
        if side[s]["strip"] > 0:
            u_tree = shift + s * (road + side[s]["walk"] + side[s]["strip"] / 2)
            for zt in np.arange(rng.uniform(0.8, 3.0), 40, rng.uniform(2.0, 5.0)):
                objects.append((zt, u_tree, TREE, False, rng.uniform(0.8, 1.3)))
    for _ in range(rng.integers(1, 8)):  # cars in the lanes or parked at the kerb
        lane = rng.choice([-0.5, 0.5, -0.85, 0.85]) * road
        objects.append((_depths(rng, 1, 2.0, 30)[0], shift + lane + rng.normal(0, 0.05), CAR, False, rng.uniform(0.9, 1.1)))
    for template, p in ((TRUCK, 0.35), (BUS, 0.25)):
        if rng.random() < p:
            objects.append((_depths(rng, 1, 1.8, 25)[0], shift + rng.choice([-0.5, 0.5]) * road, template, False, 1.0))
    for _ in range(rng.integers(0, 8)):  # pedestrians on the sidewalks, some crossing
        s = rng.choice([-1, 1])
        if rng.random() < 0.15:
            ux = shift + rng.uniform(-road, road)
        else:
            ux = shift + s * (road + rng.uniform(0.1, side[s]["walk"] - 0.1))
        objects.append((_depths(rng, 1, 1.8, 25)[0], ux, PERSON, bool(rng.random() < 0.5), rng.uniform(0.85, 1.1)))
    for _ in range(rng.integers(0, 3)):  # cyclists and motorcyclists near the kerb
        vehicle = MOTORCYCLE if rng.random() < 0.3 else BICYCLE
        s = rng.choice([-1, 1])
        objects.append((_depths(rng, 1, 1.3, 20)[0], shift + s * (road - 0.3), vehicle + RIDER, s < 0, 1.0))
    if outlier_rng is not None:  # the outlier domain: objects of ids outside the 19 classes
        for _ in range(outlier_rng.integers(1, 4)):
            name = outlier_rng.choice(sorted(OUTLIER_OBJECTS))
            zo = _depths(outlier_rng, 1, 2.0, 8)[0]
            objects.append((zo, shift + outlier_rng.uniform(-0.6, 0.6) * road, OUTLIER_OBJECTS[name],
                            bool(outlier_rng.random() < 0.5), outlier_rng.uniform(0.9, 1.4)))
    for zo, uo, template, flip, scale in sorted(objects, key=lambda o: -o[0]):
        sc.draw(template, uo, zo, scale, flip)

    if rng.random() < 0.3:  # the ego vehicle's bonnet at the bottom (void)
        cx, depth = rng.uniform(0.3, 0.7) * W, rng.uniform(0.04, 0.1) * H
        hood = (sc.yy > H - depth + ((sc.xx - cx) / W) ** 2 * 2 * depth)
        sc.label[hood], sc.instance[hood], sc.detail[hood] = ID["ego vehicle"], ID["ego vehicle"], PLAIN
    return sc


def _rgb(*colours):
    return np.array(colours, np.float32) / 255


# Appearance of each domain (our choice). "source" is a saturated, flat-shaded synthetic look;
# "target" a muted, textured, lit and blurred "real" look whose hues differ class by class, so
# that colours learned on the source mislead on the target (e.g. target traffic signs take the
# source poles' blue, target sky is a pale grey no source class has).
DOMAIN_STYLE = {
    "source": dict(
        classes={"road": (150, 60, 170), "sidewalk": (250, 210, 40), "wall": (60, 200, 200), "fence": (255, 120, 0),
                 "pole": (30, 30, 210), "traffic light": (250, 0, 250), "traffic sign": (250, 250, 250),
                 "vegetation": (20, 220, 40), "terrain": (170, 255, 110), "sky": (40, 140, 255),
                 "bicycle": (250, 40, 40), "motorcycle": (250, 40, 40), "ego vehicle": (30, 30, 30),
                 "dynamic": (255, 0, 128), "building": (225, 85, 60)},
        buildings=_rgb((225, 85, 60), (240, 150, 60), (210, 70, 130), (190, 60, 60)),
        objects=_rgb((255, 0, 0), (0, 255, 255), (255, 0, 255), (0, 200, 0), (255, 255, 0), (0, 90, 255), (255, 130, 0)),
        details={GLASS: (40, 60, 120), TYRE: (15, 15, 15), MARKING: (255, 255, 255), LAMP: (255, 60, 60),
                 SKIN: (255, 200, 150), TRUNK: (140, 80, 20)},
        jitter=(0.07, 0.05), gain=0.05),
    "target": dict(
        classes={"road": (100, 98, 96), "sidewalk": (165, 158, 150), "wall": (140, 135, 122), "fence": (110, 100, 85),
                 "pole": (85, 90, 95), "traffic light": (45, 50, 45), "traffic sign": (45, 85, 175),
                 "vegetation": (70, 95, 45), "terrain": (135, 122, 82), "sky": (212, 218, 228),
                 "bicycle": (35, 35, 35), "motorcycle": (60, 60, 65), "ego vehicle": (20, 20, 25),
                 "dynamic": (150, 40, 150), "building": (150, 140, 125)},
        buildings=_rgb((150, 140, 125), (175, 120, 95), (205, 200, 188), (120, 112, 108), (160, 150, 110)),
        objects=_rgb((180, 180, 185), (30, 30, 35), (225, 225, 225), (110, 20, 25), (30, 45, 90), (90, 95, 100),
                     (60, 70, 50)),
        details={GLASS: (70, 80, 90), TYRE: (20, 20, 20), MARKING: (215, 215, 205), LAMP: (230, 200, 120),
                 SKIN: (170, 130, 110), TRUNK: (75, 60, 45)},
        jitter=(0.06, 0.02), gain=0.04),
}
# texture amplitude (fine, medium, coarse value noise) per label id in the target domain
TEXTURE = {"road": (0.12, 0.05, 0.08), "sidewalk": (0.08, 0.05, 0.06), "building": (0.06, 0.08, 0.1),
           "wall": (0.1, 0.08, 0.1), "vegetation": (0.3, 0.35, 0.15), "terrain": (0.2, 0.2, 0.15),
           "sky": (0.0, 0.03, 0.1), "fence": (0.1, 0.05, 0.0), "pole": (0.05, 0.0, 0.0), "person": (0.06, 0.05, 0.0),
           "rider": (0.06, 0.05, 0.0), "car": (0.03, 0.03, 0.0)}
GROUND_IDS = [ID["road"], ID["sidewalk"], ID["terrain"]]
CASTS_SHADOW_IDS = [ID[n] for n in ("pole", "person", "rider", "car", "truck", "bus", "bicycle", "motorcycle",
                                    "caravan", "trailer", "dynamic")]


def _member(values, ids):
    """Boolean map: values (uint8 array) in ids, by a lookup table (faster than np.isin)."""
    table = np.zeros(256, bool)
    table[list(ids)] = True
    return table[values]


def _jitter(colours, sigma, rng):
    """Per-row random change of (n, 3) colours: a brightness shift (sigma[0]) and a smaller
    per-channel shift (sigma[1]), so that grey colours stay roughly grey."""
    n = len(colours)
    return (colours + rng.normal(0, sigma[0], (n, 1)) + rng.normal(0, sigma[1], (n, 3))).astype(np.float32)


def render(sc, domain, rng):
    """Render a scene's label map in a domain's appearance -> uint8 (H, W, 3)."""
    style = DOMAIN_STYLE[domain]
    table = np.full((256, 3), 0.5, np.float32)
    for name, colour in style["classes"].items():
        table[ID[name]] = np.array(colour) / 255
    table = _jitter(table, style["jitter"], rng)                                   # per-image colour jitter
    img = np.take(table, sc.label, axis=0)                                         # (H, W, 3)

    blocks = style["buildings"][rng.integers(len(style["buildings"]), size=256)]
    blocks = _jitter(blocks, style["jitter"], rng)
    m = (sc.label == ID["building"]) & (sc.variant > 0)
    img[m] = blocks[sc.variant[m]]

    # instances (id * 1000 + k): one colour per vehicle body / clothing from the domain's object palette
    n = max(INSTANCE_CLASS_IDS) + 1
    first = style["objects"][rng.integers(len(style["objects"]), size=(n, 64))]     # (class id, k % 64, 3)
    first = _jitter(first.reshape(-1, 3), style["jitter"], rng).reshape(n, 64, 3)
    second = first[:, rng.permutation(64)] * 0.6
    is_inst = (sc.instance >= 1000) & (sc.detail != BARS)
    cls, k = sc.instance // 1000, sc.instance % 64
    body = is_inst & ((sc.detail == PLAIN) | (sc.detail == TOP))
    img[body] = first[cls[body], k[body]]
    legs = is_inst & (sc.detail == TROUSERS)
    img[legs] = second[cls[legs], k[legs]]
    detail_table = np.zeros((256, 3), np.float32)
    for code, colour in style["details"].items():
        detail_table[code] = np.array(colour) / 255
    m = _member(sc.detail, style["details"])
    img[m] = detail_table[sc.detail[m]]
    m = sc.detail == BARS
    stripes = _member(sc.label, [ID["caravan"], ID["trailer"]])
    img[m & ~stripes] *= 0.7
    img[m & stripes] = 1.0 - img[m & stripes]
    img *= 1 + rng.uniform(-style["gain"], style["gain"], 3).astype(np.float32)     # white balance

    if domain == "target":
        img = _real_look(sc, img, rng)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _real_look(sc, img, rng):
    """Target-domain texture, sky gradient, shadows, lighting, blur and sensor noise."""
    H, W = sc.label.shape
    amp = np.zeros((3, 256), np.float32)
    for name, a in TEXTURE.items():
        amp[:, ID[name]] = a
    fine, medium, coarse = (_value_noise(rng, (H, W), c) for c in (1, max(2, W // 96), max(4, W // 24)))
    texture = 1 + amp[0][sc.label] * fine + amp[1][sc.label] * medium + amp[2][sc.label] * coarse  # (H, W)
    veg = (sc.label == ID["vegetation"]) & (medium > 0.6)                           # sunlit leaves
    img[veg] = img[veg] * 0.5 + np.array([0.45, 0.45, 0.2], np.float32) * 0.5
    sky = sc.label == ID["sky"]
    haze = np.clip(sc.yy / max(sc.yh, 1), 0, 1) * np.ones((1, W), np.float32)
    img[sky] += (0.1 * haze[sky] + 0.08 * np.clip(coarse[sky], 0, None))[:, None]  # clouds, bright horizon

    shade = np.ones((H, W), np.float32)
    side = rng.choice([-1, 1])                                                      # the facades away from the sun
    away = (sc.xx - sc.xv) * side > 0
    shade[_member(sc.label, [ID["building"], ID["wall"], ID["fence"]]) & away] = rng.uniform(0.55, 0.75)
    caster = _member(sc.label, CASTS_SHADOW_IDS)
    shadow = np.zeros_like(caster)
    for k in range(1, max(2, H // 40)):
        shadow[k:, k // 2:] |= caster[:-k, : W - k // 2] if side > 0 else caster[:-k, k // 2:]
    shade[shadow & _member(sc.label, GROUND_IDS)] *= 0.55
    gx, gy = rng.uniform(-0.3, 0.3, 2)
    r2 = ((sc.xx / W - 0.5) ** 2 + (sc.yy / H - 0.5) ** 2)
    shade *= (1 + gx * (sc.xx / W - 0.5) + gy * (sc.yy / H - 0.5)) * (1 - 0.5 * r2)
    img = np.clip(img * (texture * shade)[..., None], 0, 1) ** rng.uniform(0.8, 1.25)
    img = _gaussian_blur(img, rng.uniform(0.4, 0.9) * H / 256)
    return img + 0.02 * rng.standard_normal(img.shape, dtype=np.float32)


def anomaly_mask(label_ids):
    """1 where the label id is an outlier (OUTLIER_IDS), 0 on the 19 train classes, 255 elsewhere."""
    out = np.full(label_ids.shape, 255, np.uint8)
    out[ID_TO_TRAINID.numpy()[label_ids] != IGNORE_INDEX] = 0
    out[_member(label_ids, OUTLIER_IDS)] = 1
    return out


def make_toycity(out, num_images, size=(256, 512), domain="source", seed=0, split="train", look=None):
    """Write `num_images` ToyCity scenes as a Cityscapes tree under `out`:
    leftImg8bit/<split>/toycity/<stem>_leftImg8bit.png and gtFine/<split>/toycity/<stem>_gtFine_
    {labelIds,instanceIds,color}.png (+ _anomaly.png in the outlier domain). Scene i of a split
    has the same label map in every domain ("outlier" adds pasted objects); only appearance differs.
    `look` ("source" or "target") picks the renderer; default: "source" for the source domain, else
    "target" (an outlier split in the source look isolates outliers from the domain shift)."""
    if domain not in DOMAINS:
        raise BadInput(f"domain must be one of {DOMAINS}, got {domain!r}")
    look = look or ("source" if domain == "source" else "target")
    if look not in ("source", "target"):
        raise BadInput(f"look must be 'source' or 'target', got {look!r}")
    out, city = Path(out), "toycity"

    def write_scene(i):
        key = [seed, SPLIT_CODE[split], i]
        outlier_rng = np.random.default_rng(key + [7]) if domain == "outlier" else None
        sc = toycity_scene(size, np.random.default_rng(key), outlier_rng)
        image = render(sc, look, np.random.default_rng(key + [DOMAINS.index(look) + 1]))
        stem = f"{city}_{i:06d}_000019"
        gt = out / "gtFine" / split / city / f"{stem}_gtFine_"
        write_image(out / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image,
                    compress_level=1 if look == "source" else 0)        # sensor noise barely compresses
        write_label(f"{gt}labelIds.png", sc.label)
        write_label(f"{gt}instanceIds.png", sc.instance)
        color = Image.fromarray(sc.label)                                  # palette PNG: Cityscapes colours
        color.putpalette(ID_TO_COLOR.numpy().ravel().tolist())
        color.save(f"{gt}color.png", compress_level=1)
        if domain == "outlier":
            write_label(f"{gt}anomaly.png", anomaly_mask(sc.label))

    # scenes are independent (one seed each): two threads overlap numpy work and PNG encoding
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        list(pool.map(write_scene, range(num_images)))
    return out


def painting(size, rng):
    """A procedural "painting": a gradient ground, then brush strokes (elongated ellipses with
    bristle stripes) in a random palette, softened -> uint8 (H, W, 3). Our stand-in for Painter by
    Numbers in the style-image role."""
    H, W = size
    palette = rng.random((rng.integers(3, 7), 3)).astype(np.float32) ** rng.uniform(0.5, 1.5)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    ramp = ((xx / W) * np.cos(angle) + (yy / H) * np.sin(angle))[..., None]
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min() + 1e-6)
    img = palette[0] * (1 - ramp) + palette[1] * ramp
    img = img + 0.1 * _value_noise(rng, size, max(4, W // 16))[..., None] * rng.uniform(-1, 1, 3).astype(np.float32)
    flow = rng.uniform(0, np.pi)                                                     # dominant stroke direction
    for _ in range(rng.integers(30, 90)):
        length, width = rng.uniform(0.05, 0.3) * W, rng.uniform(0.01, 0.05) * W
        cx, cy, theta = rng.uniform(0, W), rng.uniform(0, H), flow + rng.normal(0, 0.5)
        r = int(length) + 1
        y0, y1, x0, x1 = max(int(cy) - r, 0), min(int(cy) + r, H), max(int(cx) - r, 0), min(int(cx) + r, W)
        if y0 >= y1 or x0 >= x1:
            continue
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        a = dx * np.cos(theta) + dy * np.sin(theta)
        b = -dx * np.sin(theta) + dy * np.cos(theta)
        inside = (a / length) ** 2 + (b / width) ** 2 <= 1
        bristles = 0.85 + 0.15 * np.sin(b * rng.uniform(1, 3))
        colour = palette[rng.integers(len(palette))] * rng.uniform(0.7, 1.2)
        alpha = rng.uniform(0.5, 1.0)
        patch = img[y0:y1, x0:x1]
        patch[inside] = (1 - alpha) * patch[inside] + alpha * (colour * bristles[inside, None])
    img = _gaussian_blur(img, rng.uniform(0.3, 1.0) * H / 256)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_paintings(out, num_images, size=(256, 256), seed=0):
    """Write `num_images` procedural paintings out/painting_<i>.png (style images for AdaIN/ASH)."""
    out = Path(out)
    for i in range(num_images):
        write_image(out / f"painting_{i:05d}.png", painting(size, np.random.default_rng([seed, 99, i])))
    return out


TOYCITY_COUNTS = {"train": 200, "val": 50, "paintings": 100}
TOYCITY_VERSION = 3  # bump when the generator changes, so that old caches are not reused


def toycity(cache=None, size=(128, 256), seed=0, counts=None):
    """Path of a cached ToyCity root <cache>/<H>x<W>_seed<S>_v<version>, generated on first use:
    source/, target/, outlier/ are Cityscapes trees with "train" and "val" splits (the same label
    maps in source and target; outlier = those label maps with pasted outlier objects, target
    look) and paintings/ holds style images. Default cache: $TOYCITY_CACHE or
    ~/.cache/robusta-ash/toycity; `counts` overrides TOYCITY_COUNTS (tests use tiny ones).
    The tree is written to a temporary folder renamed into place at the end (a marker file
    `.complete` is written last), so an interrupted run is regenerated, never half-read."""
    counts = dict(TOYCITY_COUNTS, **(counts or {}))
    base = Path(cache or os.environ.get("TOYCITY_CACHE") or Path.home() / ".cache" / "robusta-ash" / "toycity")
    name = f"{size[0]}x{size[1]}_seed{seed}_v{TOYCITY_VERSION}"
    if counts != TOYCITY_COUNTS:
        name += "_" + "-".join(f"{k}{v}" for k, v in sorted(counts.items()))
    root = base / name
    if (root / ".complete").exists():
        return root
    print(f"ToyCity: writing {counts['train']} train + {counts['val']} val scenes per domain "
          f"and {counts['paintings']} paintings at {size[0]}x{size[1]} to {root}", flush=True)
    tmp = base / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for domain in DOMAINS:
        for split in ("train", "val"):
            make_toycity(tmp / domain, counts[split], size, domain, seed, split)
    make_paintings(tmp / "paintings", counts["paintings"], size, seed)
    (tmp / ".complete").write_text("ok\n")
    try:
        os.rename(tmp, root)                    # fails if root exists and is not empty
    except OSError:
        if (root / ".complete").exists():      # another process (e.g. another DDP rank) finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        stale = base / f".{name}.stale{os.getpid()}"
        os.rename(root, stale)                  # an interrupted run's leftovers
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, root)
    return root


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Data utilities (see the module docstring).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("toycity", help="write ToyCity: source/target/outlier Cityscapes trees + paintings")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, nargs=2, default=[256, 512], metavar=("H", "W"), help="image size")
    p.add_argument("--num", type=int, default=TOYCITY_COUNTS["train"], help="train scenes per domain")
    p.add_argument("--num-val", type=int, default=TOYCITY_COUNTS["val"], help="val scenes per domain")
    p.add_argument("--num-paintings", type=int, default=TOYCITY_COUNTS["paintings"], help="style images")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS, help="domains to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    p = sub.add_parser("check", help="list every unreadable file, size mismatch and out-of-range label id of a "
                                     "split; exit status 1 if there is any")
    p.add_argument("--dataset", required=True, choices=sorted(READERS), help="reader ('style': a style-image folder)")
    p.add_argument("--root", required=True, help="dataset root, as the reader expects it")
    p.add_argument("--split", default=None, help="split (default: the reader's, e.g. 'all' for GTA5 / SYNTHIA)")
    p.add_argument("--split-file", default=None, help="check only the images listed here (one name per line)")
    p.add_argument("--threads", type=int, default=None, help="reading threads (default: one per CPU)")
    args = parser.parse_args(argv)
    if args.command == "check":
        reader = READERS[args.dataset]
        options = {k: v for k, v in (("split", args.split), ("split_file", args.split_file)) if v is not None}
        if reader is StyleFolder and options:
            raise BadInput("a style folder has no split: drop --split / --split-file")
        if check_split(reader(args.root, **options), threads=args.threads):
            raise SystemExit(1)
    elif args.command == "toycity":
        if min(args.size) < 1 or min(args.num, args.num_val, args.num_paintings) < 0:
            raise BadInput(f"toycity: --size must be positive and the counts >= 0, got --size {args.size} "
                           f"--num {args.num} --num-val {args.num_val} --num-paintings {args.num_paintings}")
        out = Path(args.out)
        for domain in args.domains:
            for split, n in (("train", args.num), ("val", args.num_val)):
                print(f"ToyCity: writing {n} {domain} {split} scenes to {out / domain}", flush=True)
                make_toycity(out / domain, n, tuple(args.size), domain, args.seed, split)
        if args.num_paintings:
            make_paintings(out / "paintings", args.num_paintings, tuple(args.size), args.seed)
        print(f"ToyCity: done, {out}")


if __name__ == "__main__":
    cli(main)
