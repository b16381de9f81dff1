"""Tests of ash.py: AdaIN (Eq. 1), orthogonal noise (Eq. 3), the ASH module and losses (Eq. 2-9),
one iteration of Algorithm 1 with every ablation switch, and the command line on a tiny ToyCity."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ash
import data
import segment

# Key -> shape of every parameter in pytorch-AdaIN's published vgg_normalised.pth and decoder.pth.
VGG_CONVS = {0: (3, 3, 1, 1), 2: (64, 3, 3, 3), 5: (64, 64, 3, 3), 9: (128, 64, 3, 3), 12: (128, 128, 3, 3),
             16: (256, 128, 3, 3), 19: (256, 256, 3, 3), 22: (256, 256, 3, 3), 25: (256, 256, 3, 3),
             29: (512, 256, 3, 3), 32: (512, 512, 3, 3), 35: (512, 512, 3, 3), 38: (512, 512, 3, 3),
             42: (512, 512, 3, 3), 45: (512, 512, 3, 3), 48: (512, 512, 3, 3), 51: (512, 512, 3, 3)}
DECODER_CONVS = {1: (256, 512, 3, 3), 5: (256, 256, 3, 3), 8: (256, 256, 3, 3), 11: (256, 256, 3, 3),
                 14: (128, 256, 3, 3), 18: (128, 128, 3, 3), 21: (64, 128, 3, 3), 25: (64, 64, 3, 3),
                 28: (3, 64, 3, 3)}


def layout(convs):
    return {**{f"{i}.weight": s for i, s in convs.items()}, **{f"{i}.bias": (s[0],) for i, s in convs.items()}}


# --- 1. AdaIN --------------------------------------------------------------------------------

def test_calc_mean_std_is_unbiased_variance_plus_eps():
    feat = torch.randn(2, 3, 5, 7) * 3 + 1
    mean, std = ash.calc_mean_std(feat, eps=1e-5)
    flat = feat.flatten(2)
    assert mean.shape == std.shape == (2, 3, 1, 1)
    assert torch.allclose(mean.flatten(), flat.mean(2).flatten())
    assert torch.allclose(std.flatten(), (flat.var(2, unbiased=True) + 1e-5).sqrt().flatten())


def test_adain_output_has_the_style_channel_mean_and_std():
    content = torch.randn(2, 8, 6, 10) * 4 - 2
    style = torch.randn(2, 8, 5, 3) * 0.5 + 3          # another spatial size: only statistics matter
    out = ash.adain(content, style)
    assert out.shape == content.shape
    for got, want in zip(ash.calc_mean_std(out), ash.calc_mean_std(style)):
        assert torch.allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="channels"):
        ash.adain(content, style[:, :4])


def test_vgg_normalised_and_decoder_have_the_published_layout():
    vgg, dec = ash.vgg_normalised(), ash.decoder()
    assert len(vgg) == 53 and len(dec) == 29
    assert {k: tuple(v.shape) for k, v in vgg.state_dict().items()} == layout(VGG_CONVS)
    assert {k: tuple(v.shape) for k, v in dec.state_dict().items()} == layout(DECODER_CONVS)
    assert isinstance(vgg[1], nn.ReflectionPad2d) and vgg[7].ceil_mode and isinstance(vgg[30], nn.ReLU)
    stylizer = ash.Stylizer(vgg, dec)
    assert len(stylizer.encoder) == 31 and stylizer.channels == 512           # relu4_1
    # ceil-mode pooling: odd sizes round up, and the decoder returns 8x the relu4_1 grid
    f = stylizer.encode(torch.rand(1, 3, 20, 36))
    assert f.shape == (1, 512, 3, 5) and stylizer.decoder(f).shape == (1, 3, 24, 40)


def test_load_stylizer_reads_both_files_strictly_and_names_a_missing_one(tmp_path):
    vgg, dec = ash.random_vgg_normalised(0, width=8), ash.decoder(8)
    torch.save(vgg.state_dict(), tmp_path / "vgg.pth")
    torch.save(dec.state_dict(), tmp_path / "dec.pth")
    stylizer = ash.load_stylizer(tmp_path / "vgg.pth", tmp_path / "dec.pth")
    assert all(not p.requires_grad for p in stylizer.parameters()) and stylizer.channels == 64
    assert torch.equal(stylizer.decoder[28].weight, dec[28].weight)
    with pytest.raises(FileNotFoundError, match="missing.pth.*pytorch-AdaIN"):
        ash.load_stylizer(tmp_path / "vgg.pth", tmp_path / "missing.pth")
    torch.save({"1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        ash.load_stylizer(tmp_path / "vgg.pth", tmp_path / "bad.pth")


def test_random_encoder_keeps_the_activation_scale_and_normalises_the_input():
    vgg = ash.random_vgg_normalised(0, width=8)
    x = torch.rand(1, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(vgg[0](x), (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), atol=1e-5)
    feats = ash.Stylizer(vgg, ash.decoder(8)).encode_levels(x)
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64]
    assert all(0.1 < f.std().item() < 10 for f in feats)          # neither vanishing nor exploding


def test_decoder_training_lowers_content_and_style_losses():
    torch.manual_seed(0)
    stylizer = ash.Stylizer(ash.random_vgg_normalised(0, width=4), ash.decoder(4))
    stylizer.encoder.requires_grad_(False)
    content, style = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16) ** 3
    opt = torch.optim.Adam(stylizer.decoder.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss_c, loss_s = ash.decoder_losses(stylizer, content, style)
        loss = loss_c + 10 * loss_s
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is None for p in stylizer.encoder.parameters())


# --- 2. Orthogonal noise ----------------------------------------------------------------------

def test_orthogonal_noise_is_orthogonal_fresh_and_reproducible():
    z = ash.orthogonal_noise(64)
    assert z.shape == (64, 64)
    assert torch.allclose(z.T @ z, torch.eye(64), atol=1e-5)
    assert torch.allclose(z @ z.T, torch.eye(64), atol=1e-5)
    assert abs(abs(torch.linalg.det(z.double()).item()) - 1) < 1e-6
    assert not torch.allclose(z, ash.orthogonal_noise(64))          # fresh at every call
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(ash.orthogonal_noise(8, g1), ash.orthogonal_noise(8, g2))


def test_orthogonal_noise_is_haar_distributed():
    """Haar: E[Z_ij] = 0 and E[Z_ij^2] = 1/n for every entry, also the diagonal; without the sign fix
    of QR the diagonal of Q is biased."""
    g = torch.Generator().manual_seed(0)
    n, draws = 3, 3000
    zs = torch.stack([ash.orthogonal_noise(n, g) for _ in range(draws)])
    assert zs.mean(0).abs().max() < 0.05                  # std of the mean: sqrt(1/3 / 3000) ~ 0.011
    assert ((zs ** 2).mean(0) - 1 / n).abs().max() < 0.03
    raw = torch.stack([torch.linalg.qr(torch.randn(n, n, generator=g))[0] for _ in range(draws)])
    assert raw.diagonal(dim1=1, dim2=2).mean().abs() > 0.1  # what the sign fix removes


def test_mixing_channels_preserves_inner_products_between_positions():
    f = torch.randn(2, 16, 4, 5)
    z = ash.orthogonal_noise(16)
    g = ash.mix_channels(z, f)
    F_, G_ = f.flatten(2), g.flatten(2)                              # (N, C, HW)
    # <f[:, p], f[:, q]> for all positions p, q: the (HW, HW) matrix F^T F is unchanged
    assert torch.allclose(F_.transpose(1, 2) @ F_, G_.transpose(1, 2) @ G_, atol=1e-4)
    # the channel Gram matrix F F^T is rotated to Z F F^T Z^T: same spectrum, different entries
    gram_f, gram_g = F_ @ F_.transpose(1, 2), G_ @ G_.transpose(1, 2)
    assert torch.allclose(z @ gram_f @ z.T, gram_g, atol=1e-3)
    assert torch.allclose(torch.linalg.eigvalsh(gram_f), torch.linalg.eigvalsh(gram_g), atol=1e-3)
    # ... while the per-channel statistics that AdaIN transfers change: a new style
    assert not torch.allclose(ash.calc_mean_std(f)[1], ash.calc_mean_std(g)[1], atol=1e-2)


def relu_features(seed=0, n=2, c=16, h=6, w=10):
    """ReLU-like features: non-negative, with two all-zero channels (as relu4_1 has)."""
    g = torch.Generator().manual_seed(seed)
    f = F.relu(torch.randn(n, c, h, w, generator=g) + 0.3) * (1 + torch.arange(c).view(1, c, 1, 1) / 4)
    f[:, :2] = 0
    return f


def test_elementwise_noise_is_f_times_one_plus_a_semi_orthogonal_v():
    f = relu_features()
    g = ash.perturb_style(f, "elementwise", torch.Generator().manual_seed(1))
    nonzero = f != 0
    v = torch.zeros_like(f)
    v[nonzero] = g[nonzero] / f[nonzero] - 1                          # V where it can be read back
    torch.manual_seed(0)
    full = ash.elementwise_noise(torch.ones(2, 16, 6, 10)) - 1         # V itself (f = 1)
    rows = full @ full.transpose(-1, -2)                               # (2, 16, 6, 6): orthonormal rows
    assert torch.allclose(rows, torch.eye(6).expand(2, 16, 6, 6), atol=1e-5)
    assert full.abs().max() <= 1 + 1e-6
    # what it keeps: non-negativity and the support (zeros stay zero); what it changes: every non-zero value
    assert (g >= 0).all() and torch.equal(g == 0, f == 0)
    assert v[nonzero].abs().max() <= 1 + 1e-5 and v[nonzero].abs().min() >= 0 and not torch.equal(g, f)
    # the channel means move much less than under the raw rotation
    m = ash.calc_mean_std(f)[0]
    moved = {k: (ash.calc_mean_std(ash.perturb_style(f, k))[0] - m).norm() / m.norm()
             for k in ("elementwise", "rotation")}
    assert moved["elementwise"] < 0.25 * moved["rotation"]
    assert not torch.equal(ash.perturb_style(f, "elementwise"), ash.perturb_style(f, "elementwise"))  # fresh


def test_whitened_noise_keeps_channel_mean_and_covariance_so_adain_cannot_see_it():
    f = relu_features()
    g = ash.perturb_style(f, "whitened", torch.Generator().manual_seed(1))
    assert not torch.allclose(g, f, atol=1e-2)                        # the spatial arrangement changes
    F_, G_ = f.flatten(2).double(), g.flatten(2).double()
    assert torch.allclose(G_.mean(2), F_.mean(2), atol=1e-5)          # channel means kept
    cov = lambda x: (x - x.mean(2, keepdim=True)) @ (x - x.mean(2, keepdim=True)).transpose(1, 2) / (x.shape[2] - 1)
    assert torch.allclose(cov(G_), cov(F_), atol=1e-4)                # whole channel covariance kept
    assert g[:, :2].abs().max() < 1e-5                                # dead channels stay dead
    # hence AdaIN (Eq. 1), which reads channel means and stds only, gives the same features
    content = torch.randn(2, 16, 5, 7)
    assert torch.allclose(ash.adain(content, g), ash.adain(content, f), atol=1e-4)
    # ... while the raw rotation and the element-wise noise change AdaIN's output
    for noise in ("rotation", "elementwise"):
        assert not torch.allclose(ash.adain(content, ash.perturb_style(f, noise)), ash.adain(content, f), atol=1e-2)
    with pytest.raises(data.BadInput, match="--noise"):
        ash.perturb_style(f, "gaussian")


# --- 3-4. ASH module, discriminator, losses -------------------------------------------------

def test_label_smoothing_keeps_a_distribution():
    p = F.softmax(torch.randn(2, 19, 4, 4) * 10, dim=1)
    q = ash.label_smoothing(p, 0.1)
    assert torch.allclose(q.sum(1), torch.ones(2, 4, 4)) and q.min() >= 0.1 / 19 - 1e-7


def test_ash_module_is_eq3_with_element_wise_gamma_beta():
    torch.manual_seed(0)
    module = ash.ASHModule(num_classes=19, channels=32, delta=1.0)
    f_style = torch.randn(2, 32, 4, 8)
    semantics = F.softmax(torch.randn(2, 19, 32, 64), dim=1)        # at image resolution
    gamma, beta = module.coefficients(semantics, f_style.shape[-2:])
    assert gamma.shape == beta.shape == (2, 32, 4, 8)
    assert torch.allclose(module(f_style, semantics), f_style * (gamma + 1.0) + beta)
    module.delta = 0.0                                              # Table 3: delta = 0
    assert torch.allclose(module(f_style, semantics), f_style * gamma + beta)
    # the coefficients depend on the semantics
    other = F.softmax(torch.randn(2, 19, 32, 64), dim=1)
    assert not torch.allclose(module.coefficients(other, (4, 8))[0], gamma)


def test_fc_discriminator_layout():
    d = ash.FCDiscriminator(19)
    assert [n for n, _ in d.named_children()] == ["conv1", "conv2", "conv3", "conv4", "classifier", "leaky_relu"]
    assert [c.out_channels for c in (d.conv1, d.conv2, d.conv3, d.conv4)] == [64, 128, 256, 512]
    assert d(torch.rand(2, 19, 64, 128)).shape == (2, 1, 2, 4)       # five stride-2 4x4 convs


def test_adversarial_loss_is_eq5():
    d_src, d_sty = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    eq5 = -torch.log(torch.sigmoid(d_src)).mean() - torch.log(1 - torch.sigmoid(d_sty)).mean()
    got = ash.adversarial_loss(d_src, source=True) + ash.adversarial_loss(d_sty, source=False)
    assert torch.allclose(got, eq5, atol=1e-5)


def test_ash_loss_signs_follow_section_3_3():
    f_src, f_style = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4) * 2 + 1
    f_merged = torch.randn(1, 8, 4, 4, requires_grad=True)
    l_adv = torch.tensor(0.7, requires_grad=True)
    loss, terms = ash.ash_loss(l_adv, f_src, f_style, f_merged)
    expected = -l_adv + terms["l_c"] + terms["l_s1"] - terms["l_s2"]
    assert torch.allclose(loss, expected)
    assert torch.allclose(terms["l_c"], F.mse_loss(f_merged, f_src))
    assert torch.autograd.grad(loss, l_adv)[0].item() == -1.0       # ASH maximises L_adv
    off, _ = ash.ash_loss(l_adv, f_src, f_style, f_merged, use_lc=False, use_ls1=False, use_ls2=False)
    assert torch.allclose(off, -l_adv)
    # L_s1 is not identically 0: the reference is the style before the ASH transform
    assert terms["l_s1"] > 0


def test_lc_and_ls2_nearly_cancel_so_eq6_reduces_to_minus_ladv_plus_ls1():
    """Issue 13 §4: L_c = |AdaIN(f_src, s) - f_src|^2 = (mu_s - mu_src)^2 + (sigma_s - sigma_src)^2 per channel
    (up to the (HW - 1) / HW of the unbiased variance and eps) = L_s2, so + L_c - L_s2 in Eq. (6) cancels."""
    g = torch.Generator().manual_seed(0)
    f_src = F.relu(torch.randn(2, 16, 16, 16, generator=g) + 0.5)
    z_f_style = F.relu(torch.randn(2, 16, 16, 16, generator=g)) * 3            # Z f_style, L_s1's reference
    f_style = (z_f_style * 1.5 + 0.2 * torch.randn(2, 16, 1, 1, generator=g)).requires_grad_()  # f'_style (Eq. 3)
    f_merged = ash.adain(f_src, f_style)
    l_c, l_s2 = ash.content_loss(f_merged, f_src), ash.style_loss(f_merged, f_src)
    assert abs(l_c - l_s2) < 0.01 * l_c and l_c > 0.1                  # nearly equal, not both ~0
    grad_c, = torch.autograd.grad(l_c, f_style, retain_graph=True)
    grad_diff, = torch.autograd.grad(l_c - l_s2, f_style, retain_graph=True)
    assert grad_diff.norm() < 0.02 * grad_c.norm()
    # Eq. (6) with all three terms vs with L_s1 only (Table 6's last and ... rows): nearly the same gradient
    l_adv = torch.tensor(0.5)
    full, _ = ash.ash_loss(l_adv, f_src, z_f_style, f_merged)
    only_s1, _ = ash.ash_loss(l_adv, f_src, z_f_style, f_merged, use_lc=False, use_ls2=False)
    g_full, = torch.autograd.grad(full, f_style, retain_graph=True)
    g_s1, = torch.autograd.grad(only_s1, f_style, retain_graph=True)
    assert (g_full - g_s1).norm() < 0.02 * g_full.norm()
    # ... while dropping one of the two alone does change it
    no_lc, _ = ash.ash_loss(l_adv, f_src, z_f_style, f_merged, use_lc=False)
    assert (torch.autograd.grad(no_lc, f_style)[0] - g_full).norm() > 0.5 * g_full.norm()


# --- 5-6. Algorithm 1 -------------------------------------------------------------------------

def tiny_args(*flags):
    return ash.parser().parse_args(["--depth", "18", "--iters", "10", "--lambda-adv", "0.001", *flags])


TINY = {}


def tiny_algorithm(*flags):
    """Algorithm1 with DeepLab-v2 ResNet-18 and a width-8 VGG (built once, copied: building is slow)."""
    if not TINY:
        torch.manual_seed(0)
        TINY["G"] = segment.DeepLabV2(19, depth=18)
        TINY["stylizer"] = ash.Stylizer(ash.random_vgg_normalised(0, width=8), ash.decoder(8)).requires_grad_(False)
    torch.manual_seed(0)
    return ash.build(tiny_args(*flags), stylizer=TINY["stylizer"], segmenter=copy.deepcopy(TINY["G"]))


def tiny_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 32, 64, generator=g)
    y = torch.randint(0, 19, (2, 32, 64), generator=g)
    y[:, :4] = 255
    return x, y, torch.rand(2, 3, 40, 40, generator=g)


def adversarial_objective(algo, x, y, s, seed=0):
    """L_adv of lines 9 and 11, -log D(G(X_stylized)), with the Z that `step` draws after manual_seed(seed)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        semantics = algo.semantics(algo.G(x), y) if algo.args.mode == "ash" else None
    x_sty = algo.stylize(x, s, semantics)[0]
    return ash.adversarial_loss(algo.D(F.softmax(algo.G(x_sty), dim=1)), source=True)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def update(algo, net, x, y, s, only):
    """The parameter change of `net` in one step where only optimizer `only` has a learning rate."""
    for name, opt in algo.optimizers.items():
        for group in opt.param_groups:
            group["base_lr"] *= name == only
    before = params(net)
    torch.manual_seed(0)
    algo.step(x, y, s, 0)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), before)])


def flat_grad(loss, net):
    """The gradient of `loss` over all of `net`'s parameters, zero for the frozen ones (BN affine)."""
    trained = [p for p in net.parameters() if p.requires_grad]
    grads = dict(zip(map(id, trained), torch.autograd.grad(loss, trained, allow_unused=True)))
    return torch.cat([(grads.get(id(p)) if grads.get(id(p)) is not None else torch.zeros_like(p)).flatten()
                      for p in net.parameters()])


def test_gradients_reach_ash_through_decoder_and_segmenter_and_the_updates_have_the_right_signs():
    """First-order sign checks of lines 9 and 11 on one step (SGD's first step is -lr * gradient;
    weight decay off). The gradients are small at initialisation, hence the large weights/rates."""
    x, y, s = tiny_batch()
    flags = ["--mode", "ash", "--no-lc", "--no-ls1", "--no-ls2", "--weight-decay", "0"]
    # line 9: with L_c, L_s1, L_s2 off, ASH's only gradient is -L_adv's, through D, G and the decoder;
    # the ASH module alone (G, D at learning rate 0) moves along +grad L_adv
    algo = tiny_algorithm(*flags, "--lambda-adv-ash", "1e4", "--lr", "1")
    g = flat_grad(adversarial_objective(algo, x, y, s), algo.ash)
    delta = update(algo, algo.ash, x, y, s, only="ash")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in algo.ash.parameters())
    assert all(p.grad is None for p in algo.stylizer.parameters())          # frozen AdaIN networks
    assert F.cosine_similarity(delta, g, dim=0) > 0.99
    # line 11: G's update with lambda_adv minus its update without = -lr * lambda * grad L_adv
    # (on the backbone: the classifier has 10x the learning rate)
    steps = []
    for lam in ("0", "1e4"):
        algo = tiny_algorithm(*flags, "--lambda-adv", lam, "--lr", "1e-4")
        g = flat_grad(adversarial_objective(algo, x, y, s), algo.G.backbone)
        steps.append(update(algo, algo.G.backbone, x, y, s, only="G"))
    assert F.cosine_similarity(steps[1] - steps[0], -g, dim=0) > 0.99


def test_discriminator_update_lowers_eq5():
    algo = tiny_algorithm("--mode", "stylize+noise", "--lr-d", "1e-3")
    for group in algo.optimizers["G"].param_groups:
        group["base_lr"] = 0.0
    x, y, s = tiny_batch()

    def eq5():
        torch.manual_seed(0)
        with torch.no_grad():
            x_sty = algo.stylize(x, s)[0]
            d_src = algo.D(F.softmax(algo.G(x), dim=1))
            d_sty = algo.D(F.softmax(algo.G(x_sty), dim=1))
        return (ash.adversarial_loss(d_src, True) + ash.adversarial_loss(d_sty, False)).item()

    before = eq5()
    torch.manual_seed(0)
    algo.step(x, y, s, 0)
    assert eq5() < before


@pytest.mark.parametrize("flags", [
    ["--mode", "baseline"], ["--mode", "stylize"], ["--mode", "stylize+noise"],
    ["--no-lc"], ["--no-ls1"], ["--no-ls2"], ["--delta", "0"], ["--uniform-semantics"],
    ["--gt-conditioning"], ["--seg-loss-stylized"], ["--mode", "stylize", "--seg-loss-stylized"],
])
def test_every_ablation_switch_runs_one_step(flags):
    algo = tiny_algorithm(*flags)
    x, y, s = tiny_batch()
    nets = {"G": algo.G, "ash": algo.ash, "D": algo.D}
    before = {k: params(v) for k, v in nets.items() if v is not None}
    losses = algo.step(x, y, s, 0)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    mode = algo.args.mode
    assert ("l_adv" in losses) == (mode != "baseline") and ("loss_ash" in losses) == (mode == "ash")
    assert (algo.ash is None) == (mode != "ash") and (algo.D is None) == (mode == "baseline")
    for k, old in before.items():                                # every player present was updated
        assert any(not torch.equal(a, b) for a, b in zip(old, params(nets[k]))), k
    if "--no-ls1" in flags:
        assert "l_s1" in losses                                   # computed for the log, not optimised
    if mode != "baseline":
        assert algo.images[1].shape == x.shape


def test_whitened_noise_makes_table5_row3_the_same_computation_as_row2_and_the_default_does_not():
    x, _, s = tiny_batch()
    stylized = {}
    for mode, noise in (("stylize", "elementwise"), ("stylize+noise", "whitened"), ("stylize+noise", "elementwise"),
                        ("stylize+noise", "rotation")):
        algo = tiny_algorithm("--mode", mode, "--noise", noise)
        torch.manual_seed(0)
        stylized[mode, noise] = algo.stylize(x, s)[0].detach()
    row2 = stylized["stylize", "elementwise"]
    assert torch.allclose(stylized["stylize+noise", "whitened"], row2, atol=1e-4)
    assert not torch.allclose(stylized["stylize+noise", "elementwise"], row2, atol=1e-3)
    assert not torch.allclose(stylized["stylize+noise", "rotation"], row2, atol=1e-3)
    assert ash.parser().parse_args([]).noise == ash.DEFAULT_NOISE == "elementwise"


def grads_after_step(*flags, seed=0):
    """{net: flat gradient} of one `step` (the optimizers leave .grad in place), G's frozen BN at 0."""
    algo = tiny_algorithm(*flags)
    x, y, s = tiny_batch(seed)
    torch.manual_seed(0)
    algo.step(x, y, s, 0)
    return {k: torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in net.parameters()])
            for k, net in (("G", algo.G), ("ash", algo.ash), ("D", algo.D)) if net is not None}


def test_raising_one_lambda_changes_only_the_gradients_of_the_network_it_weights():
    """Issue 17 §1: lambda_adv weights line 11 (G), --lambda-adv-ash and --lambda-sub line 9 (ASH)."""
    base = grads_after_step()
    for flags, changed in ((["--lambda-adv", "0.5"], "G"), (["--lambda-adv-ash", "3"], "ash"),
                           (["--lambda-sub", "3"], "ash")):
        other = grads_after_step(*flags)
        for net in ("G", "ash", "D"):
            same = torch.allclose(other[net], base[net], rtol=1e-5, atol=1e-9)
            assert same != (net == changed), (flags, net)
    # 'tied' (the authors' code, Table 4's sweep): lambda_adv now also moves ASH's adversarial weight
    tied = [grads_after_step("--lambda-adv-ash", "tied", "--lambda-adv", lam) for lam in ("0.001", "0.5")]
    assert not torch.allclose(tied[0]["ash"], tied[1]["ash"], rtol=1e-3)
    assert torch.allclose(tied[0]["D"], tied[1]["D"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("a, b, net", [
    (["--mode", "stylize"], ["--mode", "stylize+noise"], "G"),
    (["--mode", "stylize+noise"], ["--mode", "stylize+noise", "--noise", "rotation"], "G"),
    ([], ["--seg-loss-stylized"], "G"),
    (["--mode", "stylize"], ["--mode", "stylize", "--seg-loss-stylized"], "G"),
    ([], ["--alpha", "0.8"], "G"),
    ([], ["--no-lc"], "ash"), ([], ["--no-ls1"], "ash"), ([], ["--no-ls2"], "ash"),
    ([], ["--delta", "0"], "ash"), ([], ["--uniform-semantics"], "ash"), ([], ["--gt-conditioning"], "ash"),
])
def test_every_ablation_switch_changes_the_computation_it_names(a, b, net):
    """Issue 17 §1: two rows of Tables 1-3, 5, 6 are never silently the same experiment."""
    ga, gb = grads_after_step(*a), grads_after_step(*b)
    assert not torch.allclose(ga[net], gb[net], rtol=1e-3, atol=1e-10)


def test_presets_paper_by_default_authors_code_on_request_and_options_win():
    paper = ash.parser().parse_args([])
    assert (paper.preset, paper.lambda_adv_ash, paper.lambda_sub, paper.adv_damping, paper.warmup) == \
        ("paper", 1.0, 1.0, False, 0.0)
    code = ash.parser().parse_args(["--preset", "authors-code", "--iters", "100"])
    assert (code.lambda_adv_ash, code.lambda_sub, code.adv_damping, code.warmup) == ("tied", 1e-8, True, 0.05)
    assert ash.ash_adv_weight(code, 0) == pytest.approx(0.001) and ash.ash_adv_weight(code, 50) == pytest.approx(0.0005)
    assert ash.ash_adv_weight(paper, 50) == 1.0
    assert ash.parser().parse_args(["--preset", "authors-code", "--lambda-sub", "1"]).lambda_sub == 1.0
    assert ash.warmup_factor(0, code) == pytest.approx(1 / 5) and ash.warmup_factor(10, code) == 1.0
    with pytest.raises(SystemExit):
        ash.parser().parse_args(["--lambda-adv-ash", "tight"])
    # in a step: the learning rate of iteration 0 is warmed up, ASH's loss uses the tied, damped weight
    algo = tiny_algorithm("--preset", "authors-code", "--weight-decay", "0")
    x, y, s = tiny_batch()
    torch.manual_seed(0)
    losses = algo.step(x, y, s, 0)
    warm = ash.warmup_factor(0, algo.args) * segment.poly_lr(1.0, 0, 10)
    assert algo.optimizers["ash"].param_groups[0]["lr"] == pytest.approx(algo.args.lr * warm)
    expected = -0.001 * losses["l_adv_ash"] + 1e-8 * (losses["l_c"] + losses["l_s1"] - losses["l_s2"])
    assert losses["loss_ash"] == pytest.approx(expected, rel=1e-4)


def test_batchnorm_as_clan_affine_frozen_and_line9_leaves_running_statistics_alone():
    """Issue 13 §3. BN weight / bias: not trained, not decayed; the ASH module's pass (line 9) normalises
    with batch statistics but its running statistics are discarded; lines 10 and 11 update them."""
    x, y, s = tiny_batch()
    for bn_affine in ("frozen", "trained"):
        algo = tiny_algorithm("--bn-affine", bn_affine, "--lr", "0.1")
        bns = [m for m in algo.G.modules() if isinstance(m, nn.BatchNorm2d)]
        before = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in bns]
        in_opt = {id(p) for g in algo.optimizers["G"].param_groups for p in g["params"]}
        torch.manual_seed(0)
        algo.step(x, y, s, 0)
        moved = any(not torch.equal(w, m.weight) or not torch.equal(b, m.bias) for (w, b), m in zip(before, bns))
        assert moved == (bn_affine == "trained")
        assert any(id(m.weight) in in_opt for m in bns) == (bn_affine == "trained")
    # running statistics seen at the start of each of G's three forward passes of a step (lines 10, 9, 11)
    algo = tiny_algorithm()
    bn = algo.G.backbone.bn1
    seen = []
    bn.register_forward_pre_hook(lambda m, inp: seen.append(m.running_mean.clone()))
    start = bn.running_mean.clone()
    torch.manual_seed(0)
    algo.step(x, y, s, 0)
    assert len(seen) == 3 and torch.equal(seen[0], start)
    assert not torch.equal(seen[1], seen[0])                          # line 10 updated them
    assert torch.equal(seen[2], seen[1])                              # line 9 did not
    assert not torch.equal(bn.running_mean, seen[2])                  # line 11 did
    assert bn.num_batches_tracked.item() == 2


def test_ablation_semantics_inputs():
    x, y, _ = tiny_batch()
    logits = torch.randn(2, 19, 32, 64)
    uniform = tiny_algorithm("--uniform-semantics").semantics(logits, y)
    assert torch.allclose(uniform, torch.full_like(uniform, 1 / 19))
    gt = tiny_algorithm("--gt-conditioning", "--label-smoothing", "0.1").semantics(logits, y)
    valid = y != 255
    assert torch.equal(gt.argmax(1)[valid], y[valid])
    assert torch.allclose(gt.sum(1), torch.ones_like(gt[:, 0]))
    assert torch.allclose(gt[:, :, :4], torch.full_like(gt[:, :, :4], 1 / 19))   # ignored pixels: uniform


def test_ablation_switches_need_the_ash_module():
    with pytest.raises(ValueError, match="--mode ash"):
        tiny_algorithm("--mode", "stylize", "--no-ls1")
    with pytest.raises(ValueError, match="choose one"):
        tiny_algorithm("--uniform-semantics", "--gt-conditioning")


# --- 7. Command line on a tiny ToyCity ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_toycity(tmp_path_factory):
    root = tmp_path_factory.mktemp("toycity")
    for domain in ("source", "target"):
        for split in ("train", "val"):
            data.make_toycity(root / domain, 2, (32, 64), domain, seed=0, split=split)
    data.make_paintings(root / "paintings", 2, (32, 32))
    return root


def test_train_decoder_then_algorithm1_from_the_command_line(tiny_toycity, tmp_path):
    root = tiny_toycity
    run = ["--out", str(tmp_path), "--device", "cpu", "--workers", "0", "--log-every", "1"]
    ash.main(["train-decoder", "--content", str(root / "source" / "leftImg8bit"), "--styles", str(root / "paintings"),
              "--width", "4", "--encoder-iters", "1", "--iters", "2", "--batch-size", "2", "--size", "32", "64",
              "--crop", "32", "32", "--name", "dec", *run])
    log = [json.loads(l) for l in (tmp_path / "dec" / "log.jsonl").read_text().splitlines()]
    assert "loss_reconstruction" in log[0] and "loss_style" in log[1]          # autoencoder, then AdaIN losses
    trained = ash.load_stylizer(tmp_path / "dec" / "vgg_normalised.pth", tmp_path / "dec" / "decoder.pth")
    assert trained.channels == 32
    assert not torch.equal(trained.encoder[2].weight, ash.random_vgg_normalised(0, 4)[2].weight)  # encoder trained
    assert torch.equal(trained.encoder[0].weight, ash.random_vgg_normalised(0, 4)[0].weight)      # not the norm.
    common = ["--source", "toycity", "--source-root", str(root / "source"), "--target", "toycity",
              "--target-root", str(root / "target"), "--styles", str(root / "paintings"), "--depth", "18",
              "--size", "32", "64", "--batch-size", "2", "--vgg", str(tmp_path / "dec" / "vgg_normalised.pth"),
              "--decoder", str(tmp_path / "dec" / "decoder.pth"), "--image-every", "1", "--eval-every", "0",
              "--name", "ash", *run]
    results = ash.main([*common, "--iters", "2", "--save-every", "1"])
    assert set(results) == {"toycity-source", "toycity-target"}
    assert all(0 <= r["miou19"] <= 100 for r in results.values())
    rundir = tmp_path / "ash"
    assert (rundir / "index.html").exists() and (rundir / "images" / "0000002.png").exists()
    steps = [json.loads(l)["step"] for l in (rundir / "log.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2]
    # resume continues from the checkpoint at step 2 up to step 3
    ash.main([*common, "--iters", "3", "--resume", "auto"])
    steps = [json.loads(l)["step"] for l in (rundir / "log.jsonl").read_text().splitlines() if "loss_seg" in l]
    assert steps == [1, 2, 3]


def test_experiment_runs_every_mode_and_seed_once_and_tabulates_mean_and_std(tiny_toycity, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "toycity", lambda *a, **k: tiny_toycity)
    argv = ["--quick", "--iters", "8", "--decoder-iters", "4", "--encoder-iters", "4", "--width", "4",
            "--batch-size", "1", "--size", "32", "64", "--seeds", "0", "1", "--device", "cpu",
            "--out", str(tmp_path / "exp")]
    results = ash.main(["experiment", *argv])
    assert set(results) == {(m, s) for m in ash.EXPERIMENT_MODES for s in (0, 1)}
    stored = json.loads((tmp_path / "exp" / "experiment.json").read_text())
    assert stored["settings"]["iters"] == 1 and len(stored["cells"]) == 1 + 4 * 2   # AdaIN + 4 modes x 2 seeds
    assert {"stylize-noise-elementwise-s0", "ash-elementwise-s1", "stylize-s0"} <= set(stored["cells"])
    table = (tmp_path / "exp" / "results.md").read_text()
    for mode in ash.EXPERIMENT_MODES:
        values = [results[mode, s]["toycity-target"]["miou19"] for s in (0, 1)]
        mean, std = torch.tensor(values).mean().item(), torch.tensor(values).std().item()
        assert f"| {mode} | {mean:.2f} ± {std:.2f} |" in table
    assert (tmp_path / "exp" / "stylized.png").is_file()
    # Table 5 rows 3-4 under several readings of the noise: one row per mode x noise
    noisy = ash.main(["experiment", *argv[:-1], str(tmp_path / "noises"), "--seeds", "0", "--modes", "stylize+noise",
                      "--noises", "whitened", "rotation"])
    assert set(noisy) == {("stylize+noise (whitened)", 0), ("stylize+noise (rotation)", 0)}
    assert "| stylize+noise (whitened) |" in (tmp_path / "noises" / "results.md").read_text()
    # a rerun (an interrupted experiment) trains nothing again
    monkeypatch.setattr(ash, "train", lambda args: pytest.fail("trained again"))
    assert ash.experiment(argv) == results


def test_evaluation_scores_at_the_label_resolution_and_restores_the_mode(tiny_toycity):
    common = ["--source", "toycity", "--source-root", str(tiny_toycity / "source"), "--target", "toycity",
              "--target-root", str(tiny_toycity / "target"), "--styles", str(tiny_toycity / "paintings"),
              "--size", "16", "32"]
    _, _, evals = ash.datasets(ash.parser().parse_args(common))
    sample = evals["toycity-target"][0]
    assert sample["image"].shape[-2:] == (16, 32) and sample["labels"].shape == (32, 64)   # the files are 32x64
    _, _, fast = ash.datasets(ash.parser().parse_args([*common, "--eval-labels", "resized"]))
    assert fast["toycity-target"][0]["labels"].shape == (16, 32)

    class Fixed(nn.Module):                     # logits at the input size whose upsampled argmax is known
        def forward(self, x):
            self.mode_seen = self.training
            logits = torch.zeros(x.shape[0], 19, *x.shape[-2:])
            logits[:, 3, :, : x.shape[-1] // 2] = 1
            logits[:, 5, :, x.shape[-1] // 2:] = 1
            return logits

    labels = torch.full((1, 32, 64), 5)
    labels[:, :, :32] = 3
    loader = [{"image": torch.rand(1, 3, 16, 32), "labels": labels}]
    model = Fixed().train()
    cm = ash.evaluate(model, loader, "cpu")
    assert model.mode_seen is False and model.training                     # eval inside, train again after
    assert cm.miou() == 1.0 and cm.mat.sum() == 32 * 64                   # every label pixel, all right


def tiny_gta5(root, names=("00001", "00002"), size=(32, 64)):
    """A GTA5 tree as the download unpacks it: images/, labels/ (Cityscapes label ids), no split files."""
    g = torch.Generator().manual_seed(0)
    for name in names:
        data.write_image(root / "images" / f"{name}.png", torch.rand(3, *size, generator=g))
        ids = torch.full(size, 7)                                           # road
        ids[: size[0] // 2] = 23                                            # sky
        ids[:, : size[1] // 4] = 11                                         # building
        data.write_label(root / "labels" / f"{name}.png", ids)
    return root


def test_gta5_without_split_files_trains_through_ash_and_skips_the_source_val(tiny_toycity, tmp_path, monkeypatch,
                                                                             capsys):
    gta = tiny_gta5(tmp_path / "GTA5")
    torch.save(ash.random_vgg_normalised(0, width=4).state_dict(), tmp_path / "vgg.pth")
    torch.save(ash.decoder(4).state_dict(), tmp_path / "dec.pth")
    styles = []
    real = segment.DeepLabV2

    def deeplab(num_classes, depth, style="torchvision", pretrained=None):   # segment.DeepLabV2 with `style=`
        styles.append(style)
        return real(num_classes, depth, pretrained=pretrained)
    monkeypatch.setattr(segment, "DeepLabV2", deeplab)
    argv = ["--source", "gta5", "--source-root", str(gta), "--target", "toycity", "--target-root",
            str(tiny_toycity / "target"), "--styles", str(tiny_toycity / "paintings"), "--depth", "18",
            "--size", "32", "64", "--eval-size", "32", "64", "--batch-size", "1", "--iters", "2",
            "--vgg", str(tmp_path / "vgg.pth"), "--decoder", str(tmp_path / "dec.pth"), "--eval-every", "0",
            "--image-every", "2", "--save-every", "2", "--out", str(tmp_path / "runs"), "--device", "cpu",
            "--workers", "0", "--log-every", "1"]
    results = ash.main([*argv, "--name", "nosplit"])
    assert set(results) == {"toycity-target"} and styles == ["caffe"]       # caffe by default on real data
    out = capsys.readouterr().out
    assert out.count("evaluation on the source domain skipped") == 1
    steps = [json.loads(l)["step"] for l in (tmp_path / "runs" / "nosplit" / "log.jsonl").read_text().splitlines()
             if "loss_seg" in l]
    assert steps == [1, 2]
    # a val split where one exists (here val.txt) is evaluated; the training set stays 'all'
    (gta / "val.txt").write_text("00002\n")
    results = ash.main([*argv, "--name", "val", "--backbone-style", "torchvision"])
    assert set(results) == {"gta5-val", "toycity-target"} and styles == ["caffe", "torchvision"]
    source, _, _ = ash.datasets(ash.parser().parse_args(argv))
    assert len(source) == 2


def test_backbone_style_caffe_needs_segment_support_and_help_names_the_init_file(monkeypatch, capsys):
    args = ash.parser().parse_args(["--source", "gta5", "--depth", "18"])
    assert ash.backbone_style(args) == "caffe"
    assert ash.backbone_style(ash.parser().parse_args(["--source", "toycity"])) == "torchvision"
    built = []
    monkeypatch.setattr(segment, "DeepLabV2", lambda num_classes=19, depth=101, multi_level=False, pretrained=None:
                        built.append(depth))
    with pytest.raises(data.UserError, match="backbone-style"):               # asked for explicitly: an error
        ash.deeplab(ash.parser().parse_args(["--source", "gta5", "--backbone-style", "caffe"]))
    ash.deeplab(args)                                                         # the default falls back, says so
    assert built == [18] and "torchvision layout" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ash.parser().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "DeepLab_resnet_pretrained_init-f81d91e8.pth" in help_text and "AdaptSegNet" in help_text
