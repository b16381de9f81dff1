"""Robusta (robusta.py): label morphology (Appendix D), networks (Table A1), losses (Eq. A1-A9),
two-stage training, checkpoints and dataset generation, at tiny sizes on CPU."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import data
import metrics
import segment
import robusta
from robusta import (GCoarse, GFine, MultiscaleDiscriminator, SPADE, VGGLoss, closing, dilate, dilate_labels, erode,
                     erode_labels, opening, structuring_element)

ROAD, SIDEWALK, PERSON, CAR, SIGN = 7, 8, 24, 26, 20


def brute_dilate(x, se):
    """Eq. (A11) literally: max over h in B of x(p - h), outside the image ignored."""
    kh, kw = se.shape
    out = torch.full_like(x, float("-inf"))
    for i, j in se.nonzero().tolist():
        dy, dx = i - kh // 2, j - kw // 2
        for y in range(x.shape[-2]):
            for x_ in range(x.shape[-1]):
                if 0 <= y - dy < x.shape[-2] and 0 <= x_ - dx < x.shape[-1]:
                    out[..., y, x_] = torch.maximum(out[..., y, x_], x[..., y - dy, x_ - dx])
    return out


def tiny_elements():
    torch.manual_seed(0)
    return [structuring_element("square", 3), structuring_element("rectangle", (2, 5)), structuring_element("cross", 5),
            structuring_element("disk", 2), torch.rand(3, 4) > 0.4]


# --- Label morphology (Appendix D) ------------------------------------------------------------


def test_structuring_elements():
    assert structuring_element("square", 15).sum() == 225
    assert torch.equal(structuring_element("disk", 1), structuring_element("cross", 3))
    assert structuring_element("disk", 2).sum() == 13  # x^2 + y^2 <= 4
    assert structuring_element("rectangle", (3, 7)).shape == (3, 7)
    with pytest.raises(ValueError):
        structuring_element("hexagon", 3)


def test_dilation_is_eq_a11_and_erosion_its_adjoint():
    x = torch.randn(2, 3, 9, 11)
    for se in tiny_elements():
        assert torch.equal(dilate(x, se), brute_dilate(x, se))
        # erosion = min over h of x(p + h) = -dilation of -x by the reflected element (duality)
        reflected = torch.zeros(se.shape[0] + 1 - se.shape[0] % 2, se.shape[1] + 1 - se.shape[1] % 2, dtype=torch.bool)
        reflected[:se.shape[0], :se.shape[1]] = se  # odd-sized copy with the same origin...
        reflected = reflected.flip(0, 1)  # ...then reflected about it
        assert torch.equal(erode(x, se), -dilate(-x, reflected))


def test_lattice_laws():
    torch.manual_seed(1)
    x, y = torch.randn(1, 2, 12, 10), torch.randn(1, 2, 12, 10)
    for se in tiny_elements():
        if se[se.shape[0] // 2, se.shape[1] // 2]:  # origin in B: anti-extensive erosion, extensive dilation
            assert (erode(x, se) <= x).all() and (x <= dilate(x, se)).all()
        o, c = opening(x, se), closing(x, se)
        assert (o <= x).all() and (x <= c).all()
        assert torch.equal(opening(o, se), o) and torch.equal(closing(c, se), c)  # idempotent
        # adjunction: dilate(x) <= y  <=>  x <= erode(y)
        for a, b in ((x, dilate(x, se)), (erode(y, se), y), (x, y), (x, dilate(x, se) - 1e-3)):
            assert bool((dilate(a, se) <= b).all()) == bool((a <= erode(b, se)).all())


def test_integer_maps_and_borders():
    x = torch.zeros(1, 1, 5, 5, dtype=torch.uint8)
    x[0, 0, 0, 0] = 9
    d = dilate(x, structuring_element("square", 3))
    assert d.dtype == torch.uint8 and d[0, 0, :2, :2].eq(9).all() and d.sum() == 9 * 4
    assert erode(torch.ones(1, 1, 4, 4), structuring_element("disk", 3)).eq(1).all()  # borders do not erode


def scene():
    """9x9: road (cols 0-5) and sidewalk (cols 6-8); a car block rows 2-6, cols 2-6; a person pixel."""
    labels = torch.full((1, 9, 9), ROAD)
    labels[..., 6:] = SIDEWALK
    labels[0, 2:7, 2:7] = CAR
    labels[0, 4, 7] = PERSON
    return labels


def test_label_dilation_follows_the_lexicographic_order():
    labels = scene()
    out = dilate_labels(labels, structuring_element("cross", 3))
    assert out[0, 4, 8] == PERSON and out[0, 3, 7] == PERSON and out[0, 4, 6] == PERSON  # person > car
    assert out[0, 1, 2] == CAR and out[0, 2, 1] == CAR and out[0, 1, 1] == ROAD  # car grows over stuff by the cross
    changed = out != labels
    assert torch.isin(out[changed], torch.tensor([PERSON, CAR])).all()  # stuff changes only under a grown object
    assert (out[labels == PERSON] == PERSON).all()  # the higher rank is never overgrown
    only_cars = dilate_labels(labels, structuring_element("cross", 3), classes=["car"])
    assert (only_cars == PERSON).sum() == 1 and only_cars[0, 4, 6] == CAR  # persons do not grow


def test_label_erosion_frees_pixels_to_the_window_majority():
    labels = scene()
    labels[0, 4, 7] = SIDEWALK
    out = erode_labels(labels, structuring_element("square", 3))
    assert (out == CAR).sum() == 9 and (out[0, 3:6, 3:6] == CAR).all()
    assert out[0, 2, 2] == ROAD  # window: 5 road pixels, 0 sidewalk
    assert out[0, 2, 6] == SIDEWALK  # window: 4 sidewalk pixels, 1 road
    person = torch.full((1, 5, 6), ROAD)
    person[0, :, 3:] = CAR
    person[0, 1:4, 1:4] = PERSON  # a person in front of a car
    eroded = erode_labels(person, structuring_element("square", 3))
    assert eroded[0, 2, 3] == CAR and eroded[0, 2, 2] == PERSON and eroded[0, 1, 1] == ROAD  # inf = the lower object
    only_cars = erode_labels(person, structuring_element("square", 3), classes=["car"])
    assert torch.equal(only_cars == PERSON, person == PERSON) and only_cars[0, 0, 3] == ROAD  # persons keep their shape


def test_edit_strings():
    assert robusta.parse_edit("close:rectangle:3x5:person,car") == {
        "op": "close", "shape": "rectangle", "size": (3, 5), "classes": ["person", "car"]}
    with pytest.raises(ValueError):
        robusta.parse_edit("grow:disk:3")
    labels = scene()
    cross = structuring_element("cross", 3)
    assert torch.equal(robusta.edit_labels(labels, "dilate:disk:1"), dilate_labels(labels, cross))


def test_morphology_on_ade20k_and_coco_stuff_maps_uses_their_own_tables(tmp_path):
    ade = robusta.LABEL_TABLES["ade20k"]
    road, person, car = ade["road"], ade["person"], ade["car"]
    assert (road, person, car) == (7, 13, 21)  # in Cityscapes ids: 7 road, 13 fence, 21 vegetation (stuff)
    labels = torch.full((1, 7, 9), road)
    labels[0, 2:5, 1:4] = person
    labels[0, 2:5, 4:7] = car  # a person beside a car on the road
    cross = structuring_element("cross", 3)
    out = dilate_labels(labels, cross, dataset="ade20k")
    assert out[0, 3, 4] == person and out[0, 3, 7] == car and out[0, 1, 2] == person  # person > car > stuff
    assert torch.equal(dilate_labels(labels, cross), labels)  # Cityscapes ranks: ids 13 and 21 are stuff
    swapped = dilate_labels(labels, cross, robusta.parse_priority("car,person"), dataset="ade20k")
    assert swapped[0, 3, 3] == car and swapped[0, 3, 4] == car  # --priority: the car now grows over the person
    assert torch.equal(robusta.edit_labels(labels, "dilate:cross:3:car", dataset="ade20k"),
                       dilate_labels(labels, cross, classes=[car], dataset="ade20k"))
    coco = robusta.LABEL_TABLES["coco-stuff"]
    grass, dog, person = coco["grass"], coco["dog"], coco["person"]
    assert (person, dog, grass, coco["wood"], coco["unlabeled"]) == (0, 17, 123, 181, 182)
    labels = torch.full((1, 5, 8), grass)
    labels[0, 2, 2], labels[0, 2, 3] = dog, person
    out = dilate_labels(labels, cross, dataset="coco-stuff")
    assert out[0, 2, 1] == dog and out[0, 1, 2] == dog and out[0, 2, 4] == person  # every thing > stuff
    assert out[0, 2, 2] == person  # Appendix D's person ranks above the other things
    with pytest.raises(data.BadInput, match="signboard"):
        robusta.edit_labels(labels, "dilate:disk:1:signboard", dataset="coco-stuff")  # an ADE20K name
    # the edit command line on an ADE20K-style annotation file
    folder = tmp_path / "ade"
    folder.mkdir()
    ade_map = torch.full((7, 9), road)
    ade_map[2:5, 4:7] = car
    data.write_label(folder / "ADE_val_00000001.png", ade_map)
    robusta.main(["edit", "--labels", str(folder / "ADE_val_00000001.png"), "--edit", "dilate:cross:3",
                  "--dataset", "ade20k", "--out", str(tmp_path / "out")])
    edited = data.read_label(tmp_path / "out" / "ADE_val_00000001_gtFine_labelIds.png")
    assert edited[1, 5] == car and (edited == car).sum() == 9 + 12


# --- Networks (Table A1) and losses -------------------------------------------------------------


def test_spade_is_eq_a6():
    spade = SPADE(4, 35, hidden=8)
    assert [n for n, _ in spade.named_children()] == ["param_free_norm", "mlp_shared", "mlp_gamma", "mlp_beta"]
    x = torch.randn(2, 4, 6, 8)
    label = data.one_hot(torch.randint(0, 35, (2, 12, 16)))  # twice the resolution: resized nearest
    with torch.no_grad():
        spade.mlp_beta.weight.zero_()
        spade.mlp_beta.bias.fill_(0.5)
        spade.mlp_gamma.weight.zero_()
        spade.mlp_gamma.bias.fill_(1.0)
    x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(spade(x, label), x_hat * 2 + 0.5, atol=1e-5)


def tiny(label_nc=35, **kw):
    return GCoarse(label_nc, ngf=8, n_blocks=1, spade_hidden=8, **kw)


@pytest.mark.parametrize("segformer,spade", [("b0", True), ("b0", False), (None, True), (None, False)])
def test_gcoarse_ablations_build_and_run(segformer, spade):
    g = tiny(segformer=segformer, spade=spade)
    out = g(data.one_hot(torch.randint(0, 34, (2, 32, 64))))
    assert out.shape == (2, 3, 32, 64) and out.abs().max() <= 1
    assert (g.segformer is not None) == (segformer is not None)
    assert any(isinstance(m, SPADE) for m in g.modules()) == spade


@pytest.mark.parametrize("preset", sorted(robusta.PRESETS))
def test_every_preset_builds_with_the_right_shapes(preset, monkeypatch):
    args = robusta.options_from_preset(preset)
    with torch.device("meta"):  # the paper-size networks, shapes only
        g_coarse, d, g_fine, d_fine = robusta.build_networks(args)
        segformer = g_coarse.segformer
        assert segformer.encoder.patch_embed1.proj.in_channels == args.label_nc
        # SegFormer itself is segment.py's (tested there); here its decoder features' shape stands in
        monkeypatch.setattr(segformer, "features", lambda x: torch.zeros(1, segformer.embed_dim, 16, 16))
        label = torch.zeros(1, args.label_nc, 64, 64)
        coarse = g_coarse(label)
        assert coarse.shape == (1, 3, 64, 64)
        assert g_fine(robusta.low_resolution(coarse, args.fine_scale), label).shape == (1, 3, 64, 64)
        feats = d(label, coarse)
        assert len(feats) == 2 and [len(f) for f in feats] == [5, 5] and feats[0][-1].shape[1] == 1
    assert g_coarse.blocks[0].conv1.in_channels == 4 * args.ngf and len(g_coarse.blocks) == args.n_blocks
    assert g_coarse.fuse.conv.out_channels == 2 * args.ngf  # 128 at the latent resolution (Table A1)


def test_cityscapes_preset_matches_table_a11_within_10_percent(capsys):
    rows = {r["networks"]: r for r in robusta.profile(["cityscapes"])}  # counted on the meta device
    for part, paper in robusta.PAPER_COST.items():
        assert rows[part]["mparams"] == pytest.approx(paper["mparams"], rel=0.1), part
        assert rows[part]["gmacs_torchinfo"] == pytest.approx(paper["gmacs"], rel=0.1), part  # Table A11's count
    assert "98.6 M" in capsys.readouterr().out


def test_gfine_refines_and_upscales():
    image, label = torch.rand(1, 3, 16, 24) * 2 - 1, data.one_hot(torch.randint(0, 34, (1, 32, 48)))
    g = GFine(nf=8, n_blocks=1, scale=2, spade_hidden=8)
    assert g(image, label).shape == (1, 3, 32, 48)
    g = GFine(nf=8, n_blocks=1, spade=False)
    torch.nn.init.zeros_(g.tail.weight)
    torch.nn.init.zeros_(g.tail.bias)
    assert torch.allclose(g(image, label[..., :16, :24]), image)  # a zero residual returns the coarse image


def test_vgg_layout_matches_torchvision_and_loads(tmp_path):
    with torch.device("meta"):
        reference = torchvision.models.vgg19().features[:30].state_dict()
    ours = robusta.vgg19_features().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    checkpoint = {f"features.{k}": torch.randn_like(v) for k, v in ours.items()}
    checkpoint["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(checkpoint, tmp_path / "vgg19.pth")
    vgg = VGGLoss(tmp_path / "vgg19.pth")
    assert torch.equal(vgg.features[28].weight, checkpoint["features.28.weight"])
    with pytest.raises(FileNotFoundError, match="vgg19-dcbb9e9d"):
        VGGLoss(tmp_path / "missing.pth")
    real = torch.rand(1, 3, 32, 32)
    fake = torch.rand(1, 3, 32, 32, requires_grad=True)
    assert vgg(real, real) == 0
    loss = vgg(fake, real)
    loss.backward()
    assert loss > 0 and fake.grad.abs().sum() > 0 and all(p.grad is None for p in vgg.parameters())


def hand_made_outputs(features, logits):
    """D outputs as MultiscaleDiscriminator returns them: per scale, 4 intermediate maps + logits."""
    return [[torch.full((1, 2, 3, 3), float(f))] * 4 + [torch.full((1, 1, 3, 3), float(z))]
            for f, z in zip(features, logits)]


def test_loss_values_are_eq_a1_a4_a8_with_pix2pixhd_bookkeeping():
    real = hand_made_outputs(features=(0, 0), logits=(0.5, 2.0))
    fake = hand_made_outputs(features=(1, 3), logits=(0.25, -1.0))
    # Eq. (A8), summed over the 2 scales: G wants 1 on generated pairs, D 1 on real and 0 on generated
    assert robusta.gan_loss(real, True, "ls", for_discriminator=False) == pytest.approx(0.5 ** 2 + 1.0 ** 2)
    assert robusta.discriminator_loss(real, fake, "ls") == pytest.approx(
        0.5 * ((0.5 ** 2 + 1.0 ** 2) + (0.25 ** 2 + 1.0 ** 2)))
    # Eq. (A1): -log sigmoid(z) for real targets, -log(1 - sigmoid(z)) for generated ones
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    assert robusta.discriminator_loss(real, fake, "original") == pytest.approx(
        0.5 * (-np.log(sig(0.5)) - np.log(sig(2.0)) - np.log(1 - sig(0.25)) - np.log(1 - sig(-1.0))), rel=1e-6)
    assert robusta.gan_loss(fake, True, "hinge", for_discriminator=False) == pytest.approx(-0.25 + 1.0)
    # Eq. (A4): intermediate layers only (the logits differ but do not count), each |.| mean weighted
    # 1 / num_D x 4 / (n_layers + 1) = 1/2 x 1: scale 1 has 4 layers at distance 1, scale 2 at distance 3
    assert robusta.feature_matching_loss(fake, real) == pytest.approx(0.5 * (4 * 1 + 4 * 3))
    assert robusta.feature_matching_loss(fake, real, n_layers=1) == pytest.approx(2 * 0.5 * (4 * 1 + 4 * 3))
    # Eq. (A7): L_coarse = cGAN + lambda_L1 L1 + lambda_FM L_FM (+ lambda_VGG L_VGG, off here)
    args = robusta.options_from_preset("cityscapes")
    args.lambda_vgg = 0
    image, target = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    total, parts = robusta.coarse_generator_loss(fake, real, image, target, None, args)
    assert total == pytest.approx((0.75 ** 2 + 2.0 ** 2) + args.lambda_l1 * 0.5 + args.lambda_fm * 8.0)
    # Eq. (A9): L_fine = L_cGAN^MSE + lambda_FM L_FM (+ lambda_VGG L_VGG, off here)
    args.fine_lambda_vgg = 0
    total, _ = robusta.fine_generator_loss(fake, real, image, target, None, args)
    assert total == pytest.approx((0.75 ** 2 + 2.0 ** 2) + args.fine_lambda_fm * 8.0)


# --- Training, checkpoints, generation -------------------------------------------------------


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toycity") / "source"
    data.make_toycity(root, 4, size=(32, 64), domain="source", split="train")
    data.make_toycity(root, 2, size=(32, 64), domain="source", split="val")
    return root


TINY = ["--dataset", "toycity", "--size", "32", "64", "--fine-size", "32", "64", "--ngf", "8", "--n-blocks", "1",
        "--spade-hidden", "8", "--ndf", "8", "--fine-nf", "8", "--fine-blocks", "1", "--segformer", "b0",
        "--batch-size", "2", "--fine-batch-size", "2", "--lambda-vgg", "0", "--fine-lambda-vgg", "0",
        "--workers", "0", "--samples", "1", "--device", "cpu"]


class FakeRun:
    """The two things gan_step asks of segment.Run: an autocast context and a grad scaler (off)."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def toy_batch(toy_root):
    """Options of a tiny G_coarse (conv branch: fast) and one fixed batch of 2 ToyCity pairs."""
    args = robusta.resolve(robusta.build_parser().parse_args(
        ["train", "--data-root", str(toy_root)] + TINY + ["--segformer", "none"]))
    batch = next(iter(torch.utils.data.DataLoader(robusta.image_dataset(args, "val", args.size), batch_size=2)))
    return args, batch["image"] * 2 - 1, data.one_hot(batch["label_ids"])


def mean_logit(d, label, image):
    """D's mean patch output over its scales."""
    with torch.no_grad():
        return sum(float(o[-1].mean()) for o in d(label, image)) / len(d.scales)


def coarse_step(nets, opts, label, real, args, steps=1):
    g, d = nets
    for _ in range(steps):
        fake, scalars = robusta.gan_step(FakeRun(), g, d, *opts, label, (label,), real, robusta.coarse_generator_loss,
                                         "ls", None, args)
    return fake, scalars


def test_a_few_steps_lower_l_coarse(toy_batch):
    args, real, label = toy_batch
    torch.manual_seed(0)
    g_coarse, d, _, _ = robusta.build_networks(args)
    opts = robusta.adam(g_coarse, 1e-3, 0, args), robusta.adam(d, 1e-3, 0, args)
    losses = [coarse_step((g_coarse, d), opts, label, real, args)[1]["loss_g"] for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0]


def test_discriminator_gets_a_gradient_from_the_real_term_alone(toy_batch, monkeypatch):
    args, real, label = toy_batch
    torch.manual_seed(0)
    g_coarse, d, _, _ = robusta.build_networks(args)
    before = [p.detach().clone() for p in d.parameters()]
    seen = []
    monkeypatch.setattr(robusta, "discriminator_loss", lambda d_real, d_fake, mode: seen.append(1) or
                        robusta.gan_loss(d_real, True, mode))  # Eq. (A8): the real term only
    opt_d = robusta.adam(d, 1e-3, 0, args)
    step = opt_d.step
    grads = []
    opt_d.step = lambda *a, **k: (grads.append([p.grad.abs().sum() for p in d.parameters()]), step(*a, **k))[1]
    coarse_step((g_coarse, d), (robusta.adam(g_coarse, 1e-3, 0, args), opt_d), label, real, args)
    assert seen and len(grads) == 1 and all(g > 0 for g in grads[0])  # every D parameter learns from real pairs
    assert all(not torch.equal(p, q) for p, q in zip(d.parameters(), before))


def test_stage_1_discriminator_tells_real_from_generated(toy_batch):
    args, real, label = toy_batch
    torch.manual_seed(0)
    g_coarse, d, _, _ = robusta.build_networks(args)
    opts = robusta.adam(g_coarse, 2e-4, 0, args), robusta.adam(d, 2e-4, 0, args)
    fake, _ = coarse_step((g_coarse, d), opts, label, real, args, steps=30)
    on_real, on_fake = mean_logit(d, label, real), mean_logit(d, label, fake)
    assert on_real > 0.5 > on_fake and on_real - on_fake > 0.25, (on_real, on_fake)  # LS targets 1 / 0


def fine_setup(toy_batch):
    args, real, label = toy_batch
    torch.manual_seed(0)
    g_coarse, _, g_fine, d_fine = robusta.build_networks(args)
    g_coarse.eval().requires_grad_(False)  # as in train(): stage 2 reads a frozen G_coarse
    with torch.no_grad():
        coarse = robusta.low_resolution(g_coarse(label), args.fine_scale)  # I_LR
    return args, real, label, g_coarse, g_fine, d_fine, coarse


def test_stage_2_discriminator_tells_real_from_generated(toy_batch):
    args, real, label, _, g_fine, d_fine, coarse = fine_setup(toy_batch)
    opts = robusta.adam(g_fine, 2e-4, 0, args), robusta.adam(d_fine, 2e-4, 0, args)
    for _ in range(30):
        fake, _ = robusta.gan_step(FakeRun(), g_fine, d_fine, *opts, label, (coarse, label), real,
                                   robusta.fine_generator_loss, "ls", None, args)
    on_real, on_fake = mean_logit(d_fine, label, real), mean_logit(d_fine, label, fake)
    assert on_real > 0.5 > on_fake and on_real - on_fake > 0.25, (on_real, on_fake)


def adversarial_losses(g, d, label, inputs, real):
    """(D's Eq. A8 loss on the real pairs, G's Eq. A8 loss on its generated pairs), without updates."""
    with torch.no_grad():
        return (float(robusta.gan_loss(d(label, real), True)),
                float(robusta.gan_loss(d(label, g(*inputs)), True, for_discriminator=False)))


def test_d_alone_learns_real_pairs_and_g_alone_learns_to_fool_d(toy_batch):
    args, real, label = toy_batch
    torch.manual_seed(0)
    g, d, _, _ = robusta.build_networks(args)
    frozen = lambda m: robusta.adam(m, 0.0, 0, args)  # noqa: E731  (an optimizer that does not move)
    d_real_before, _ = adversarial_losses(g, d, label, (label,), real)
    g_before = [p.detach().clone() for p in g.parameters()]
    coarse_step((g, d), (frozen(g), robusta.adam(d, 1e-3, 0, args)), label, real, args, steps=10)
    d_real_after, g_adv_before = adversarial_losses(g, d, label, (label,), real)
    assert d_real_after < 0.5 * d_real_before  # D with G frozen: its loss on real pairs falls
    assert all(torch.equal(p, q) for p, q in zip(g.parameters(), g_before))
    args.lambda_l1, args.lambda_fm = 0.0, 0.0  # G's adversarial term alone (L_VGG is off in TINY)
    d_before = [p.detach().clone() for p in d.parameters()]
    coarse_step((g, d), (robusta.adam(g, 1e-3, 0, args), frozen(d)), label, real, args, steps=10)
    _, g_adv_after = adversarial_losses(g, d, label, (label,), real)
    assert g_adv_after < 0.5 * g_adv_before  # G with D frozen: its adversarial loss falls
    assert all(torch.equal(p, q) for p, q in zip(d.parameters(), d_before))


def test_each_optimizer_holds_exactly_its_own_network(toy_batch):
    args, _, _ = toy_batch
    g_coarse, d, g_fine, d_fine = robusta.build_networks(args)
    nets = {"g_coarse": g_coarse, "d": d, "g_fine": g_fine, "d_fine": d_fine}
    opts = robusta.optimizers(nets, args)
    for opt, net in (("opt_g", "g_coarse"), ("opt_d", "d"), ("opt_gf", "g_fine"), ("opt_df", "d_fine")):
        held = {id(p) for group in opts[opt].param_groups for p in group["params"]}
        assert held == {id(p) for p in nets[net].parameters()}, opt


@pytest.mark.parametrize("switch", ["--no-spade", "--no-spade-fine"])
def test_spade_switches_change_the_generator_they_name(toy_batch, switch):
    args, real, label = toy_batch
    coarse, fine = [], []
    for extra in ([], [switch]):
        torch.manual_seed(0)
        parsed = robusta.resolve(robusta.build_parser().parse_args(["train"] + TINY + ["--segformer", "none"] + extra))
        g_coarse, _, g_fine, _ = (m.eval() for m in robusta.build_networks(parsed))
        named = g_coarse if switch == "--no-spade" else g_fine  # SPADE 1 / SPADE 2 (Table A6)
        assert any(isinstance(m, SPADE) for m in named.modules()) == (not extra)
        with torch.no_grad():
            coarse.append(g_coarse(label))
            fine.append(g_fine(robusta.low_resolution(real, parsed.fine_scale), label))
    changed = coarse if switch == "--no-spade" else fine
    assert not torch.allclose(*changed, atol=1e-3)


def test_resume_loads_optimizer_state_after_moving_the_networks(toy_batch):
    args, real, label = toy_batch
    args.no_fine = True
    g, d, _, _ = robusta.build_networks(args)
    nets = {"g_coarse": g, "d": d, "g_fine": None, "d_fine": None}
    opts = robusta.optimizers(nets, args)
    coarse_step((g, d), (opts["opt_g"], opts["opt_d"]), label, real, args)
    state = {**{k: m.state_dict() for k, m in nets.items() if m is not None},
             **{k: o.state_dict() for k, o in opts.items()}}
    g2, d2, _, _ = robusta.build_networks(args)
    fresh = {"g_coarse": g2, "d": d2, "g_fine": None, "d_fine": None}
    opts2 = robusta.optimizers(fresh, args)
    # Optimizer.load_state_dict casts the state to the device AND dtype of the parameters it finds; on a
    # CPU-only machine a move to float64 stands in for the move to the run's GPU (run.wrap)
    moved = robusta.restore(state, fresh, opts2, lambda m: m.to(torch.float64))
    assert all(p.dtype == torch.float64 for m in moved.values() if m is not None for p in m.parameters())
    for opt in opts2.values():
        for group in opt.param_groups:
            for p in group["params"]:
                for key in ("exp_avg", "exp_avg_sq"):
                    assert (opt.state[p][key].device, opt.state[p][key].dtype) == (p.device, p.dtype)
    assert torch.equal(opts2["opt_d"].state[next(d2.parameters())]["exp_avg"].float(),
                       opts["opt_d"].state[next(d.parameters())]["exp_avg"])  # and it is the saved state


def test_stage_2_reads_g_coarse_and_leaves_it_untouched(toy_root, tmp_path, monkeypatch):
    saved, fine_inputs = [], []
    save = segment.Run.save
    monkeypatch.setattr(segment.Run, "save", lambda self, state, tag="last": (saved.append(
        (state["stage"], {k: v.clone() for k, v in state["g_coarse"].items()})), save(self, state, tag))[1])
    gan_step = robusta.gan_step

    def recording_step(run, g, d, opt_g, opt_d, label, inputs, *rest):
        if isinstance(g, GFine):
            fine_inputs.append((label.clone(), inputs[0].clone()))
        return gan_step(run, g, d, opt_g, opt_d, label, inputs, *rest)
    monkeypatch.setattr(robusta, "gan_step", recording_step)
    argv = ["train", "--data-root", str(toy_root), "--out", str(tmp_path), "--name", "frozen", "--epochs", "1",
            "--fine-epochs", "1", "--segformer", "none"] + TINY
    robusta.main(argv)
    after_stage_1 = [s for stage, s in saved if stage == "coarse"][-1]
    final = saved[-1][1]
    assert all(torch.equal(final[k], v) for k, v in after_stage_1.items())  # weights and BN buffers
    assert any("running_mean" in k for k in final) and len(fine_inputs) == 2
    args = robusta.resolve(robusta.build_parser().parse_args(argv))
    g_coarse = robusta.build_networks(args)[0]
    g_coarse.load_state_dict(after_stage_1)
    label, seen = fine_inputs[0]
    with torch.no_grad():
        assert torch.allclose(seen, robusta.low_resolution(g_coarse.eval()(label), args.fine_scale), atol=1e-6)


@pytest.fixture(scope="module")
def trained(toy_root, tmp_path_factory):
    """A tiny two-stage checkpoint: (checkpoint path, the command line that trained it)."""
    out = tmp_path_factory.mktemp("runs")
    argv = ["train", "--data-root", str(toy_root), "--out", str(out), "--name", "toy", "--epochs", "1",
            "--fine-epochs", "1"] + TINY
    return robusta.main(argv), argv


def test_paper_presets_refuse_a_missing_vgg(tmp_path, capsys):
    argv = ["train", "--dataset", "cityscapes", "--data-root", str(tmp_path), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as stop:
        data.cli(robusta.main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1
    assert "vgg19-dcbb9e9d.pth" in lines[0] and robusta.VGG19_URL in lines[0] and "--lambda-vgg 0" in lines[0]
    parse = lambda extra: robusta.resolve(robusta.build_parser().parse_args(argv + extra))  # noqa: E731
    robusta.check_vgg(parse(["--lambda-vgg", "0", "--fine-lambda-vgg", "0"]))  # L_VGG off: no VGG needed
    robusta.check_vgg(parse(["--lambda-vgg", "0", "--no-fine"]))  # stage 2 off
    with pytest.raises(data.MissingFile):
        robusta.check_vgg(parse(["--lambda-vgg", "0"]))  # stage 2 still uses it (Table A3: 10)
    robusta.check_vgg(robusta.resolve(robusta.build_parser().parse_args(["train", "--lambda-vgg", "5"])))  # demo


def test_generated_sets_are_named_after_their_source_split(trained, toy_root, tmp_path):
    checkpoint, _ = trained
    common = ["generate", "--checkpoint", str(checkpoint), "--data-root", str(toy_root), "--device", "cpu"]
    out = robusta.main(common + ["--out-root", str(tmp_path / "default")])  # train label maps -> train
    assert len(data.Cityscapes(out, "train")) == 4 and not (out / "leftImg8bit" / "val").exists()
    assert json.loads((out / "manifest.json").read_text())["source_split"] == "train"
    out = robusta.main(common + ["--split", "val", "--out-root", str(tmp_path / "val")])
    assert len(data.Cityscapes(out, "val")) == 2 and not (out / "leftImg8bit" / "train").exists()
    with pytest.raises(data.BadInput, match="allow-val-in-train"):
        robusta.main(common + ["--split", "val", "--out-split", "train", "--out-root", str(tmp_path / "leak")])
    assert not (tmp_path / "leak").exists()
    with pytest.raises(data.BadInput):
        robusta.main(common[:3] + ["--labels", str(toy_root / "gtFine" / "val"), "--out-split", "train",
                                   "--out-root", str(tmp_path / "leak")])
    out = robusta.main(common + ["--split", "val", "--out-split", "train", "--allow-val-in-train",
                                 "--out-root", str(tmp_path / "asked")])
    assert len(data.Cityscapes(out, "train")) == 2
    assert robusta.split_of(toy_root / "gtFine" / "val" / "city") == "val" and robusta.split_of(tmp_path) == "train"


def test_evaluate_uses_a_published_evaluator(trained, toy_root, tmp_path, monkeypatch):
    checkpoint, _ = trained
    calls = []

    class Evaluator(torch.nn.Module):  # stands in for DRN-D-105: RGB in [0, 1] -> logits at input size
        def forward(self, x):
            assert x.min() >= 0 and x.max() <= 1
            return data.one_hot(torch.full(x.shape[:1] + x.shape[2:], 0), 19)  # says "road" everywhere

    monkeypatch.setattr(segment, "load_evaluator", lambda name, path, num_classes=None: calls.append(
        (name, str(path), num_classes)) or Evaluator(), raising=False)
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data-root", str(toy_root), "--device", "cpu",
            "--segmenter", str(tmp_path / "drn.pth")]
    results = robusta.main(argv + ["--segmenter-model", "drn-d-105"])
    assert calls == [("drn-d-105", str(tmp_path / "drn.pth"), 19)]
    labels = torch.stack([s["labels"] for s in data.Cityscapes(toy_root, "val", size=(32, 64))])
    cm = metrics.ConfusionMatrix(19)
    cm.update(torch.zeros_like(labels), labels)
    assert results["fine/miou"] == results["real/miou"] == pytest.approx(float(cm.miou()))
    assert "drn-d-105" in robusta.EVALUATORS and "segformer-b5" in robusta.EVALUATORS
    with pytest.raises(SystemExit):
        robusta.main(argv + ["--segmenter-model", "no-such-net"])


def test_train_checkpoint_resume_and_generate(trained, tmp_path):
    checkpoint, argv = trained
    state = torch.load(checkpoint, weights_only=True)
    assert state["stage"] == "done" and state["step"] == 4  # 2 steps per stage
    g_coarse, g_fine, args = robusta.load_generators(checkpoint)
    assert all(torch.equal(v, state["g_coarse"][k]) for k, v in g_coarse.state_dict().items())
    assert all(torch.equal(v, state["g_fine"][k]) for k, v in g_fine.state_dict().items())
    run_dir = Path(checkpoint).parent
    assert (run_dir / "index.html").exists() and len(list((run_dir / "samples").glob("*.png"))) == 2
    assert robusta.main(argv + ["--resume", "auto"]) == checkpoint  # nothing left to do
    after = torch.load(checkpoint, weights_only=True)
    assert torch.equal(after["g_fine"]["tail.weight"], state["g_fine"]["tail.weight"])

    source = robusta.image_dataset(args, "val", args.size)
    out = robusta.generate(checkpoint, source, tmp_path / "gen", edits=["dilate:disk:1"], outliers=1,
                           source_split="val", split="train", allow_val_in_train=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint_sha256"] == robusta.sha256(checkpoint) and manifest["edits"][0]["op"] == "dilate"
    stem = source[0]["name"]
    ids = data.read_label(out / "gtFine" / "train" / "robusta" / f"{stem}_gtFine_labelIds.png")
    anomaly = data.read_label(out / "gtFine" / "train" / "robusta" / f"{stem}_gtFine_anomaly.png")
    assert ((anomaly == 1) == torch.isin(ids, torch.tensor(data.OUTLIER_IDS))).all() and (anomaly == 1).any()
    generated = data.Cityscapes(out, "train")
    assert len(generated) == 2 and generated[0]["image"].shape == (3, 32, 64)
    image = out / "leftImg8bit" / "train" / "robusta" / f"{stem}_leftImg8bit.png"
    before = image.stat().st_mtime_ns
    robusta.generate(checkpoint, source, tmp_path / "gen", edits=["dilate:disk:1"], outliers=1,
                     source_split="val", split="train", allow_val_in_train=True)
    assert image.stat().st_mtime_ns == before  # resumed: finished images are not rendered again


@pytest.fixture(scope="module")
def tiny_toycity(tmp_path_factory):
    root = tmp_path_factory.mktemp("toycity-all")
    for domain in ("source", "target", "outlier"):
        for split, n in (("train", 4), ("val", 2)):
            data.make_toycity(root / domain, n, (32, 64), domain, seed=0, split=split)
    return root


def test_experiment_end_to_end_on_a_tiny_toycity(tiny_toycity, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "toycity", lambda *a, **k: tiny_toycity)
    argv = ["--quick", "--seeds", "0", "1", "--size", "32", "64", "--segmenter-steps", "6", "--evaluator-steps", "6",
            "--segmenter-batch-size", "2",
            "--device", "cpu", "--out", str(tmp_path / "exp")]
    quality, robust = robusta.main(["experiment", *argv])
    out = tmp_path / "exp"
    stored = json.loads((out / "experiment.json").read_text())
    assert set(stored["cells"]) == {"evaluator"} | {f"{c}-s{s}" for s in (0, 1) for c in (
        "generator", "generator-nosegformer", "generated", "segmenter-real", "segmenter-robusta")}
    assert "fine/miou" in quality["full", 0] and "fine/miou" not in quality["bare", 0]
    for key in ("clean", "corrupted", "target"):
        assert 0 <= robust["robusta", 1][key] <= 100
    assert set(robust["real", 0]["outlier-source"]["maxlogit"]) == {"auroc", "aupr", "fpr95"}
    # the outlier split in the source look holds the scenes of ToyCity's outlier/ with the same anomaly maps
    ours, theirs = data.Cityscapes(out / "outlier-source", "val"), data.Cityscapes(tiny_toycity / "outlier", "val")
    assert torch.equal(ours[1]["anomaly"], theirs[1]["anomaly"])
    # the generated training set: edited maps with outliers, clean and under the training corruptions
    manifests = [json.loads((Path(r) / "manifest.json").read_text()) for r in stored["cells"]["generated-s0"]["result"]]
    assert [m["corruption"] for m in manifests] == [None, *robusta.TRAIN_CORRUPTIONS]
    assert all(m["outliers"] == 1 and m["edits"][0]["op"] == "dilate" for m in manifests)
    assert not set(robusta.TRAIN_CORRUPTIONS) & set(robusta.TEST_CORRUPTIONS)
    seg = json.loads((out / "segmenter-robusta-s0" / "log.jsonl").read_text().splitlines()[0])
    assert seg["step"] == 1
    table = (out / "results.md").read_text()
    values = [100 * quality["full", s]["fine/miou"] for s in (0, 1)]
    assert f"| G_coarse + G_fine | {np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} |" in table
    for figure in ("samples.png", "morphology.png", "generated.png"):
        assert (out / figure).is_file()
    assert data.read_image(out / "morphology.png").shape[-1] > 5 * 64  # five structuring elements side by side
    monkeypatch.setattr(robusta, "train", lambda args: pytest.fail("trained again"))
    robusta.experiment(argv)


def test_evaluate_generators_streams_the_numbers_of_the_whole_sets(toy_root, tmp_path, monkeypatch):
    torch.manual_seed(0)
    args = robusta.resolve(robusta.build_parser().parse_args(["train"] + TINY))
    g_coarse, _, g_fine, _ = (m.eval() for m in robusta.build_networks(args))
    segmenter = segment.build_model("deeplabv3plus-r18", data.NUM_CLASSES).eval()
    # a small stand-in for the Inception network (the bookkeeping of the features is what is tested)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()).eval()
    monkeypatch.setattr(metrics, "load_fid_inception", lambda weights, device="cpu": features)
    weights = tmp_path / "inception.pth"
    dataset = data.Cityscapes(toy_root, "train", size=(32, 64))  # 4 maps in batches of 3 + 1
    got = robusta.evaluate_generators(g_coarse, g_fine, dataset, args.label_nc, segmenter, weights, batch_size=3)
    whole = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    coarse, fine = robusta.render(g_coarse, g_fine, whole["label_ids"], args.label_nc)
    for key, fake in (("coarse", coarse), ("fine", fine), ("real", whole["image"])):
        assert fake.shape == (4, 3, 32, 64)
        cm = metrics.ConfusionMatrix(data.NUM_CLASSES)
        cm.update(segment.predict(segmenter, fake).argmax(1), whole["labels"])
        assert got[f"{key}/miou"] == pytest.approx(float(cm.miou()), abs=1e-6)
        if key == "real":
            continue
        for rate in (0, 1, 2):
            assert got[f"{key}/spectral_distance_f{rate}"] == pytest.approx(
                metrics.spectral_distance(whole["image"], fake, rate, paired=True), rel=1e-6)
        assert got[f"{key}/fid"] == pytest.approx(metrics.fid(whole["image"], fake, weights, device="cpu"), rel=1e-4)


def test_feature_matching_targets_come_from_the_updated_discriminator(toy_batch, monkeypatch):
    """Eq. (A4) in G's step: the real features are D's after its update in the same gan_step (the
    generated ones are), not the ones D's own step computed before it moved."""
    args, real, label = toy_batch
    torch.manual_seed(0)
    g, d, _, _ = robusta.build_networks(args)
    opts = robusta.adam(g, 1e-2, 0, args), robusta.adam(d, 1e-2, 0, args)
    seen = {}
    loss = robusta.coarse_generator_loss

    def spy(d_fake, d_real, *rest):
        seen["real"] = [[f.detach().clone() for f in feats] for feats in d_real]
        return loss(d_fake, d_real, *rest)

    monkeypatch.setattr(robusta, "coarse_generator_loss", spy)
    robusta.gan_step(FakeRun(), g, d, *opts, label, (label,), real, robusta.coarse_generator_loss, "ls", None, args)
    with torch.no_grad():
        after = d(label, real)  # G's optimizer does not touch D: this is the updated D
    for got, want in zip(seen["real"], after):
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-6)

