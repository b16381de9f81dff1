"""Tests of data.py: the label table, files, readers on fake trees, transforms, corruptions, ToyCity."""
import struct
import zlib

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
    with pytest.raises(FileNotFoundError) as e:
        reader(tmp_path / "nowhere")
    assert "nowhere" in str(e.value) and url in str(e.value) and "expected layout" in str(e.value)


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


# glass blur and spatter: the original severity tables are not monotone in pixel distance
# (e.g. glass blur severity 2 has fewer shuffling iterations than 1; spatter switches water -> mud)
NOT_MONOTONE = {"glass_blur", "spatter"}


@pytest.mark.parametrize("name", data.CORRUPTIONS)
def test_corruption_grows_with_severity_and_is_deterministic(street, name):
    outs = [data.corrupt(street, name, s, seed=4) for s in range(1, 6)]
    for o in outs:
        assert o.shape == street.shape and o.dtype == torch.float32 and 0 <= o.min() and o.max() <= 1
    dist = [(o - street).abs().mean().item() for o in outs]
    assert dist[0] > 1e-3
    assert dist[4] > 1.1 * dist[0], dist
    if name not in NOT_MONOTONE:   # 3% slack: on a 64x128 image pixel grids alias (pixelate 0.3 vs 0.25)
        assert all(b > 0.97 * a for a, b in zip(dist, dist[1:])), dist
    assert torch.equal(data.corrupt(street, name, 3, seed=4), outs[2])


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
