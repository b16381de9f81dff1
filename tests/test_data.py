"""Tests of data.py: the label table, files, readers on fake trees, transforms, corruptions, ToyCity."""
import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data


# ---------------------------------------------------------------- label table

def test_label_table_matches_cityscapes_scripts():
    assert len(data.LABELS) == 35 and data.NUM_IDS == 35
    assert data.CLASS_NAMES[0] == "road" and data.CLASS_NAMES[10] == "sky" and data.CLASS_NAMES[18] == "bicycle"
    assert len(data.CLASS_NAMES) == data.NUM_CLASSES == 19
    assert data.ID_TO_TRAINID[7] == 0 and data.ID_TO_TRAINID[26] == 13 and data.ID_TO_TRAINID[33] == 18
    assert data.ID_TO_TRAINID[0] == 255 and data.ID_TO_TRAINID[29] == 255 and data.ID_TO_TRAINID[200] == 255
    assert data.TRAINID_TO_COLOR[0].tolist() == [128, 64, 128] and data.TRAINID_TO_COLOR[13].tolist() == [0, 0, 142]
    assert data.INSTANCE_CLASS_IDS == list(range(24, 34))
    assert all(data.ID_TO_TRAINID[i] == 255 for i in data.OUTLIER_IDS)
    # every trainId maps back to an id with that trainId
    assert all(data.ID_TO_TRAINID[data.TRAINID_TO_ID[t]] == t for t in range(19))


def test_colorize_numpy_and_tensor_agree():
    labels = torch.tensor([[0, 13], [255, 10]])
    out = data.colorize(labels)
    assert out.dtype == torch.uint8 and out.shape == (2, 2, 3)
    assert np.array_equal(out.numpy(), data.colorize(labels.numpy()))
    assert out[0, 1].tolist() == [0, 0, 142] and out[1, 0].tolist() == [0, 0, 0]
    assert data.colorize(torch.tensor([[26]]), kind="id")[0, 0].tolist() == [0, 0, 142]


def test_one_hot_is_a_partition_of_valid_ids():
    ids = torch.randint(0, 34, (2, 5, 7))
    ids[0, 0, 0] = 255
    oh = data.one_hot(ids)
    assert oh.shape == (2, 35, 5, 7) and oh.dtype == torch.float32
    assert oh[0, :, 0, 0].sum() == 0                       # out-of-range id -> zero vector
    valid = ids != 255
    assert torch.equal(oh.sum(1)[valid], torch.ones(int(valid.sum())))
    assert torch.equal(oh.argmax(1)[valid], ids[valid])


def test_instance_edges_mark_both_sides_of_a_boundary():
    inst = torch.full((1, 6, 6), 7)
    inst[0, 2:4, 2:4] = 26000
    e = data.instance_edges(inst)
    assert e.shape == (1, 1, 6, 6)
    # the 2x2 square's 4 pixels and its 8 4-neighbours
    assert e.sum() == 12 and e[0, 0, 2:4, 2:4].all() and e[0, 0, 0].sum() == 0


# ---------------------------------------------------------------- files

def test_label_and_image_files_round_trip(tmp_path):
    lab8 = torch.randint(0, 34, (9, 11))
    data.write_label(tmp_path / "a.png", lab8)
    assert torch.equal(data.read_label(tmp_path / "a.png"), lab8)
    lab16 = torch.randint(0, 34000, (9, 11))
    data.write_label(tmp_path / "b.png", lab16)
    assert torch.equal(data.read_label(tmp_path / "b.png"), lab16)
    img = torch.rand(3, 9, 11)
    data.write_image(tmp_path / "c.png", img)
    back = data.read_image(tmp_path / "c.png")
    assert back.shape == (3, 9, 11) and (back - img).abs().max() <= 0.5 / 255 + 1e-6


def test_bad_files_raise_errors_naming_them(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match="broken.png"):
        data.read_image(bad)
    with pytest.raises(ValueError, match="broken.png"):
        data.read_label(bad)
    data.write_image(tmp_path / "rgb.png", torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="rgb.png"):
        data.read_label(tmp_path / "rgb.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        data.read_image(tmp_path / "missing.png")


# ---------------------------------------------------------------- readers on fake trees in each exact layout

H, W = 6, 8


def fake_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def fake_label(path, values, mode="L"):
    """A label PNG whose rows cycle through `values` (palette mode for GTA5/Mapillary)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.array(values, np.uint8)[np.arange(H * W) % len(values)].reshape(H, W)
    img = Image.frombytes(mode, (W, H), arr.tobytes())
    if mode == "P":
        img.putpalette([c for v in range(256) for c in (v, 255 - v, v // 2)])
    img.save(path)
    return torch.from_numpy(arr.astype(np.int64))


def png16_rgb(path, arr):
    """Write a (H, W, 3) uint16 array as a 16-bit RGB PNG (as SYNTHIA's GT/LABELS)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_gta5_reads_palette_labels_of_cityscapes_ids(tmp_path):
    fake_image(tmp_path / "images" / "00001.png")
    ids = fake_label(tmp_path / "labels" / "00001.png", [7, 26, 0, 33], mode="P")
    assert Image.open(tmp_path / "labels" / "00001.png").mode == "P"
    s = data.GTA5(tmp_path)[0]
    assert torch.equal(s["label_ids"], ids) and torch.equal(s["labels"], data.ID_TO_TRAINID[ids])
    assert s["name"] == "00001"


def test_synthia_reads_the_class_from_the_first_channel_of_16_bit_pngs(tmp_path):
    fake_image(tmp_path / "RGB" / "0000000.png")
    arr = np.zeros((H, W, 3), np.uint16)
    arr[..., 0] = np.array([3, 8, 0, 10, 22])[np.arange(H * W) % 5].reshape(H, W)   # road, car, void, person, lanemarking
    arr[..., 1] = 300                                                                   # instance channel
    png16_rgb(tmp_path / "GT" / "LABELS" / "0000000.png", arr)
    assert torch.equal(data.read_png16_rgb(tmp_path / "GT" / "LABELS" / "0000000.png")[1], torch.full((H, W), 300))
    s = data.Synthia(tmp_path)[0]
    expected = torch.tensor([0, 13, 255, 11, 255])[torch.arange(H * W) % 5].reshape(H, W)
    assert torch.equal(s["labels"], expected)
    assert torch.equal(s["label_ids"][s["labels"] != 255], data.TRAINID_TO_ID[s["labels"][s["labels"] != 255]])


def test_mapillary_maps_vistas_classes_to_cityscapes(tmp_path):
    fake_image(tmp_path / "validation" / "images" / "abc.jpg")
    fake_label(tmp_path / "validation" / "labels" / "abc.png", [13, 55, 65, 19, 2], mode="P")
    s = data.Mapillary(tmp_path, "val")[0]
    expected = torch.tensor([0, 13, 255, 11, 1])[torch.arange(H * W) % 5].reshape(H, W)
    assert torch.equal(s["labels"], expected)


def test_ade20k_shifts_classes_and_ignores_other(tmp_path):
    fake_image(tmp_path / "images" / "training" / "ADE_train_00000001.jpg")
    raw = fake_label(tmp_path / "annotations" / "training" / "ADE_train_00000001.png", [0, 1, 150])
    ds = data.ADE20K(tmp_path, "train")
    s = ds[0]
    assert ds.num_ids == 151 and ds.num_classes == 150
    assert torch.equal(s["label_ids"], raw)
    assert torch.equal(s["labels"], torch.where(raw == 0, 255, raw - 1))


def test_coco_stuff_maps_unlabeled_to_the_dont_care_channel(tmp_path):
    fake_image(tmp_path / "images" / "val2017" / "000000000139.jpg")
    raw = fake_label(tmp_path / "stuffthingmaps" / "val2017" / "000000000139.png", [0, 181, 255])
    s = data.CocoStuff(tmp_path, "val")[0]
    assert torch.equal(s["labels"], raw)
    assert torch.equal(s["label_ids"], torch.where(raw == 255, 182, raw))


def test_bdd100k_reads_train_ids(tmp_path):
    fake_image(tmp_path / "images" / "10k" / "val" / "7d06fefd-f7be05a6.jpg")
    raw = fake_label(tmp_path / "labels" / "sem_seg" / "masks" / "val" / "7d06fefd-f7be05a6.png", [0, 13, 255])
    s = data.BDD100K(tmp_path, "val")[0]
    assert torch.equal(s["labels"], raw)
    assert torch.equal(s["label_ids"], torch.tensor([7, 26, 0])[torch.arange(H * W) % 3].reshape(H, W))


def test_streethazards_returns_the_anomaly_mask(tmp_path):
    fake_image(tmp_path / "test" / "images" / "test" / "t5" / "300.png")
    fake_label(tmp_path / "test" / "annotations" / "test" / "t5" / "300.png", [8, 14, 1, 11])   # road, anomaly, unlabeled, car
    s = data.StreetHazards(tmp_path, "test")[0]
    k = torch.arange(H * W).reshape(H, W) % 4
    assert torch.equal(s["labels"], torch.tensor([0, 255, 255, 13])[k])
    assert torch.equal(s["anomaly"], torch.tensor([0, 1, 255, 0], dtype=torch.uint8)[k])


def test_style_and_label_folders_are_recursive(tmp_path):
    fake_image(tmp_path / "style" / "a" / "x.jpg")
    fake_image(tmp_path / "style" / "b" / "c" / "y.png")
    ds = data.StyleFolder(tmp_path / "style", size=(4, 4))
    assert len(ds) == 2 and ds[1]["image"].shape == (3, 4, 4) and ds[1]["name"] == "b/c/y.png"
    ids = fake_label(tmp_path / "labels" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", [7, 26])
    fake_label(tmp_path / "labels" / "aachen" / "aachen_000000_000019_gtFine_instanceIds.png", [7, 26])
    lf = data.LabelFolder(tmp_path / "labels")
    assert len(lf) == 1 and torch.equal(lf[0]["label_ids"], ids) and lf[0]["name"] == "aachen_000000_000019"


@pytest.mark.parametrize("reader,url", [(data.Cityscapes, "cityscapes-dataset.com"), (data.GTA5, "from_games"),
                                        (data.Synthia, "synthia-dataset.net"), (data.Mapillary, "mapillary"),
                                        (data.ADE20K, "ADEChallengeData2016"), (data.CocoStuff, "cocostuff"),
                                        (data.BDD100K, "bdd-data"), (data.StreetHazards, "anomaly-seg")])
def test_missing_layout_names_the_path_and_where_to_get_it(tmp_path, reader, url):
    with pytest.raises(data.MissingFile) as e:
        reader(tmp_path / "nowhere")
    message = " ".join(str(e.value).split())              # as the command lines print it
    assert re.fullmatch(rf"\w[\w -]*: missing {tmp_path / 'nowhere'}\S*; expected layout: .*; "
                        rf"the dataset is published at \S*{url}.*", message), message


def test_bad_labels_raise_errors_naming_the_files(tmp_path):
    city = tmp_path / "gtFine" / "val" / "x"
    fake_image(tmp_path / "leftImg8bit" / "val" / "x" / "x_000000_000000_leftImg8bit.png")
    fake_label(city / "x_000000_000000_gtFine_labelIds.png", [7, 40, 99])
    with pytest.raises(ValueError, match=r"x_000000_000000_gtFine_labelIds.png.*\[40, 99\]"):
        data.Cityscapes(tmp_path, "val")[0]
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(city / "x_000000_000000_gtFine_labelIds.png")
    with pytest.raises(ValueError, match="leftImg8bit.png.*labelIds.png"):
        data.Cityscapes(tmp_path, "val")[0]
    (city / "x_000000_000000_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="x_000000_000000_gtFine_labelIds.png"):
        data.Cityscapes(tmp_path, "val")


# ---------------------------------------------------------------- bad samples, check_split, style folders

def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def bad_gta5(tmp_path):
    """A GTA5 tree with one good pair and one bad pair of each kind."""
    for n in range(1, 6):
        fake_image(tmp_path / "images" / f"0000{n}.png")
        fake_label(tmp_path / "labels" / f"0000{n}.png", [7, 26], mode="P")
    image = (tmp_path / "images" / "00002.png").read_bytes()
    (tmp_path / "images" / "00002.png").write_bytes(image[: len(image) // 2])                 # truncated image
    (tmp_path / "labels" / "00003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)        # unreadable label
    fake_label(tmp_path / "labels" / "00004.png", [7, 40, 99], mode="P")                     # ids out of range
    Image.fromarray(np.full((H + 2, W), 7, np.uint8)).save(tmp_path / "labels" / "00005.png")  # size mismatch
    return tmp_path


def test_strict_reader_raises_on_each_bad_pair_naming_the_file(bad_gta5):
    ds = data.GTA5(bad_gta5)
    assert ds[0]["labels"].shape == (H, W)
    for index, pattern in ((1, r"images/00002.png: cannot read image \(image file is truncated"),
                           (2, r"labels/00003.png: cannot read image"),
                           (3, r"labels/00004.png: label values outside the GTA5 label table: \[40, 99\]"),
                           (4, rf"images/00005.png: size mismatch image {H}x{W} vs label {H + 2}x{W} \(.*labels/00005.png\)")):
        with pytest.raises(data.BadInput, match=pattern):
            ds[index]


def test_skip_bad_returns_bad_samples_as_name_and_problem(bad_gta5):
    ds = data.GTA5(bad_gta5, skip_bad=True)
    good = ds[0]
    assert set(good) == {"image", "label_ids", "labels", "name"}
    for index in range(1, 5):
        s = ds[index]
        assert set(s) == {"name", "bad"} and s["name"] == f"0000{index + 1}"
        assert s["bad"].startswith(str(bad_gta5)) and f"0000{index + 1}.png: " in s["bad"] and "\n" not in s["bad"]


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_size_repairs_a_size_mismatch_by_resizing_image_and_label_independently(bad_gta5, skip_bad):
    ds = data.GTA5(bad_gta5, size=(4, 4), skip_bad=skip_bad)
    s = ds[4]
    assert s["image"].shape == (3, 4, 4) and s["labels"].shape == s["label_ids"].shape == (4, 4)
    assert (s["label_ids"] == 7).all()
    assert s["repaired"] == (f"{bad_gta5 / 'images' / '00005.png'}: size mismatch image {H}x{W} vs label "
                             f"{H + 2}x{W} ({bad_gta5 / 'labels' / '00005.png'}), resized independently")
    assert "repaired" not in ds[0]
    kept = data.GTA5(bad_gta5, size=(4, 4), skip_bad=skip_bad, full_labels=True)[4]
    assert kept["image"].shape == (3, 4, 4) and kept["labels"].shape == (H + 2, W)
    assert kept["repaired"].endswith("image resized, label kept")
    if skip_bad:
        assert "bad" in ds[1]
    else:
        with pytest.raises(data.BadInput):
            ds[1]


def test_check_split_lists_every_bad_file_and_the_command_line_exits_1(bad_gta5, capsys):
    problems = data.check_split(data.GTA5(bad_gta5), threads=2)
    assert len(problems) == 4
    assert [p.split(": ")[0] for p in problems] == [str(bad_gta5 / sub) for sub in (
        "images/00002.png", "labels/00003.png", "labels/00004.png", "images/00005.png")]
    assert "size mismatch" in problems[3] and "[40, 99]" in problems[2]
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == problems and re.fullmatch(r"check GTA5: 5 samples, 4 problems, .* s per 1000 images\)", out[4])
    with pytest.raises(SystemExit) as e:
        data.cli(data.main, ["check", "--dataset", "gta5", "--root", str(bad_gta5)])
    assert e.value.code == 1
    for n in (2, 3, 4, 5):
        (bad_gta5 / "images" / f"0000{n}.png").unlink()
    data.cli(data.main, ["check", "--dataset", "gta5", "--root", str(bad_gta5)])   # clean: no exit
    assert "1 samples, 0 problems" in capsys.readouterr().out


def test_check_split_finds_a_truncated_jpeg(tmp_path):
    base = tmp_path / "validation"
    fake_image(base / "images" / "a.jpg")
    fake_label(base / "labels" / "a.png", [13, 55], mode="P")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(base / "images" / "b.jpg")
    Image.fromarray(np.full((64, 96), 13, np.uint8)).save(base / "labels" / "b.png")
    jpeg = base / "images" / "b.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:-200])                        # the header whole, the scan cut short
    problems = data.check_split(data.Mapillary(tmp_path, "val"), log=None)
    assert len(problems) == 1 and problems[0].startswith(f"{jpeg}: cannot read image (image file is truncated")


def test_command_lines_answer_a_missing_root_with_one_line_and_status_2(tmp_path, capsys):
    for argv in (["check", "--dataset", "gta5", "--root", str(tmp_path / "nowhere")],
                 ["check", "--dataset", "style", "--root", str(tmp_path / "nowhere")],
                 ["toycity", "--out", str(tmp_path), "--size", "0", "64"]):
        with pytest.raises(SystemExit) as e:
            data.cli(data.main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "size must be positive" in err
    with pytest.raises(SystemExit):
        data.cli(data.main, ["check", "--dataset", "gta5", "--root", str(tmp_path / "nowhere")])
    assert capsys.readouterr().err == (
        f"error: GTA5: missing {tmp_path / 'nowhere' / 'images'}; expected layout: root/images/<n>.png, "
        "root/labels/<n>.png (Cityscapes label ids); the dataset is published at "
        "https://download.visinf.tu-darmstadt.de/data/from_games/\n")


def test_full_labels_resizes_the_image_only(tmp_path):
    fake_image(tmp_path / "leftImg8bit" / "val" / "x" / "x_0_0_leftImg8bit.png")
    ids = fake_label(tmp_path / "gtFine" / "val" / "x" / "x_0_0_gtFine_labelIds.png", [7, 26, 0])
    fake_label(tmp_path / "gtFine" / "val" / "x" / "x_0_0_gtFine_instanceIds.png", [7, 26, 0])
    s = data.Cityscapes(tmp_path, "val", size=(3, 4), full_labels=True)[0]
    assert s["image"].shape == (3, 3, 4)
    assert torch.equal(s["label_ids"], ids) and s["labels"].shape == s["instance"].shape == (H, W)
    assert data.Cityscapes(tmp_path, "val", size=(3, 4))[0]["labels"].shape == (3, 4)
    assert data.Cityscapes(tmp_path, "val", size=3)[0]["labels"].shape == (3, 4)   # int: shorter side, aspect kept
    with pytest.raises(data.BadInput, match="size"):
        data.Cityscapes(tmp_path, "val", size=(3, 0))


def test_mapillary_keeps_each_images_aspect_ratio(tmp_path):
    base = tmp_path / "validation"
    fake_image(base / "images" / "wide.jpg")                                            # H x W = 6 x 8
    fake_label(base / "labels" / "wide.png", [13, 55], mode="P")
    Image.fromarray(np.zeros((10, 4, 3), np.uint8)).save(base / "images" / "tall.jpg")  # 10 x 4
    Image.fromarray(np.full((10, 4), 13, np.uint8)).save(base / "labels" / "tall.png")
    for size in (3, (3, 100)):                       # an int or the smaller of (H, W) is the shorter side
        tall, wide = data.Mapillary(tmp_path, "val", size=size)
        assert wide["image"].shape == (3, 3, 4) and wide["labels"].shape == (3, 4)
        assert tall["image"].shape == (3, 8, 3) and tall["labels"].shape == (8, 3)
    tall, _ = data.Mapillary(tmp_path, "val", size=2, full_labels=True)
    assert tall["image"].shape == (3, 5, 2) and tall["labels"].shape == (10, 4)


def odd_paintings(folder):
    """A style folder as Painter by Numbers has it: one image of each odd kind, and non-images."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    folder.mkdir(parents=True)
    Image.fromarray(rgb).save(folder / "big.png")                                      # beyond the pixel limit
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(folder / "grey16.png")
    rgba = np.dstack([rgb, np.full((40, 60), 255, np.uint8)])
    rgba[:, :30, 3] = 0                                                                # left half transparent
    Image.fromarray(rgba).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).save(folder / "wide.jpg")
    Image.fromarray(np.tile(rgb, (4, 4, 1))).save(folder / "huge.jpg", quality=95)      # 160 x 240
    full = (folder / "wide.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) * 2 // 3])                   # loads partly
    (folder / "unreadable.jpg").write_bytes(b"this is not a JPEG")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return rgb


def test_style_folder_reads_every_odd_painting_and_skips_the_unreadable(tmp_path, monkeypatch):
    rgb = odd_paintings(tmp_path / "style")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)                    # big.png is 2400 px: a "bomb"
    with pytest.raises(data.BadInput, match="big.png.*exceeds limit"):
        data.read_image(tmp_path / "style" / "big.png")
    ds = data.StyleFolder(tmp_path / "style", max_side=120)
    names = [p.name for p in ds.files]
    assert "notes.txt" not in names and ".DS_Store" not in names and len(ds) == 10
    images = {}
    with pytest.warns(UserWarning, match="skipping .*unreadable.jpg: cannot read image") as caught:
        for i in range(len(ds)):
            s = ds[i]
            images.setdefault(Path(s["name"]).stem, s["image"])
        ds[names.index("unreadable.jpg")]                                  # skipped again, warned once
    assert sum("unreadable.jpg" in str(w.message) for w in caught) == 1
    assert Image.MAX_IMAGE_PIXELS == 1000                                   # the limit is lifted while reading only
    assert set(images) == {"big", "cmyk", "grey", "grey16", "rgba", "palette", "wide", "huge", "truncated"}
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert torch.equal(images["big"], expected)
    assert (images["cmyk"] - expected).abs().mean() < 0.05                # JPEG of noise: not exact
    assert torch.equal(images["grey"], expected[:1].expand(3, -1, -1))
    assert torch.equal(images["grey16"], images["grey"])                    # 16-bit scaled to 8 bits
    assert (images["rgba"][:, :, :30] == 1).all() and torch.equal(images["rgba"][:, :, 30:], expected[:, :, 30:])
    assert images["palette"].shape == (3, 40, 60)
    assert images["huge"].shape == (3, 80, 120)                             # longer side down to max_side
    assert images["truncated"].shape == (3, 40, 60)
    assert data.check_split(ds, log=None) == [f"{tmp_path / 'style' / 'unreadable.jpg'}: cannot read image "
                                              f"(cannot identify image file '{tmp_path / 'style' / 'unreadable.jpg'}')"]


# ---------------------------------------------------------------- splits: split.mat, list files, split="all"

def mat_v5(arrays, compress, order="<"):
    """The bytes of a MATLAB v5 MAT-file as MATLAB's `save` writes them: for each name a column
    vector (values, stored data type) of class double, or a str as a char array."""
    def element(kind, body):
        if 0 < len(body) <= 4:                                               # the small data element format
            return struct.pack(order + "I", len(body) << 16 | kind) + body.ljust(4, b"\0")
        return struct.pack(order + "II", kind, len(body)) + body + b"\0" * (-len(body) % 8)

    header = b"MATLAB 5.0 MAT-file, written by the data.py tests".ljust(116) + b"\0" * 8
    header += struct.pack(order + "H", 0x0100) + (b"IM" if order == "<" else b"MI")
    out = header
    for name, value in arrays.items():
        if isinstance(value, str):                                           # mxCHAR_CLASS 4, miUINT16 4
            cls, kind, body, n = 4, 4, np.array([ord(c) for c in value], order + "u2").tobytes(), len(value)
        else:                                                                # mxDOUBLE_CLASS 6
            values, kind = value
            dtype = {9: "f8", 4: "u2", 2: "u1"}[kind]
            cls, body, n = 6, np.array(values, order + dtype).tobytes(), len(values)
        matrix = (element(6, struct.pack(order + "II", cls, 0)) + element(5, struct.pack(order + "ii", n, 1))
                  + element(1, name.encode()) + element(kind, body))
        data_element = struct.pack(order + "II", 14, len(matrix)) + matrix
        if compress:
            packed = zlib.compress(data_element)
            data_element = struct.pack(order + "II", 15, len(packed)) + packed
        out += data_element
    return out


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("order", ["<", ">"])
def test_read_mat_reads_numeric_arrays_as_matlab_writes_them(tmp_path, compress, order):
    path = tmp_path / "split.mat"
    path.write_bytes(mat_v5({"trainIds": ([1, 3, 300], 4), "valIds": ([2.0, 4.0], 9), "note": "GTA5",
                             "ids": ([7], 2)}, compress, order))
    arrays = data.read_mat(path)
    assert set(arrays) == {"trainIds", "valIds", "ids"}                      # the char array is skipped
    assert arrays["trainIds"].dtype == np.float64 and arrays["trainIds"].shape == (3, 1)
    assert arrays["trainIds"][:, 0].tolist() == [1, 3, 300] and arrays["valIds"][:, 0].tolist() == [2, 4]
    assert arrays["ids"].tolist() == [[7]]
    path.write_bytes(b"MATLAB 7.3 MAT-file" + b"\0" * 200)
    with pytest.raises(data.BadInput, match="7.3"):
        data.read_mat(path)


def test_gta5_reads_every_image_without_split_files_and_the_official_split_with_split_mat(tmp_path):
    for n in range(1, 6):
        fake_image(tmp_path / "images" / f"{n:05d}.png")
        fake_label(tmp_path / "labels" / f"{n:05d}.png", [7, 26], mode="P")
    assert [s["name"] for s in data.GTA5(tmp_path).samples] == ["00001", "00002", "00003", "00004", "00005"]
    with pytest.raises(data.MissingFile) as e:
        data.GTA5(tmp_path, "val")
    message = " ".join(str(e.value).split())
    assert f"no split 'val': looked for {tmp_path / 'split.mat'} (valIds) and {tmp_path / 'val.txt'}" in message
    assert "published at https://download.visinf.tu-darmstadt.de/data/from_games/" in message
    (tmp_path / "split.mat").write_bytes(mat_v5({"trainIds": ([1, 2, 3], 4), "valIds": ([4], 4),
                                                 "testIds": ([5], 4)}, compress=True))
    assert [s["name"] for s in data.GTA5(tmp_path, "train").samples] == ["00001", "00002", "00003"]
    assert [s["name"] for s in data.GTA5(tmp_path, "val").samples] == ["00004"]
    (tmp_path / "mine.txt").write_text("images/00002.png\n00005\n")
    assert [s["name"] for s in data.GTA5(tmp_path, split_file=tmp_path / "mine.txt").samples] == ["00002", "00005"]
    with pytest.raises(data.MissingFile, match="missing.txt"):
        data.GTA5(tmp_path, split_file=tmp_path / "missing.txt")


def test_synthia_has_no_official_split_and_reads_list_files(tmp_path):
    for n in range(3):
        fake_image(tmp_path / "RGB" / f"{n:07d}.png")
        png16_rgb(tmp_path / "GT" / "LABELS" / f"{n:07d}.png", np.full((H, W, 3), 3, np.uint16))
    assert len(data.Synthia(tmp_path)) == 3
    with pytest.raises(data.MissingFile, match=r"(?s)no split 'val' \(SYNTHIA has no official split\).*synthia-dataset"):
        data.Synthia(tmp_path, "val")
    (tmp_path / "val.txt").write_text("0000001.png\n0000009.png\n")
    with pytest.warns(UserWarning, match="1 of the 2 images listed"):
        assert [s["name"] for s in data.Synthia(tmp_path, "val").samples] == ["0000001"]


# ---------------------------------------------------------------- ToyCity

SIZE = (64, 128)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toycity")
    for domain in data.DOMAINS:
        data.make_toycity(root / domain, 6, SIZE, domain, seed=3, split="val")
    return root


def test_cityscapes_reader_reads_toycity(toy):
    ds = data.Cityscapes(toy / "source", "val")
    assert len(ds) == 6
    s = ds[0]
    assert s["image"].shape == (3, *SIZE) and s["image"].dtype == torch.float32
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    assert s["label_ids"].dtype == s["labels"].dtype == s["instance"].dtype == torch.int64
    assert torch.equal(s["labels"], data.ID_TO_TRAINID[s["label_ids"]])
    inst = s["instance"]
    is_thing = inst >= 1000
    assert is_thing.any() and torch.equal(inst[is_thing] // 1000, s["label_ids"][is_thing])
    assert torch.equal(inst[~is_thing], s["label_ids"][~is_thing])
    assert s["name"] == "toycity_000000_000019" and "anomaly" not in s
    color = Image.open(toy / "source" / "gtFine" / "val" / "toycity" / "toycity_000000_000019_gtFine_color.png")
    assert np.array_equal(np.asarray(color.convert("RGB")), data.colorize(s["label_ids"].numpy(), kind="id"))


def test_toycity_domains_share_labels_but_not_appearance(toy):
    src, tgt = data.Cityscapes(toy / "source", "val"), data.Cityscapes(toy / "target", "val")
    seen = set()
    for i in range(len(src)):
        a, b = src[i], tgt[i]
        assert torch.equal(a["label_ids"], b["label_ids"]) and torch.equal(a["instance"], b["instance"])
        seen |= set(a["labels"].unique().tolist())
        # the same class looks different: mean colour of road pixels moves far
        road = a["labels"] == 0
        assert (a["image"][:, road].mean(1) - b["image"][:, road].mean(1)).abs().max() > 0.15
    assert len(seen - {255}) >= 12


def test_toycity_outlier_domain_has_anomaly_ground_truth(toy):
    ds = data.Cityscapes(toy / "outlier", "val")
    clean = data.Cityscapes(toy / "target", "val")
    found = 0
    for i in range(len(ds)):
        s = ds[i]
        ood = torch.isin(s["label_ids"], torch.tensor(data.OUTLIER_IDS))
        assert torch.equal(s["anomaly"] == 1, ood)
        assert torch.equal(s["anomaly"] == 0, s["labels"] != 255)
        found += int(ood.sum())
        changed = s["label_ids"] != clean[i]["label_ids"]
        assert ood[changed].all()       # only pasted objects differ from the target scene
    assert found > 0


def test_toycity_outlier_split_in_the_source_look(tmp_path):
    """look="source": the outlier domain's scenes (pasted objects included) drawn by the source renderer."""
    for domain, look in (("outlier", "source"), ("source", None), ("outlier", None)):
        data.make_toycity(tmp_path / f"{domain}-{look}", 2, (32, 64), domain, seed=3, split="val", look=look)
    ours, source, target = (data.Cityscapes(tmp_path / name, "val")
                            for name in ("outlier-source", "source-None", "outlier-None"))
    for i in range(2):
        assert torch.equal(ours[i]["label_ids"], target[i]["label_ids"]) and torch.equal(ours[i]["anomaly"],
                                                                                          target[i]["anomaly"])
        same = ours[i]["label_ids"] == source[i]["label_ids"]  # away from the pasted objects: the source image
        assert same.float().mean() > 0.5
        assert (ours[i]["image"][:, same] - source[i]["image"][:, same]).abs().mean() < 0.02
        assert (ours[i]["image"][:, same] - target[i]["image"][:, same]).abs().mean() > 0.05
    with pytest.raises(ValueError, match="look"):
        data.make_toycity(tmp_path / "bad", 1, (32, 64), "outlier", look="night")


def test_toycity_is_deterministic(tmp_path):
    for k in range(2):
        data.make_toycity(tmp_path / str(k), 2, (32, 64), "target", seed=5, split="train")
    for sub in ("leftImg8bit/train/toycity/toycity_000001_000019_leftImg8bit.png",
                "gtFine/train/toycity/toycity_000001_000019_gtFine_instanceIds.png"):
        assert (tmp_path / "0" / sub).read_bytes() == (tmp_path / "1" / sub).read_bytes()


def test_toycity_cache_is_made_once_and_remade_when_incomplete(tmp_path, capsys):
    counts = {"train": 2, "val": 1, "paintings": 2}
    root = data.toycity(cache=tmp_path, size=(32, 64), seed=1, counts=counts)
    assert "ToyCity: writing" in capsys.readouterr().out and (root / ".complete").exists()
    for domain in ("source", "target", "outlier"):
        assert len(data.Cityscapes(root / domain, "train")) == 2 and len(data.Cityscapes(root / domain, "val")) == 1
    assert len(data.StyleFolder(root / "paintings")) == 2
    assert data.toycity(cache=tmp_path, size=(32, 64), seed=1, counts=counts) == root
    assert capsys.readouterr().out == ""                       # cached: nothing written
    (root / ".complete").unlink()
    data.toycity(cache=tmp_path, size=(32, 64), seed=1, counts=counts)
    assert "ToyCity: writing" in capsys.readouterr().out and (root / ".complete").exists()


# ---------------------------------------------------------------- paired transforms

def blocky_sample(h=32, w=48):
    """Labels in 8x8 blocks and an image whose grey level encodes the label, to check alignment."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 19, (h // 8, w // 8), generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)
    return {"image": (labels.float() / 20).expand(3, h, w).clone(), "labels": labels,
            "label_ids": data.TRAINID_TO_ID[labels], "name": "x"}


def test_resize_keeps_labels_exact_and_aligned():
    s = data.Resize((16, 24))(blocky_sample())
    assert s["image"].shape == (3, 16, 24) and s["labels"].shape == (16, 24) and s["labels"].dtype == torch.int64
    assert set(s["labels"].unique().tolist()) <= set(blocky_sample()["labels"].unique().tolist())
    assert torch.equal(s["label_ids"], data.TRAINID_TO_ID[s["labels"]])
    inner = s["image"][0, 1::4, 1::4] * 20        # block interiors: image still encodes the label
    assert torch.allclose(inner, s["labels"][1::4, 1::4].float(), atol=0.05)
    # an odd size: every output label is the source label at the nearest sample point, (i + 0.5) * scale
    src = blocky_sample()
    odd = data.Resize((13, 19))(src)
    rows = ((torch.arange(13) + 0.5) * 32 / 13).long()
    cols = ((torch.arange(19) + 0.5) * 48 / 19).long()
    assert torch.equal(odd["labels"], src["labels"][rows][:, cols])


def test_random_scale_crop_pads_labels_with_ignore_and_stays_aligned():
    g = torch.Generator().manual_seed(1)
    t = data.RandomScaleCrop((40, 40), scale=(0.5, 0.5), generator=g)     # 16x24 after scaling: must pad
    s = t(blocky_sample())
    assert s["image"].shape == (3, 40, 40) and s["labels"].shape == (40, 40)
    assert (s["labels"][16:] == 255).all() and (s["label_ids"][16:] == 0).all() and (s["image"][:, 16:] == 0).all()
    big = data.RandomScaleCrop((16, 16), scale=(2.0, 2.0), generator=torch.Generator().manual_seed(2))(blocky_sample())
    lab = big["labels"]
    inside = torch.ones_like(lab, dtype=torch.bool)              # pixels whose 3x3 window has one label
    inside[1:-1, 1:-1] = (lab[1:-1, 1:-1] == torch.stack(
        [lab[1 + dy:lab.shape[0] - 1 + dy, 1 + dx:lab.shape[1] - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])).all(0)
    inside[[0, -1]] = inside[:, [0, -1]] = False
    assert inside.sum() > 50
    assert torch.allclose((big["image"][0] * 20)[inside], lab[inside].float(), atol=0.05)
    again = data.RandomScaleCrop((16, 16), scale=(2.0, 2.0), generator=torch.Generator().manual_seed(2))(blocky_sample())
    assert torch.equal(big["labels"], again["labels"])


def test_random_flip_flips_every_map_together():
    s = blocky_sample()
    f = data.Compose([data.RandomFlip(p=1.0)])(s)
    assert torch.equal(f["image"], s["image"].flip(-1)) and torch.equal(f["labels"], s["labels"].flip(-1))
    assert torch.equal(data.RandomFlip(p=0.0)(s)["labels"], s["labels"])


def test_resolutions_follow_tables_a2_a3():
    assert data.RESOLUTIONS["cityscapes"]["coarse"] == ((256, 512), None)
    assert data.RESOLUTIONS["ade20k"]["coarse"] == ((286, 286), (256, 256))
    assert data.RESOLUTIONS["coco-stuff"]["fine"] == ((286, 286), (256, 256))


# ---------------------------------------------------------------- corruptions

@pytest.fixture(scope="module")
def street(toy):
    return data.Cityscapes(toy / "target", "val")[2]["image"]


# glass blur, frost and spatter: the original severity tables are not monotone in pixel distance
# (glass blur severity 2 has fewer shuffling iterations than 1; frost severity 4 dims the image more
# than 3 under the same frost weight; spatter switches water -> mud)
NOT_MONOTONE = {"glass_blur", "frost", "spatter"}


@pytest.mark.parametrize("name", data.CORRUPTIONS)
def test_corruption_grows_with_severity_and_is_deterministic(street, name):
    outs = [data.corrupt(street, name, s, seed=4) for s in range(1, 6)]
    for o in outs:
        assert o.shape == street.shape and o.dtype == torch.float32 and 0 <= o.min() and o.max() <= 1
    dist = [(o - street).abs().mean().item() for o in outs]
    assert dist[0] > 1e-3
    if name != "frost":  # a bright frost sheet saturates: the change grows little (the reference's: 59 -> 71
        assert dist[4] > 1.1 * dist[0], dist  # grey levels on average); REFERENCE_STRENGTH pins frost instead
    if name not in NOT_MONOTONE:   # 3% slack: on a 64x128 image pixel grids alias (pixelate 0.3 vs 0.25)
        assert all(b > 0.97 * a for a, b in zip(dist, dist[1:])), dist
    assert torch.equal(data.corrupt(street, name, 3, seed=4), outs[2])


# Strength of the ImageNet-C reference (the `imagecorruptions` package 1.1.2, run in a separate venv as
# /work/shared/tools/compare_corruptions.py sets it up): mean |out - in| in grey levels on the image of
# `street_128` below, at severities 1..5, as the mean and the standard deviation over 400 draws
# (np.random.seed(k) for k < 400 before each call; frost draws one of its photographs and a crop).
REFERENCE_STRENGTH = {
    "frost": ([59.10, 67.44, 71.98, 68.19, 70.79], [13.16, 19.79, 22.38, 22.31, 23.29]),
    "spatter": ([0.95, 4.50, 7.57, 9.26, 14.99], [0.33, 0.77, 0.63, 0.78, 0.99]),
}


@pytest.fixture(scope="module")
def street_128(tmp_path_factory):
    root = data.make_toycity(tmp_path_factory.mktemp("street"), 1, (128, 256), "target", seed=0)
    return data.read_image(root / "leftImg8bit" / "train" / "toycity" / "toycity_000000_000019_leftImg8bit.png")


@pytest.mark.parametrize("name", sorted(REFERENCE_STRENGTH))
def test_frost_and_spatter_have_the_strength_of_imagenet_c(street_128, name):
    """Our mean change over 10 seeds lies within 3 standard errors of the reference's mean."""
    means, stds = REFERENCE_STRENGTH[name]
    seeds = 10
    for severity, mean, std in zip(range(1, 6), means, stds):
        ours = np.mean([(data.corrupt(street_128, name, severity, seed=k) - street_128).abs().mean().item() * 255
                        for k in range(seeds)])
        assert abs(ours - mean) <= 3 * std / seeds ** 0.5, (severity, ours, mean)


def test_corrupt_handles_batches_severity_zero_and_bad_names(street):
    batch = torch.stack([street, street])
    out = data.corrupt(batch, "gaussian_noise", 2, seed=0)
    assert torch.equal(out[0], data.corrupt(street, "gaussian_noise", 2, seed=0))
    assert not torch.equal(out[0], out[1])                      # image i uses seed + i
    assert torch.equal(data.corrupt(street, "fog", 0), street)
    with pytest.raises(ValueError, match="unknown corruption"):
        data.corrupt(street, "rain", 1)
    assert len(data.CORRUPTIONS) >= 15


def test_command_line_writes_a_toycity_tree(tmp_path, capsys):
    data.main(["toycity", "--out", str(tmp_path), "--size", "32", "64", "--num", "2", "--num-val", "1",
               "--num-paintings", "1", "--domains", "source", "outlier"])
    assert len(data.Cityscapes(tmp_path / "source", "train")) == 2
    assert "anomaly" in data.Cityscapes(tmp_path / "outlier", "val")[0]
    assert not (tmp_path / "target").exists() and len(data.StyleFolder(tmp_path / "paintings")) == 1
    assert "ToyCity: done" in capsys.readouterr().out


# ---------------------------------------------------------------- command-line errors

def test_cli_prints_a_user_error_as_one_line_with_status_2_and_debug_keeps_the_traceback(capsys):
    def main(argv):
        raise data.MissingFile("GTA5: missing /nowhere/images\n  expected layout: root/images/<n>.png")

    with pytest.raises(SystemExit) as e:
        data.cli(main, ["--data-root", "/nowhere"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: GTA5: missing /nowhere/images expected layout: root/images/<n>.png\n"
    with pytest.raises(FileNotFoundError):  # MissingFile is also a FileNotFoundError; --debug re-raises it
        data.cli(main, ["--debug"])


def test_cli_lets_bugs_through_with_their_traceback():
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        data.cli(main, [])
