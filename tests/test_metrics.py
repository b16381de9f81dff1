"""metrics.py: each metric against a hand count or a brute-force reference (no outside libraries)."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import metrics  # noqa: E402
from metrics import ConfusionMatrix, OODMeter, SUBSETS  # noqa: E402


# --- segmentation ---------------------------------------------------------------------------

def test_confusion_matrix_counts_every_labelled_pixel_once():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 17, 23), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    pred = torch.randint(0, 5, (3, 17, 23), generator=g)
    expected = torch.zeros(5, 5, dtype=torch.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            expected[t, p] += 1
    cm = ConfusionMatrix(5)
    cm.update(pred[:2].byte(), target[:2].byte())  # uint8 fast path
    cm.update(pred[2:], target[2:])                 # int64 maps
    assert torch.equal(cm.mat, expected)
    assert cm.pixel_accuracy() == pytest.approx(expected.diag().sum().item() / expected.sum().item())
    big_target = torch.randint(0, 19, (2, 300, 200), generator=g, dtype=torch.uint8)  # several chunks
    big_target[torch.rand(big_target.shape, generator=g) < 0.3] = 255
    big_pred = torch.randint(0, 19, (2, 300, 200), generator=g, dtype=torch.uint8)
    labelled = big_target != 255
    reference = torch.bincount(big_target[labelled].long() * 19 + big_pred[labelled].long(), minlength=361)
    cm = ConfusionMatrix(19)
    cm.update(big_pred, big_target)
    assert torch.equal(cm.mat, reference.view(19, 19))


def test_iou_follows_the_cityscapes_convention():
    # class 0: TP 2, FN 2 -> 2/4; class 1: predicted once, never in GT -> 0; class 2: predicted only on an
    # ignored pixel, absent from GT -> NaN, left out of the mean; class 3: TP 1, FP 1 -> 1/2.
    target = torch.tensor([0, 0, 0, 3, 0, 255, 255])
    pred = torch.tensor([0, 0, 1, 3, 3, 2, 0])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    iou = cm.iou()
    assert iou[0] == pytest.approx(2 / 4) and iou[1] == 0 and math.isnan(iou[2]) and iou[3] == pytest.approx(1 / 2)
    assert cm.miou() == pytest.approx((2 / 4 + 0 + 1 / 2) / 3)
    assert cm.miou([0, 3]) == pytest.approx(0.5)


def test_subsets_are_the_class_lists_of_ash_tables_2_and_3():
    names = data.CLASS_NAMES
    assert [names[c] for c in SUBSETS["13"]] == ["road", "sidewalk", "building", "traffic light", "traffic sign",
                                                 "vegetation", "sky", "person", "rider", "car", "bus",
                                                 "motorcycle", "bicycle"]
    assert sorted(set(range(19)) - set(SUBSETS["16"])) == [names.index(n) for n in ("terrain", "truck", "train")]
    assert set(SUBSETS["13"]) < set(SUBSETS["16"]) and len(SUBSETS["19"]) == 19
    g = torch.Generator().manual_seed(1)
    cm = ConfusionMatrix(19)
    cm.update(torch.randint(0, 19, (64, 64), generator=g), torch.randint(0, 19, (64, 64), generator=g))
    assert cm.miou("13") == pytest.approx(cm.iou()[list(SUBSETS["13"])].mean().item())
    table = cm.table()
    assert "motorcycle" in table and "mIoU (16)" in table and f"{100 * cm.miou('13'):.2f}" in table


def test_update_rejects_label_ids_and_out_of_range_predictions():
    cm = ConfusionMatrix(19)
    with pytest.raises(ValueError, match="label ids"):
        cm.update(torch.zeros(4, dtype=torch.uint8), torch.tensor([7, 26, 33, 255], dtype=torch.uint8))
    with pytest.raises(ValueError, match="predictions"):
        cm.update(torch.tensor([0, 19]), torch.tensor([0, 1]))
    assert cm.mat.sum() == 0


def test_all_reduce_runs_in_a_process_group_and_is_a_no_op_without_one(tmp_path):
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([1]), torch.tensor([2]))
    expected = cm.mat.clone()
    assert torch.equal(cm.all_reduce().mat, expected)  # not distributed
    meter = OODMeter()
    meter.update(torch.tensor([0.5, 0.25]), torch.tensor([1, 0]))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert torch.equal(cm.all_reduce().mat, expected)  # the sum over a world of one
        assert meter.all_reduce().compute()["auroc"] == 1
    finally:
        torch.distributed.destroy_process_group()


# --- OOD detection --------------------------------------------------------------------------

def brute_force_ood(scores, is_ood, tpr=0.95):
    """Definitions, literally: pairs for AUROC, every distinct threshold for AP and FPR."""
    keep = (is_ood == 0) | (is_ood == 1)
    s, y = scores[keep].double().tolist(), is_ood[keep].tolist()
    pos = [v for v, t in zip(s, y) if t == 1]
    neg = [v for v, t in zip(s, y) if t == 0]
    auroc = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    ap, recall_prev, fpr = 0.0, 0.0, None
    for t in sorted(set(s), reverse=True):
        tp = sum(v >= t for v in pos)
        fp = sum(v >= t for v in neg)
        ap += (tp / len(pos) - recall_prev) * tp / (tp + fp)
        recall_prev = tp / len(pos)
        if fpr is None and tp / len(pos) >= tpr:
            fpr = fp / len(neg)
    return auroc, ap, fpr


def tied_scores(n, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-40, 40, (n,), generator=g).float() / 16  # many ties, on a 2^-4 grid
    is_ood = (torch.rand(n, generator=g) < 0.25 + 0.005 * scores).long()
    is_ood[torch.rand(n, generator=g) < 0.05] = 255  # void
    return scores, is_ood


@pytest.mark.parametrize("seed", [0, 1])
def test_ood_metrics_equal_the_definitions_with_ties(seed):
    scores, is_ood = tied_scores(700, seed)
    auroc, ap, fpr = brute_force_ood(scores, is_ood)
    assert metrics.auroc(scores, is_ood) == pytest.approx(auroc, abs=1e-12)
    assert metrics.aupr(scores, is_ood) == pytest.approx(ap, abs=1e-12)
    assert metrics.fpr_at_tpr(scores, is_ood) == pytest.approx(fpr, abs=1e-12)
    assert metrics.fpr_at_tpr(scores, is_ood, tpr=0.5) == pytest.approx(brute_force_ood(scores, is_ood, 0.5)[2])


def test_ood_metrics_on_hand_cases():
    y = torch.tensor([0, 0, 0, 1, 1])
    separated = torch.tensor([0.1, 0.2, 0.3, 0.8, 0.9])
    assert (metrics.auroc(separated, y), metrics.aupr(separated, y), metrics.fpr_at_tpr(separated, y)) == (1, 1, 0)
    tied = torch.full((5,), 0.5)  # one threshold: everything is OOD
    assert (metrics.auroc(tied, y), metrics.aupr(tied, y), metrics.fpr_at_tpr(tied, y)) == (0.5, 2 / 5, 1)
    with pytest.raises(ValueError, match="both"):
        metrics.auroc(separated, torch.ones(5))
    # scikit-learn's documented examples: average_precision_score 0.83 (= 1/2 * 1 + 1/2 * 2/3), roc_auc_score 0.75
    y, s = torch.tensor([0, 0, 1, 1]), torch.tensor([0.1, 0.4, 0.35, 0.8])
    assert metrics.aupr(s, y) == pytest.approx(5 / 6) and metrics.auroc(s, y) == pytest.approx(0.75)


def test_ood_meter_streams_batches_exactly_for_scores_on_its_grid():
    scores, is_ood = tied_scores(3000, 2)
    half = torch.randn(3000).half().float()  # float16 values: exact for mantissa_bits >= 10
    for s in (scores, half):
        meter = OODMeter()
        meter.update(s[:1000].view(10, 100), is_ood[:1000].view(10, 100))  # any shape
        for s_batch, y_batch in zip(s[1000:].split(700), is_ood[1000:].split(700)):
            meter.update(s_batch, y_batch)
        result = meter.compute()
        assert result["auroc"] == pytest.approx(metrics.auroc(s, is_ood), abs=1e-12)
        assert result["aupr"] == pytest.approx(metrics.aupr(s, is_ood), abs=1e-12)
        assert result["fpr95"] == pytest.approx(metrics.fpr_at_tpr(s, is_ood), abs=1e-12)


def test_ood_meter_equals_the_exact_metrics_of_scores_truncated_to_its_mantissa_bits():
    g = torch.Generator().manual_seed(6)
    is_ood = (torch.rand(70000, generator=g) < 0.2).long()  # more than one chunk
    scores = torch.randn(70000, generator=g) + is_ood  # both signs
    mantissa, exponent = torch.frexp(scores)  # scores = mantissa * 2^exponent, |mantissa| in [0.5, 1)
    truncated = torch.ldexp(torch.trunc(mantissa * 2 ** 4) / 2 ** 4, exponent)  # keep 1 + 3 bits, toward 0
    meter = OODMeter(mantissa_bits=3)
    meter.update(scores, is_ood)
    result = meter.compute()
    assert result["auroc"] == pytest.approx(metrics.auroc(truncated, is_ood), abs=1e-12)
    assert result["aupr"] == pytest.approx(metrics.aupr(truncated, is_ood), abs=1e-12)
    assert result["fpr95"] == pytest.approx(metrics.fpr_at_tpr(truncated, is_ood), abs=1e-12)
    assert result["auroc"] != pytest.approx(metrics.auroc(scores, is_ood), abs=1e-6)  # 3 bits do tie scores


def test_ood_meter_is_close_for_arbitrary_floats_and_honours_valid():
    g = torch.Generator().manual_seed(3)
    is_ood = (torch.rand(20000, generator=g) < 0.1).long()
    scores = torch.randn(20000, generator=g) + 1.5 * is_ood
    valid = torch.rand(20000, generator=g) < 0.8
    meter = OODMeter()
    meter.update(scores, is_ood, valid)
    result = meter.compute()
    assert result["auroc"] == pytest.approx(metrics.auroc(scores[valid], is_ood[valid]), abs=1e-4)
    assert result["aupr"] == pytest.approx(metrics.aupr(scores[valid], is_ood[valid]), abs=1e-3)
    assert result["fpr95"] == pytest.approx(metrics.fpr_at_tpr(scores[valid], is_ood[valid]), abs=1e-3)


def test_anomaly_scores_are_higher_for_uncertain_pixels():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 3, 4, generator=g) * 3
    p = logits.softmax(1)
    assert torch.allclose(metrics.anomaly_scores(logits, "msp"), 1 - p.amax(1), atol=1e-6)
    assert torch.allclose(metrics.anomaly_scores(logits, "entropy"), -(p * p.log()).sum(1), atol=1e-5)
    assert torch.equal(metrics.anomaly_scores(logits, "maxlogit"), -logits.amax(1))
    confident, uniform = torch.tensor([8.0, 0, 0, 0, 0]), torch.zeros(5)
    pair = torch.stack([confident, uniform])[:, :, None, None]  # (2, 5, 1, 1)
    for kind in ("msp", "entropy", "maxlogit"):
        s = metrics.anomaly_scores(pair, kind).flatten()
        assert s[1] > s[0], kind
    assert metrics.anomaly_scores(pair, "entropy")[1].item() == pytest.approx(math.log(5))


# --- FID ------------------------------------------------------------------------------------

def test_fid_inception_loads_torchvision_inception_state_dict_strictly():
    reference = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    model = metrics.FIDInception()
    ref_sd, sd = reference.state_dict(), model.state_dict()
    assert list(ref_sd) == list(sd) and all(ref_sd[k].shape == sd[k].shape for k in sd)
    model.load_state_dict(ref_sd, strict=True)


@pytest.mark.parametrize("fid_block, block, pool, args", [
    (metrics.FIDInceptionA, torchvision.models.inception.InceptionA, "avg", (16, 8)),
    (metrics.FIDInceptionC, torchvision.models.inception.InceptionC, "avg", (16, 8)),
    (metrics.FIDInceptionE_1, torchvision.models.inception.InceptionE, "avg", (16,)),
    (metrics.FIDInceptionE_2, torchvision.models.inception.InceptionE, "max", (16,)),
])
def test_fid_blocks_differ_from_torchvision_only_in_the_pooling_branch(fid_block, block, pool, args):
    torch.manual_seed(0)
    ours, theirs = fid_block(*args).eval(), block(*args).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 16, 7, 7)
    out, ref = ours(x), theirs(x)
    n_pool = ours.branch_pool.conv.out_channels
    assert torch.allclose(out[:, :-n_pool], ref[:, :-n_pool], atol=1e-5)  # the other branches are torchvision's
    pooled = F.max_pool2d(x, 3, 1, 1) if pool == "max" else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    assert torch.allclose(out[:, -n_pool:], ours.branch_pool(pooled), atol=1e-5)
    assert not torch.allclose(out[:, -n_pool:], ref[:, -n_pool:], atol=1e-3)  # torchvision pools differently


def test_fid_without_weights_names_the_file_and_where_it_is_published(tmp_path):
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"pt_inception-2015-12-05-6726825d\.pth.*github\.com/mseitzer/pytorch-fid"):
        metrics.fid(images, images)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.pth")):
        metrics.fid(images, images, weights=tmp_path / "missing.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        metrics.fid(images, images, weights=tmp_path / "corrupt.pth")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.spectral_distance(images * 2 - 1, images)  # tanh-range images are refused


def test_fid_inception_equals_pytorch_fids_patched_torchvision_model():
    """pytorch-fid builds torchvision's Inception3, swaps in the FID blocks, resizes to 299 and scales to [-1, 1]."""
    torch.manual_seed(0)
    reference = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    reference.Mixed_5b, reference.Mixed_5c = metrics.FIDInceptionA(192, 32), metrics.FIDInceptionA(256, 64)
    reference.Mixed_5d = metrics.FIDInceptionA(288, 64)
    reference.Mixed_6b, reference.Mixed_6c = metrics.FIDInceptionC(768, 128), metrics.FIDInceptionC(768, 160)
    reference.Mixed_6d, reference.Mixed_6e = metrics.FIDInceptionC(768, 160), metrics.FIDInceptionC(768, 192)
    reference.Mixed_7b, reference.Mixed_7c = metrics.FIDInceptionE_1(1280), metrics.FIDInceptionE_2(2048)
    model = metrics.FIDInception(resize_input=False)  # the trunk at 96 x 96 keeps the test fast
    model.load_state_dict(reference.state_dict(), strict=True)
    reference.dropout, reference.fc = nn.Identity(), nn.Identity()  # its forward then returns the pooled features
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():  # train mode: batch-statistics BatchNorm keeps random-weight activations O(1)
        features, expected = model.train()(x), reference.train()(2 * x - 1)
    assert features.shape == (2, 2048) and features.abs().mean() > 0.1
    assert torch.allclose(features, expected, rtol=1e-4, atol=1e-6)
    y = torch.rand(2, 3, 24, 32)
    resized = F.interpolate(y, size=(299, 299), mode="bilinear", align_corners=False)
    assert torch.equal(metrics.FIDInception().preprocess(y), 2 * resized - 1)


def test_fid_loads_weights_and_reads_npz_statistics(tmp_path):
    torch.manual_seed(0)
    torch.save(metrics.FIDInception().state_dict(), tmp_path / "w.pth")
    mu1, mu2 = np.zeros(4), np.array([1.0, 0, 0, 0])
    np.savez(tmp_path / "a.npz", mu=mu1, sigma=np.diag([1.0, 4, 9, 0]))
    np.savez(tmp_path / "b.npz", mu=mu2, sigma=np.diag([4.0, 4, 1, 1]))
    value = metrics.fid(tmp_path / "a.npz", tmp_path / "b.npz", weights=tmp_path / "w.pth", device="cpu")
    assert value == pytest.approx(1 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2 + (0 - 1) ** 2)


@pytest.mark.filterwarnings("ignore:.*images < 2048")
def test_inception_statistics_stream_mean_and_unbiased_covariance(tmp_path):
    g = torch.Generator().manual_seed(5)
    images = torch.rand(7, 3, 4, 4, generator=g)
    for i in range(5):  # the first five also as PNGs: the folder route reads them back exactly
        data.write_image(tmp_path / f"{i}.png", images[i])
    images[:5] = torch.stack([data.read_image(tmp_path / f"{i}.png") for i in range(5)])
    feature = nn.Sequential(nn.Flatten(), nn.Linear(48, 6)).double()
    model = lambda x: feature(x.double())  # noqa: E731
    feats = model(images).detach()
    mu, sigma = metrics.inception_statistics(list(images.split(3)), model, batch_size=2)  # uneven batches
    assert torch.allclose(mu, feats.mean(0)) and torch.allclose(sigma, torch.cov(feats.T))
    mu, sigma = metrics.inception_statistics(tmp_path, model, batch_size=2)
    assert torch.allclose(mu, feats[:5].mean(0)) and torch.allclose(sigma, torch.cov(feats[:5].T))


def random_rotation(d, seed):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * r.diag().sign()


def test_frechet_distance_matches_the_closed_form_for_co_diagonalisable_covariances():
    d, q = 64, random_rotation(64, 0)
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(d, generator=g, dtype=torch.float64) * 3, torch.rand(d, generator=g, dtype=torch.float64)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T  # commuting: sqrt(s1 s2) = Q diag(sqrt(ab)) Q^T
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected.item(), rel=1e-9)
    assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected.item(), rel=1e-9)
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + (2 - 3) ** 2)


def test_frechet_distance_matches_the_eigenvalues_of_sigma1_sigma2():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(50, 20, generator=g, dtype=torch.float64), torch.randn(60, 20, generator=g, dtype=torch.float64)
    s1, s2 = torch.cov(x.T), torch.cov((y @ torch.randn(20, 20, generator=g, dtype=torch.float64)).T)
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()  # the sqrtm trace, by another route
    expected = s1.trace() + s2.trace() - 2 * tr_sqrt
    value = metrics.frechet_distance(torch.zeros(20), s1, torch.zeros(20), s2)
    assert value == pytest.approx(expected.item(), rel=1e-9)


def test_frechet_distance_handles_singular_covariances_and_the_eps_offset():
    d, q = 32, random_rotation(32, 3)
    a, b = torch.linspace(0, 2, d, dtype=torch.float64), torch.linspace(1, 0, d, dtype=torch.float64)
    a[::3] = 0  # rank-deficient, as the covariance of fewer samples than dimensions
    s1, s2, mu = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T, torch.zeros(d)
    exact = ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert metrics.frechet_distance(mu, s1, mu, s2) == pytest.approx(exact, rel=1e-6)
    eps = 1e-6  # pytorch-fid's offset: sigma + eps I on both sides
    offset = (((a + eps).sqrt() - (b + eps).sqrt()) ** 2).sum().item()
    assert metrics.frechet_distance(mu, s1, mu, s2, eps=eps) == pytest.approx(offset, rel=1e-6)
    with pytest.raises(ValueError, match="positive semi-definite"):
        metrics.frechet_distance(mu, -s2, mu, s2)


# --- spectral distance ----------------------------------------------------------------------

def waves(cycles, n=3, size=64, seed=0):
    """Random images plus a horizontal sinusoid with `cycles` periods over the width."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(size, dtype=torch.float64)
    wave = 0.15 * torch.cos(2 * math.pi * cycles * x / size)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 0.5 + 0.2 + wave  # in [0.05, 0.85]


def test_spectral_distance_is_zero_on_identical_sets_and_symmetric():
    a, b = waves(0), waves(0, seed=1)
    for paired in (False, True):
        assert metrics.spectral_distance(a, a.clone(), paired=paired) == 0
        assert metrics.spectral_distance(a, b, 1, paired) == pytest.approx(metrics.spectral_distance(b, a, 1, paired))
        assert metrics.spectral_distance(a, b, 0, paired) > 0


def test_high_pass_filter_rates_remove_the_mean_and_then_higher_frequencies():
    a = waves(0)
    for paired in (False, True):
        shifted = a + 0.1  # differs only in the mean (the DC term)
        assert metrics.spectral_distance(a, shifted, 0, paired) > 1e-6
        assert metrics.spectral_distance(a, shifted, 1, paired) < 1e-12
        assert metrics.spectral_distance(a, shifted, 2, paired) < 1e-12
    low, mid = waves(4), waves(12)  # 4/64 = 0.0625 and 12/64 = 0.1875 cycles/pixel
    assert metrics.spectral_distance(a, low, 0) > 1e-6 and metrics.spectral_distance(a, low, 1) < 1e-12
    assert metrics.spectral_distance(a, mid, 1) > 1e-6 and metrics.spectral_distance(a, mid, 2) < 1e-12
    assert metrics.spectral_distance(a, waves(24), 2) > 1e-6  # 0.375 cycles/pixel passes the high cutoff
    masks = [metrics.high_pass_mask(32, 48, r) for r in (0, 1, 2)]
    assert masks[0].all() and not masks[1][16, 24] and (masks[1] >= masks[2]).all() and masks[2].any()


def test_spectral_distance_reads_folders(tmp_path):
    images = (waves(3).float() * 255).round() / 255
    for i, image in enumerate(images):
        data.write_image(tmp_path / f"{i}.png", image)
    assert metrics.spectral_distance(tmp_path, images, 0) == pytest.approx(0, abs=1e-6)
    assert metrics.spectral_distance(tmp_path, waves(5), 1, paired=True) > 1e-6


# --- model cost -----------------------------------------------------------------------------

def test_count_macs_matches_hand_counts_of_conv_linear_and_norm_layers():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                      # 8 * 3 * 9 MACs at 16 x 16
        nn.BatchNorm2d(8),                                  # 2 MACs per element (normalise + affine)
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4),  # 8 * (8 / 4) * 9 at 16 x 16
        nn.InstanceNorm2d(8),                               # 1 MAC per element (no affine)
        nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1),   # 8 * 4 * 16 per INPUT position (16 x 16)
        nn.GroupNorm(2, 4),                                 # 2 per element, at 32 x 32
        nn.Flatten(2), nn.Linear(32 * 32, 10),              # (4 rows) * 1024 * 10
        nn.LayerNorm(10),                                   # 2 per element
    )
    n = 2
    per_image = (8 * 3 * 9 * 256 + 2 * 8 * 256 + 8 * 2 * 9 * 256 + 8 * 256 + 8 * 4 * 16 * 256
                 + 2 * 4 * 1024 + 4 * 1024 * 10 + 2 * 4 * 10)
    assert metrics.count_macs(net, torch.randn(n, 3, 16, 16)) == n * per_image
    assert metrics.count_parameters(net) == sum(p.numel() for p in net.parameters())
    assert metrics.count_parameters(nn.Linear(3, 2)) == 8


def test_count_macs_torchinfo_convention_is_parameters_times_output_positions():
    shared = nn.Conv2d(4, 4, 1)  # called twice: counted per call

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1),  # (4*3*9 + 4) params at 8 x 8
                                      nn.BatchNorm2d(4), nn.PReLU(), nn.ReLU())  # 8 and 1 params, x batch only
            self.shared = shared
            self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)  # (4*2*4 + 2) params at its OUTPUT 16 x 16
            self.fc = nn.Linear(2, 5)  # on (N, 256 tokens, 2): (2*5 + 5) params x batch, tokens not counted

        def forward(self, x):
            x = self.shared(self.shared(self.body(x)))
            x = self.up(x)
            return self.fc(x.flatten(2).transpose(1, 2)) @ torch.ones(5, 7)  # the matmul is functional: 0

    n = 3
    hand = n * ((4 * 3 * 9 + 4) * 64 + 8 + 1 + 2 * (4 * 4 + 4) * 64 + (4 * 2 * 4 + 2) * 256 + (2 * 5 + 5))
    assert metrics.count_macs(Net(), torch.randn(n, 3, 16, 16), convention="torchinfo") == hand
    with torch.device("meta"):  # counts without computing
        assert metrics.count_macs(Net(), torch.zeros(n, 3, 16, 16), convention="torchinfo") == hand
    with pytest.raises(data.BadInput):
        metrics.count_macs(Net(), torch.randn(1, 3, 16, 16), convention="ptflops")


def test_count_macs_counts_attention_matmuls():
    b, length, e = 2, 10, 16
    mha = nn.MultiheadAttention(e, 4, batch_first=True)
    x = torch.randn(b, length, e)
    hand = b * (3 * length * e * e + 2 * length * length * e + length * e * e)  # q,k,v proj, QK^T, AV, out proj
    assert metrics.count_macs(mha, x, x, x) == hand
    assert metrics.count_macs(mha.eval(), x, x, x, need_weights=False) == hand  # the SDPA / fast-path routes
    q = torch.randn(b, 4, length, 8)
    assert metrics.count_macs(lambda t: F.scaled_dot_product_attention(t, t, t), q) == b * 4 * 2 * length * length * 8


def test_peak_memory_reports_the_growth_during_fn():
    big = metrics.peak_memory(lambda: torch.ones(16 * 2 ** 20).sum())  # 64 MiB, touched
    assert 60 * 2 ** 20 < big < 120 * 2 ** 20
    small = metrics.peak_memory(lambda: torch.ones(1000).sum())  # right after: the peak was reset
    assert small < 16 * 2 ** 20


# --- command line ---------------------------------------------------------------------------

def test_miou_cli_reads_cityscapes_label_ids_and_prints_the_table(tmp_path, capsys):
    road, car, unlabeled = data.NAME_TO_ID["road"], data.NAME_TO_ID["car"], data.NAME_TO_ID["unlabeled"]
    gt = torch.tensor([[road, road, car, unlabeled]])
    pred = torch.tensor([[0, 13, 13, 5]])  # trainIds: road, car, car, pole (ignored)
    data.write_label(tmp_path / "gt" / "city" / "a_000001_gtFine_labelIds.png", gt)
    data.write_label(tmp_path / "gt" / "city" / "a_000001_gtFine_color.png", torch.zeros(1, 4))
    data.write_label(tmp_path / "pred" / "a_000001_leftImg8bit.png", pred)
    metrics.main(["miou", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")])
    lines = capsys.readouterr().out.splitlines()
    assert next(l for l in lines if l.startswith("road")).split()[-1] == "50.00"  # TP 1, FN 1
    assert next(l for l in lines if l.startswith("car")).split()[-1] == "50.00"   # TP 1, FP 1
    assert next(l for l in lines if l.startswith("pole")).split()[-1] == "nan"    # predicted on ignore only
    assert next(l for l in lines if l.startswith("mIoU (19)")).split()[-1] == "50.00"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="a_000001"):
        metrics.main(["miou", "--pred", str(tmp_path / "empty"), "--gt", str(tmp_path / "gt")])


def test_command_lines_answer_a_missing_path_or_bad_value_with_one_line_and_status_2(tmp_path, capsys):
    data.write_image(tmp_path / "images" / "a.png", torch.rand(3, 8, 8))
    images = str(tmp_path / "images")
    for argv, message in (
            (["fid", "--real", images, "--fake", images, "--weights", str(tmp_path / "missing.pth")],
             f"FID Inception weights not found at {tmp_path / 'missing.pth'}; expected "
             "pt_inception-2015-12-05-6726825d.pth, published at https://github.com/mseitzer/pytorch-fid"),
            (["fid", "--real", str(tmp_path / "nowhere"), "--fake", images],
             f"FID: image folder or statistics not found: {tmp_path / 'nowhere'}"),
            (["fid", "--real", images, "--fake", images, "--batch-size", "0"], "--batch-size must be at least 1"),
            (["miou", "--pred", images, "--gt", str(tmp_path / "nowhere")],
             f"label folder not found: {tmp_path / 'nowhere'}"),
            (["spectral", "--real", str(tmp_path / "nowhere"), "--fake", images],
             f"image folder not found: {tmp_path / 'nowhere'}")):
        with pytest.raises(SystemExit) as e:
            data.cli(metrics.main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: " + message) and err.count("\n") == 1, err
