"""Tests of segment.py: networks (shapes, strides, checkpoint names, sizes), training, resume, DDP."""
import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import metrics  # noqa: E402
import segment  # noqa: E402


@pytest.fixture(autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchvision_features(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


# --- networks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("depth,dilation", [(101, None), (50, [False, True, True])])
def test_resnet_loads_torchvision_state_dict_strictly_and_gives_identical_features(depth, dilation):
    ref = getattr(torchvision.models, f"resnet{depth}")(weights=None, replace_stride_with_dilation=dilation).eval()
    ours = segment.resnet(depth, output_stride=8 if dilation else None)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}, strict=True)
    ours.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x)[3], torchvision_features(ref, x))


@pytest.mark.parametrize("output_stride,strides", [(None, [4, 8, 16, 32]), (16, [4, 8, 16, 16]), (8, [4, 8, 8, 8])])
def test_resnet_output_strides(output_stride, strides):
    feats = segment.resnet(18, output_stride)(torch.rand(1, 3, 64, 64))
    assert [64 // f.shape[-1] for f in feats] == strides
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]


def test_every_model_returns_logits_at_input_resolution():
    x = torch.rand(2, 3, 48, 80)
    for name, kwargs in [("deeplabv2-r18", {}), ("deeplabv3plus-r18", {"output_stride": 8}),
                         ("deeplabv3plus-r18", {"output_stride": 16}), ("deeplabv3plus-r50", {}),
                         ("segformer-b0", {}), ("segformer-b1", {})]:
        model = segment.build_model(name, num_classes=7, **kwargs).eval()
        with torch.no_grad():
            assert model(x).shape == (2, 7, 48, 80), name


def test_deeplabv2_r101_aspp_classifier_and_clan_second_head():
    model = segment.DeepLabV2(num_classes=5, depth=101, multi_level=True).eval()
    assert [c.dilation[0] for c in model.layer5.conv2d_list] == [6, 12, 18, 24]
    x = torch.rand(1, 3, 33, 41)
    with torch.no_grad():
        heads = model.heads(x)
        assert len(heads) == 2 and heads[0].shape == (1, 5, 33, 41)
        assert torch.allclose(model(x), heads[0] + heads[1])
        feat = model.backbone(model.normalize(x))[3]
    assert feat.shape[-2:] == (5, 6)  # output stride 8: ceil(33 / 8), ceil(41 / 8)
    assert feat.shape[1] == 2048


def test_param_groups_cover_every_parameter_once_with_10x_for_classifiers():
    model = segment.DeepLabV2(num_classes=3, depth=18, multi_level=True)
    groups = model.param_groups(0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    head = {id(p) for p in list(model.layer5.parameters()) + list(model.layer6.parameters())}
    for g in groups:
        assert g["lr"] == (0.1 if {id(p) for p in g["params"]} <= head else 0.01)
    seg = segment.SegFormer("b0", 3)
    assert [g["lr"] for g in seg.param_groups(1.0)] == [1.0, 10.0]


def test_segformer_features_and_35_channel_input():
    model = segment.SegFormer("b0", num_classes=19, in_channels=35).eval()
    x = torch.rand(2, 35, 64, 96)
    with torch.no_grad():
        assert model.features(x).shape == (2, model.embed_dim, 16, 24) and model.embed_dim == 256
        assert [f.shape[-1] for f in model.encoder(x)] == [24, 12, 6, 3]
        assert model(x).shape == (2, 19, 64, 96)
    assert isinstance(model.normalize, torch.nn.Identity)
    assert segment.SegFormer("b2").embed_dim == 768


def test_mit_encoders_have_official_key_names_and_published_sizes():
    # Published encoder sizes (SegFormer paper, Table 1 / Robusta Table A7), millions.
    published = {"b0": 3.4, "b1": 13.1, "b2": 24.2, "b3": 43.7, "b4": 60.8, "b5": 81.4}
    for variant, size in published.items():
        with torch.device("meta"):
            encoder = segment.MixVisionTransformer(variant)
        count = sum(p.numel() for p in encoder.parameters()) / 1e6
        print(f"MiT-{variant.upper()}: {count:.2f} M parameters (published {size} M)")
        # The official mix_transformer.py definition gives B0 3.32 M, which the paper rounds to 3.4 M.
        assert abs(count - size) / size < (0.025 if variant == "b0" else 0.02)
    keys = set(segment.MixVisionTransformer("b0").state_dict())
    for key in ["patch_embed1.proj.weight", "patch_embed1.norm.weight", "block1.0.attn.q.weight",
                "block1.0.attn.kv.weight", "block1.0.attn.sr.weight", "block1.0.attn.norm.weight",
                "block1.0.mlp.fc1.weight", "block1.0.mlp.dwconv.dwconv.weight", "block1.0.mlp.fc2.weight",
                "block4.1.attn.proj.weight", "norm1.weight", "norm4.bias", "patch_embed4.proj.weight"]:
        assert key in keys, key
    assert not any(k.startswith("block4.0.attn.sr") for k in keys)  # sr ratio 1 in stage 4


def test_pretrained_checkpoint_loads_and_missing_file_names_where_it_is_published(tmp_path):
    state = segment.MixVisionTransformer("b0").state_dict()
    state["head.weight"] = torch.zeros(1000, 256)  # the ImageNet classifier of mit_b0.pth is ignored
    torch.save(state, tmp_path / "mit_b0.pth")
    model = segment.SegFormer("b0", pretrained=tmp_path / "mit_b0.pth")
    assert torch.equal(model.encoder.patch_embed1.proj.weight, state["patch_embed1.proj.weight"])
    with pytest.raises(FileNotFoundError, match="download.pytorch.org/models/resnet50"):
        segment.build_model("deeplabv3plus-r50", pretrained=tmp_path / "missing.pth")


# --- inference and evaluation -------------------------------------------------------------------

def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    model = torch.nn.Conv2d(3, 4, 1)
    x = torch.rand(2, 3, 40, 70)
    whole = segment.predict(model, x)
    slide = segment.predict(model, x, mode="slide", crop=(16, 32))
    assert torch.allclose(whole, slide, atol=1e-6)
    assert segment.predict(model, x, scales=(0.5, 1.0, 1.5), flip=True).shape == (2, 4, 40, 70)


def test_evaluate_ood_is_perfect_when_outliers_get_uniform_logits():
    anomaly = torch.zeros(2, 8, 8, dtype=torch.uint8)
    anomaly[:, 2:4, 2:4] = 1
    anomaly[:, 0, 0] = 255

    class Oracle(torch.nn.Module):  # confident everywhere except on the outlier pixels
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])
            logits[:, 0] = 10.0 * (anomaly[: x.shape[0]] != 1)
            return logits

    loader = [{"image": torch.rand(2, 3, 8, 8), "anomaly": anomaly}]
    results = segment.evaluate_ood(Oracle(), loader, "cpu")
    for kind in ("msp", "entropy", "maxlogit"):
        assert results[kind]["auroc"] == pytest.approx(1.0)


def test_mean_teacher_is_an_exponential_moving_average_and_thresholds_pseudo_labels():
    student = torch.nn.Conv2d(3, 2, 1)
    mt = segment.MeanTeacher(student, decay=0.9)
    before = mt.teacher.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    mt.update(student, step=100)
    assert torch.allclose(mt.teacher.weight, 0.9 * before + 0.1 * student.weight)
    with torch.no_grad():
        mt.teacher.weight.zero_()
        mt.teacher.bias.copy_(torch.tensor([0.0, 5.0]))
    labels = mt.pseudo_labels(torch.rand(1, 3, 4, 4), threshold=0.9)
    assert (labels == 1).all()  # softmax(0, 5) = 0.993 >= 0.9
    assert (mt.pseudo_labels(torch.rand(1, 3, 4, 4), threshold=0.999) == 255).all()


# --- run helpers, training, resume, DDP ----------------------------------------------------------

@pytest.fixture(scope="module")
def toycity(tmp_path_factory):
    root = tmp_path_factory.mktemp("toycity")
    for split, n in (("train", 8), ("val", 2)):
        data.make_toycity(root / "source", n, size=(64, 128), domain="source", split=split, seed=0)
    data.make_toycity(root / "outlier", 2, size=(64, 128), domain="outlier", split="val", seed=1)
    return root


def train_args(root, out, name, *extra):
    return segment.parse_args(["--dataset", "toycity", "--data-root", str(root), "--model", "deeplabv3plus-r18",
                               "--output-stride", "16", "--size", "64", "128", "--train-minutes", "0",
                               "--batch-size", "4", "--workers", "0", "--log-every", "1",
                               "--out", str(out), "--name", name, "--device", "cpu", "--corruptions", *extra])


def test_a_few_training_steps_lower_the_loss_and_write_the_run_folder(toycity, tmp_path):
    args = train_args(toycity, tmp_path, "short", "--steps", "12", "--lr", "0.05", "--max-eval-images", "2")
    model, results = segment.train_segmenter(args)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "short" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    run = tmp_path / "short"
    assert {"args.json", "last.pt", "results.json", "index.html"} <= {p.name for p in run.iterdir()}
    assert 0.0 <= results["val"]["miou"] <= 1.0 and "ood" in results
    html = (run / "index.html").read_text()
    assert "<polyline" in html and "data:image/png;base64" in html


def train_killed_at(step, monkeypatch, args):
    """Runs train_segmenter(args) and kills it (KeyboardInterrupt) when it logs `step`."""
    log = segment.Run.log

    def log_then_die(self, logged, **scalars):
        if logged == step:
            raise KeyboardInterrupt
        log(self, logged, **scalars)
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(segment.Run, "log", log_then_die)
        segment.train_segmenter(args)


def test_resume_after_a_kill_gives_the_same_weights_as_an_uninterrupted_run(toycity, tmp_path, monkeypatch):
    common = ["--steps", "5", "--checkpoint-every", "2", "--batch-size", "3", "--size", "32", "64", "--no-eval",
              "--seed", "3"]  # 8 images, 2 batches per epoch: the kill and the resume fall mid-epoch
    segment.train_segmenter(train_args(toycity, tmp_path, "straight", *common))

    # the process dies during step 4, after the checkpoint of step 2
    train_killed_at(4, monkeypatch, train_args(toycity, tmp_path, "killed", *common))
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"] == 2
    segment.train_segmenter(train_args(toycity, tmp_path, "killed", *common, "--resume", "auto"))

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 5
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    log = [json.loads(r)["step"] for r in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5]  # what was logged after the checkpoint was replaced


def test_mean_teacher_training_mixes_real_and_generated_data(toycity, tmp_path):
    data.make_toycity(tmp_path / "generated", 4, size=(64, 128), domain="target", split="train", seed=5)
    (tmp_path / "generated" / "manifest.json").write_text(json.dumps({"generator": "test"}))
    args = train_args(toycity, tmp_path, "mt", "--steps", "2", "--batch-size", "2", "--size", "32", "64", "--no-eval",
                      "--generated", str(tmp_path / "generated"), "--mean-teacher", "--pseudo-threshold", "0")
    segment.train_segmenter(args)
    rows = [json.loads(r) for r in (tmp_path / "mt" / "log.jsonl").read_text().splitlines()]
    assert all(r["pseudo_fraction"] == 1.0 and r["loss"] > r["loss_sup"] for r in rows)  # both losses together
    state = torch.load(tmp_path / "mt" / "last.pt", weights_only=True)
    assert set(state["teacher"]) == set(state["model"])
    assert not torch.equal(state["teacher"]["classifier.weight"], state["model"]["classifier.weight"])
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        segment.GeneratedDataset(toycity / "source")


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    args = segment.parse_args(["--out", str(tmp_path), "--name", "nan", "--device", "cpu"])
    run = segment.Run(args)
    run.save({"step": 7, "w": torch.ones(2)})
    with pytest.raises(FloatingPointError, match="last.pt"):
        run.check_finite(torch.tensor(float("nan")), 8)
    assert torch.load(tmp_path / "nan" / "last.pt", weights_only=True)["step"] == 7
    assert not list((tmp_path / "nan").glob("*.tmp"))


def test_save_grid_pads_images_of_different_sizes_into_one_png(tmp_path):
    run = segment.Run(segment.parse_args(["--out", str(tmp_path), "--name", "grid", "--device", "cpu"]))
    rows = [[torch.zeros(3, 8, 16), torch.ones(1, 4, 4)], [torch.full((3, 8, 10), 0.5)]]
    image = data.read_image(run.save_grid(tmp_path / "grid.png", rows))
    assert image.shape == (3, 2 * 8 + 2, 2 * 16 + 2)
    assert image[:, 0, 0].sum() == 0 and image[:, 0, 18].sum() == 3  # black image, then the white one
    assert torch.allclose(image[:, 10, 0], torch.full((3,), 128 / 255))


def test_ddp_with_two_cpu_processes_runs_two_steps_and_writes_one_checkpoint(toycity, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(ROOT / "segment.py"), "--dataset", "toycity", "--data-root", str(toycity), "--model",
           "deeplabv3plus-r18", "--output-stride", "16", "--size", "32", "64", "--batch-size", "2", "--steps", "2",
           "--workers", "0", "--no-eval", "--device", "cpu", "--out", str(tmp_path), "--name", "ddp",
           "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ddp").glob("*.pt")) == ["last.pt"]
    state = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert state["step"] == 2 and len(state["rng"]) == 2
    assert proc.stdout.count("step 2/2") == 1  # only rank 0 prints
    assert proc.stdout.splitlines()[0].endswith("effective batch 4 = 2 per process x 2 processes")


def free_port():
    """A TCP port free now (other test runs on this machine may hold a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_mean_std_is_the_sample_standard_deviation():
    m, s = segment.mean_std([1.0, 2.0, 6.0])
    assert m == pytest.approx(3.0) and s == pytest.approx(((4 + 1 + 9) / 2) ** 0.5)
    assert segment.mean_std([5.0]) == (5.0, 0.0)


def test_experiment_stores_each_run_once_and_refuses_other_settings(tmp_path, capsys):
    calls = []

    def run(value):
        calls.append(value)
        return {"miou": value, "t": torch.tensor(0.5).item()}

    exp = segment.Experiment(tmp_path, "toy", {"seeds": [0, 1], "iters": 3})
    for seed in (0, 1):
        exp.cell(f"a-s{seed}", lambda: run(10.0 + seed))
    # a new process (a resumed experiment) reuses the stored results instead of running again
    again = segment.Experiment(tmp_path, "toy", {"seeds": [0, 1], "iters": 3})
    results = [again.cell(f"a-s{seed}", lambda: run(-1.0)) for seed in (0, 1)]
    assert calls == [10.0, 11.0] and [r["miou"] for r in results] == [10.0, 11.0]
    assert "done earlier" in capsys.readouterr().out
    text = again.table(["method", "mIoU"], [("a", [[r["miou"] for r in results]]), ("b", [[]])])
    assert "| a | 10.50 ± 0.71 |" in text and "| b | - |" in text
    assert "10.50 ± 0.71" in (tmp_path / "results.md").read_text()
    assert "| a | 10.5000 ± 0.7071 |" in again.table(["method", "mIoU"], [("a", [[10.0, 11.0]])], decimals=[4])
    stored = json.loads((tmp_path / "experiment.json").read_text())
    assert set(stored["cells"]) == {"a-s0", "a-s1"} and stored["cells"]["a-s0"]["seconds"] >= 0
    with pytest.raises(ValueError, match="other settings"):
        segment.Experiment(tmp_path, "toy", {"seeds": [0, 1], "iters": 4})


def test_experiment_resumes_with_settings_that_json_stores_differently(tmp_path):
    settings = {"seeds": [0], "size": (64, 128)}  # argparse defaults are often tuples; JSON keeps lists
    segment.Experiment(tmp_path, "toy", settings).cell("a", lambda: 1)
    assert segment.Experiment(tmp_path, "toy", settings).cell("a", lambda: pytest.fail("ran again")) == 1


def test_write_section_replaces_only_its_own_markers(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nverdict prose\n")
    segment.write_section(page, "ash", "| old |")
    segment.write_section(page, "robusta", "| r |")
    segment.write_section(page, "ash", "| new |")
    text = page.read_text()
    assert text.startswith("# Results\n\nverdict prose\n")
    assert "| new |" in text and "| old |" not in text and "| r |" in text
    assert text.index("begin ash") < text.index("begin robusta")  # a section keeps its place
    page.write_text(text.replace("<!-- end ash -->", ""))
    with pytest.raises(data.BadInput, match="markers"):
        segment.write_section(page, "ash", "x")


# --- issue 16: mean teacher that trains, resume on a GPU, run hygiene -------------------------------

def test_pseudo_label_loss_is_weighted_by_the_confident_fraction_and_zero_without_confident_pixels():
    logits = torch.randn(2, 3, 4, 4)
    pseudo = torch.full((2, 4, 4), 255)
    assert segment.pseudo_label_loss(logits, pseudo).item() == 0.0  # not NaN
    pseudo[0, :2] = 1  # 8 of 32 pixels confident
    mean_confident = torch.nn.functional.cross_entropy(logits, pseudo, ignore_index=255)
    assert segment.pseudo_label_loss(logits, pseudo).item() == pytest.approx(mean_confident.item() * 8 / 32, rel=1e-6)


def test_mean_teacher_with_the_default_threshold_trains_and_eval_teacher_reports_both(toycity, tmp_path):
    data.make_toycity(tmp_path / "generated", 4, size=(64, 128), domain="target", split="train", seed=5)
    (tmp_path / "generated" / "manifest.json").write_text(json.dumps({"generator": "test"}))
    args = train_args(toycity, tmp_path, "mt9", "--steps", "3", "--batch-size", "2", "--size", "32", "64",
                      "--generated", str(tmp_path / "generated"), "--mean-teacher", "--eval-teacher",
                      "--max-eval-images", "1")
    assert args.pseudo_threshold == 0.9  # the default, which a fresh teacher never reaches
    model, results = segment.train_segmenter(args)
    rows = [json.loads(r) for r in (tmp_path / "mt9" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss_pseudo"] == 0.0 and r["pseudo_fraction"] == 0.0 for r in rows)
    assert all(r["loss"] == pytest.approx(r["loss_sup"]) for r in rows)
    assert set(results["teacher"]) == set(results) - {"teacher"} and "val" in results["teacher"]
    assert 0.0 <= results["teacher"]["val"]["miou"] <= 1.0 and "ood" in results["teacher"]
    with pytest.raises(data.UserError, match="--mean-teacher"):
        segment.train_segmenter(train_args(toycity, tmp_path, "x", "--eval-teacher", "--no-eval"))


def test_restore_moves_modules_before_loading_optimizer_state(tmp_path):
    run = segment.Run(segment.parse_args(["--out", str(tmp_path), "--name", "r", "--device", "cpu"]))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()
    state = {"step": 7, "model": net.state_dict(), "optimizer": opt.state_dict()}
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    run.device = torch.device("meta")  # a second device: a CPU-only test still sees where state lands
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # keep Parameter objects across .to(), as CUDA does
    try:
        assert run.restore(state, {"model": fresh}, {"optimizer": fresh_opt}) == 7
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    devices = [(buf.device, p.device) for p in fresh.parameters() for buf in fresh_opt.state[p].values()
               if torch.is_tensor(buf)]
    assert devices and all(d == torch.device("meta") and d == q for d, q in devices)


def test_update_scaler_reports_a_step_skipped_for_an_inf_gradient(tmp_path):
    run = segment.Run(segment.parse_args(["--out", str(tmp_path), "--name", "s", "--device", "cpu", "--amp", "fp16"]))
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for injected, expected in ((float("inf"), False), (1.0, True)):
        before = net.weight.detach().clone()
        opt.zero_grad()
        run.scaler.scale(net(torch.tensor([[1.0, injected]])).sum()).backward()
        run.scaler.step(opt)
        assert run.update_scaler() is expected
        assert torch.equal(net.weight, before) is not expected


def test_resume_auto_without_a_checkpoint_starts_a_fresh_log_and_checkpoints_are_fsynced(tmp_path, monkeypatch):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "log.jsonl").write_text('{"step": 1, "loss": 9}\n')
    run = segment.Run(segment.parse_args(["--out", str(tmp_path), "--name", "f", "--device", "cpu", "--resume", "auto"]))
    assert not (tmp_path / "f" / "log.jsonl").exists()
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", None)) or replace(a, b))
    run.save({"step": 1})
    assert calls == [("fsync", False), ("replace", None), ("fsync", True)]  # file, rename, folder


def test_global_batch_size_is_divided_among_processes_and_stated_first(toycity, tmp_path, capsys):
    args = train_args(toycity, tmp_path, "gb", "--steps", "1", "--global-batch-size", "2", "--size", "32", "64",
                      "--no-eval")
    segment.train_segmenter(args)
    assert args.batch_size == 2
    assert capsys.readouterr().out.splitlines()[0].endswith("effective batch 2 = 2 per process x 1 process")


# --- issue 16: StreetHazards and BDD-Anomaly as their benchmark scores them; issue 19: GTA5 as downloaded ---

def small_args(dataset, root, out, name, *extra):
    return segment.parse_args(["--dataset", dataset, "--data-root", str(root), "--model", "deeplabv3plus-r18",
                               "--output-stride", "16", "--size", "32", "64", "--train-minutes", "0", "--batch-size",
                               "2", "--workers", "0", "--out", str(out), "--name", name, "--device", "cpu",
                               "--corruptions", "--steps", "2", "--log-every", "1", *extra])


def write_pair(image_path, label_path, label):
    data.write_image(image_path, torch.rand(3, *label.shape))
    data.write_label(label_path, label)


def test_streethazards_protocol_13_classes_anomaly_positive_everywhere_else_negative(tmp_path):
    label = torch.arange(32 * 64).reshape(32, 64) % 13 + 1  # PNG values 1..13: the 13 classes
    label[:8, :8] = 14  # the anomaly
    for part, sub in (("train", "training"), ("train", "validation"), ("test", "test")):
        for i in range(2):
            write_pair(tmp_path / part / "images" / sub / "t1" / f"{i}.png",
                       tmp_path / part / "annotations" / sub / "t1" / f"{i}.png", label)
    sample = segment.StreetHazardsBenchmark(tmp_path, "test")[0]
    assert torch.equal(sample["labels"][8:], label[8:] - 1) and (sample["labels"][:8, :8] == 255).all()
    assert torch.equal(sample["anomaly"], (label == 14).to(torch.uint8))  # no void: every other pixel negative
    model, results = segment.train_segmenter(small_args("streethazards", tmp_path, tmp_path, "sh"))
    assert model.classifier.out_channels == 13 and len(results["val"]["iou"]) == 13
    assert results["ood"]["msp"]["per_image"]["images"] == 2 and "auroc" in results["ood"]["msp"]


def test_ood_metrics_per_image_mean_and_pooled_differ_as_the_benchmark_says():
    class ScoreFromImage(torch.nn.Module):  # max logit = 10 * channel 0, so the score is -10 * channel 0
        def forward(self, x):
            return torch.cat([10 * x[:, :1], torch.zeros_like(x[:, :1])], 1)

    anomaly = torch.zeros(3, 2, 2, dtype=torch.uint8)
    anomaly[:, 0] = 1
    anomaly[2] = 0  # no OOD pixel: no per-image figure, still pooled
    image = torch.zeros(3, 3, 2, 2)
    image[0, 0], image[1, 0], image[2, 0] = 0.5, 0.3, 0.9
    image[0, 0, 0], image[1, 0, 0] = 0.4, 0.2  # OOD scores above ID within each image, not across images
    results = segment.evaluate_ood(ScoreFromImage(), [{"image": image, "anomaly": anomaly}], "cpu", kinds=("maxlogit",),
                                   per_image=True)
    m = results["maxlogit"]
    assert m["per_image"]["auroc"] == pytest.approx(1.0) and m["per_image"]["images"] == 2
    assert m["auroc"] == pytest.approx(metrics.auroc(-10 * image[:, 0], anomaly)) and m["auroc"] < 0.9


def test_bdd_anomaly_split_drops_training_images_with_train_or_motorcycle_and_scores_them_in_val(tmp_path):
    base = torch.arange(32 * 64).reshape(32, 64) % 16  # trainIds 0..15
    with_moto = base.clone()
    with_moto[:4, :4] = 17
    with_train = base.clone()
    with_train[-4:, -4:] = 16
    with_train[0, -1] = 18  # bicycle -> class 16 of 17
    with_train[1, -1] = 255
    for split in ("train", "val"):
        for name, label in (("a", base), ("b", with_moto), ("c", with_train)):
            label = with_train.clone().masked_fill(with_train == 16, 0) if split == "train" and name == "c" else label
            write_pair(tmp_path / "images" / "10k" / split / f"{name}.jpg",
                       tmp_path / "labels" / "sem_seg" / "masks" / split / f"{name}.png", label)
    train = segment.BDDAnomaly(tmp_path, "train")
    assert sorted(s["name"] for s in train.samples) == ["a", "c"]  # b holds a motorcycle
    assert train[1]["labels"][0, -1] == 16 and train[1]["labels"].max() == 255
    val = segment.BDDAnomaly(tmp_path, "val")
    c = val[2]
    assert (c["anomaly"][-4:, -4:] == 1).all() and c["anomaly"][1, -1] == 255 and c["anomaly"][5, 5] == 0
    assert (val[1]["anomaly"] == 1).sum() == 16 and (val[0]["anomaly"] == 1).sum() == 0
    model, results = segment.train_segmenter(small_args("bdd-anomaly", tmp_path, tmp_path, "bdd"))
    assert model.classifier.out_channels == 17 and "val" not in results  # val is the OOD set
    assert results["ood"]["msp"]["per_image"]["images"] == 2
    ood_args = small_args("bdd-anomaly", tmp_path, tmp_path, "bdd2", "--ood-dataset", "bdd-anomaly",
                          "--ood-root", str(tmp_path), "--no-eval")
    assert ood_args.ood_dataset == "bdd-anomaly"


def test_gta5_without_split_files_trains_on_every_image_and_skips_source_evaluation(tmp_path, capsys):
    # (the Cityscapes preset's 768 x 768 crop is replaced by a crop that fits the tiny images)
    label = torch.tensor([7, 8, 11, 21, 23, 26]).repeat_interleave(11)[:64].repeat(32, 1)  # Cityscapes ids
    for i in range(1, 5):
        write_pair(tmp_path / "gta" / "images" / f"{i:05d}.png", tmp_path / "gta" / "labels" / f"{i:05d}.png", label)
    model, results = segment.train_segmenter(small_args("gta5", tmp_path / "gta", tmp_path, "gta", "--crop", "32", "64"))
    assert "no val split" in capsys.readouterr().out and results == {}
    rows = (tmp_path / "gta" / "log.jsonl").read_text().splitlines()
    assert len(rows) == 2
    segment.train_segmenter(small_args("gta5", tmp_path / "gta", tmp_path, "gta-ne", "--no-eval", "--crop", "32", "64"))
    (tmp_path / "two.txt").write_text("00001\n00002\n")
    args = small_args("gta5", tmp_path / "gta", tmp_path, "gta-sf", "--no-eval", "--split-file", str(tmp_path / "two.txt"))
    train, *_ = segment.dataset_roots(args)
    assert sorted(s["name"] for s in train.samples) == ["00001", "00002"]
    (tmp_path / "gta" / "val.txt").write_text("00004\n")  # where a val split exists, the source is evaluated
    args = small_args("gta5", tmp_path / "gta", tmp_path, "gta-val", "--max-eval-images", "1")
    train, val, _, _ = segment.dataset_roots(args)
    assert len(train) == 4 and [s["name"] for s in val.samples] == ["00004"]


# --- issue 18: the papers' evaluators and ASH's initialisation, loaded strictly -------------------
# Reference key lists are derived here from the reference repositories' model code (names, shapes),
# independently of segment.py; each tensor is a 0-stride view of one distinct value, so the files stay tiny
# and a test can tell where each tensor went.

def bn_keys(prefix, c, tracked=False):
    return {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")} | (
        {f"{prefix}.num_batches_tracked": ()} if tracked else {})


def bottleneck_layer_keys(prefix, inplanes, planes, blocks):
    """torchvision / DRN / AdaptSegNet / CSAIL bottleneck names: conv1..3, bn1..3, downsample.0/1 in block 0."""
    keys = {}
    for b in range(blocks):
        cin = inplanes if b == 0 else planes * 4
        keys |= {f"{prefix}.{b}.conv1.weight": (planes, cin, 1, 1), f"{prefix}.{b}.conv2.weight": (planes, planes, 3, 3),
                 f"{prefix}.{b}.conv3.weight": (planes * 4, planes, 1, 1)}
        keys |= bn_keys(f"{prefix}.{b}.bn1", planes) | bn_keys(f"{prefix}.{b}.bn2", planes) | bn_keys(
            f"{prefix}.{b}.bn3", planes * 4)
        if b == 0:
            keys |= {f"{prefix}.0.downsample.0.weight": (planes * 4, inplanes, 1, 1)} | bn_keys(
                f"{prefix}.0.downsample.1", planes * 4)
    return keys


def resnet101_stages(prefix, inplanes=64):
    keys, cin = {}, inplanes
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 23, 3))):
        keys |= bottleneck_layer_keys(f"{prefix}layer{i + 1}", cin, planes, blocks)
        cin = planes * 4
    return keys


def save_reference(path, shapes):
    """A checkpoint with exactly these keys and shapes; tensor i holds the value i (a 0-stride view)."""
    state = {k: torch.full((1,), float(i)).expand(s) if s else torch.tensor(i) for i, (k, s) in enumerate(shapes.items())}
    torch.save(state, path)
    return {k: i for i, k in enumerate(shapes)}


def test_drn_d_105_loads_fyu_drn_keys_strictly_and_has_the_published_54_8m_parameters(tmp_path):
    keys = {"base.0.0.weight": (16, 3, 7, 7)} | bn_keys("base.0.1", 16) | {"base.1.0.weight": (16, 16, 3, 3)} | bn_keys(
        "base.1.1", 16) | {"base.2.0.weight": (32, 16, 3, 3)} | bn_keys("base.2.1", 32)
    for i, (cin, planes, blocks) in enumerate([(32, 64, 3), (256, 128, 4), (512, 256, 23), (1024, 512, 3)]):
        keys |= bottleneck_layer_keys(f"base.{i + 3}", cin, planes, blocks)
    keys |= {"base.7.0.weight": (512, 2048, 3, 3)} | bn_keys("base.7.1", 512) | {"base.8.0.weight": (512, 512, 3, 3)}
    keys |= bn_keys("base.8.1", 512) | {"seg.weight": (19, 512, 1, 1), "seg.bias": (19,), "up.weight": (19, 1, 16, 16)}
    values = save_reference(tmp_path / "drn_d_105_cityscapes.pth", keys)
    model = segment.load_evaluator("drn-d-105", tmp_path / "drn_d_105_cityscapes.pth")
    assert not model.training and (model.base[5][0].conv2.weight == values["base.5.0.conv2.weight"]).all()
    assert model.base[5][0].conv2.dilation == (2, 2) and model.base[4][0].conv2.stride == (2, 2)
    # fyu/drn README: DRN-D-105, 54.8 M parameters (the ImageNet model: the base + a 1x1 conv 512 -> 1000)
    count = (sum(p.numel() for p in model.base.parameters()) + 512 * 1000 + 1000) / 1e6
    print(f"DRN-D-105: {count:.3f} M parameters (published 54.8 M)")
    assert round(count, 1) == 54.8
    x = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        assert model(x).shape == (1, 19, 20, 28)
    with pytest.raises(data.MissingFile, match="go.yf.io"):
        segment.load_evaluator("drn-d-105", tmp_path / "missing.pth")


def test_upernet_101_loads_csail_encoder_and_decoder_strictly(tmp_path):
    encoder = {"conv1.weight": (64, 3, 3, 3)} | bn_keys("bn1", 64) | {"conv2.weight": (64, 64, 3, 3)} | bn_keys(
        "bn2", 64) | {"conv3.weight": (128, 64, 3, 3)} | bn_keys("bn3", 128) | resnet101_stages("", inplanes=128)
    decoder = {}
    for i in range(4):
        decoder |= {f"ppm_conv.{i}.0.weight": (512, 2048, 1, 1)} | bn_keys(f"ppm_conv.{i}.1", 512)
    decoder |= {"ppm_last_conv.0.weight": (512, 2048 + 4 * 512, 3, 3)} | bn_keys("ppm_last_conv.1", 512)
    for i, c in enumerate((256, 512, 1024)):
        decoder |= {f"fpn_in.{i}.0.weight": (512, c, 1, 1)} | bn_keys(f"fpn_in.{i}.1", 512)
        decoder |= {f"fpn_out.{i}.0.0.weight": (512, 512, 3, 3)} | bn_keys(f"fpn_out.{i}.0.1", 512)
    decoder |= {"conv_last.0.0.weight": (512, 4 * 512, 3, 3)} | bn_keys("conv_last.0.1", 512)
    decoder |= {"conv_last.1.weight": (150, 512, 1, 1), "conv_last.1.bias": (150,)}
    save_reference(tmp_path / "encoder_epoch_50.pth", encoder)
    values = save_reference(tmp_path / "decoder_epoch_50.pth", decoder)
    model = segment.load_evaluator("upernet-101", tmp_path)
    assert (model.decoder.conv_last[1].bias == values["conv_last.1.bias"]).all()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 33, 47)).shape == (1, 150, 33, 47)
    with pytest.raises(data.MissingFile, match="sceneparsing.csail.mit.edu"):
        segment.load_evaluator("upernet-101", tmp_path / "nothing")


def caffe_deeplabv2_keys(prefix, num_classes):
    """AdaptSegNet's deeplab.py names (torchvision-like, bottleneck stride in conv1) under `prefix`."""
    keys = {f"{prefix}conv1.weight": (64, 3, 7, 7)} | bn_keys(f"{prefix}bn1", 64) | resnet101_stages(prefix)
    for i in range(4):
        keys |= {f"{prefix}layer5.conv2d_list.{i}.weight": (num_classes, 2048, 3, 3),
                 f"{prefix}layer5.conv2d_list.{i}.bias": (num_classes,)}
    return keys


def test_caffe_deeplabv2_is_clans_form_and_loads_adaptsegnet_init(tmp_path):
    values = save_reference(tmp_path / "init.pth", caffe_deeplabv2_keys("Scale.", 19))
    model = segment.DeepLabV2(19, depth=101, style="caffe", pretrained=tmp_path / "init.pth")
    b = model.backbone
    assert [blk.conv2.dilation[0] for blk in b.layer3] == [2] * 23 and [blk.conv2.dilation[0] for blk in b.layer4] == [4] * 3
    assert b.layer2[0].conv1.stride == (2, 2) and b.layer2[0].conv2.stride == (1, 1) and b.maxpool.ceil_mode
    assert (model.layer5.conv2d_list[3].bias == values["Scale.layer5.conv2d_list.3.bias"]).all()
    assert (b.layer3[22].bn3.running_var == values["Scale.layer3.22.bn3.running_var"]).all()
    bn_params = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    assert bn_params and not any(p.requires_grad for p in bn_params)  # BatchNorm frozen
    trained = {id(p) for g in model.param_groups(1.0) for p in g["params"]}
    assert not trained & {id(p) for p in bn_params}
    fresh = segment.DeepLabV2(3, depth=50, style="caffe")
    x = torch.rand(2, 3, 41, 41)
    with torch.no_grad():
        assert torch.equal(fresh.train()(x), fresh.eval()(x))  # frozen statistics in train mode too
        assert fresh.backbone(fresh.normalize(x))[3].shape[-1] == 6  # output stride 8 (ceil-mode pooling)
    save_reference(tmp_path / "init21.pth", caffe_deeplabv2_keys("Scale.", 21))  # COCO classifier: skipped
    other = segment.DeepLabV2(19, depth=101, style="caffe", pretrained=tmp_path / "init21.pth")
    assert other.layer5.conv2d_list[0].weight.std() < 0.1 and (other.backbone.conv1.weight == 0).all()
    with pytest.raises(data.MissingFile, match="AdaptSegNet"):
        segment.DeepLabV2(19, style="caffe", pretrained=tmp_path / "missing.pth")


def test_deeplabv2_cocostuff_loads_kazuto1011_keys_strictly(tmp_path):
    keys = {"base.layer1.conv1.conv.weight": (64, 3, 7, 7)} | bn_keys("base.layer1.conv1.bn", 64, tracked=True)
    cin = 64
    for k, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 23, 3))):
        for j in range(blocks):
            p = f"base.layer{k + 2}.block{j + 1}"
            c = cin if j == 0 else planes * 4
            for part, shape in (("reduce", (planes, c, 1, 1)), ("conv3x3", (planes, planes, 3, 3)),
                                ("increase", (planes * 4, planes, 1, 1))) + ((("shortcut", (planes * 4, c, 1, 1)),) if j == 0 else ()):
                keys |= {f"{p}.{part}.conv.weight": shape} | bn_keys(f"{p}.{part}.bn", shape[0], tracked=True)
        cin = planes * 4
    for i in range(4):
        keys |= {f"base.aspp.c{i}.weight": (182, 2048, 3, 3), f"base.aspp.c{i}.bias": (182,)}
    values = save_reference(tmp_path / "cocostuff.pth", keys)
    model = segment.load_evaluator("deeplabv2-cocostuff", tmp_path / "cocostuff.pth")
    assert (model.backbone.layer2[0].conv1.weight == values["base.layer3.block1.reduce.conv.weight"]).all()
    assert model.backbone.layer2[0].conv1.stride == (2, 2)
    assert (model.backbone.layer4[0].downsample[1].bias == values["base.layer5.block1.shortcut.bn.bias"]).all()
    assert (model.layer5.conv2d_list[2].weight == values["base.aspp.c2.weight"]).all()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 24, 24)).shape == (1, 182, 24, 24)


def test_segformer_loads_mmseg_checkpoints_with_backbone_and_decode_head_keys(tmp_path):
    encoder = segment.MixVisionTransformer("b0").state_dict()  # official mit_b0 names (tested above)
    keys = {f"backbone.{k}": tuple(v.shape) for k, v in encoder.items()}
    for i, c in enumerate((32, 64, 160, 256)):
        keys |= {f"decode_head.linear_c{i + 1}.proj.weight": (256, c), f"decode_head.linear_c{i + 1}.proj.bias": (256,)}
    keys |= {"decode_head.linear_fuse.conv.weight": (256, 1024, 1, 1)} | bn_keys("decode_head.linear_fuse.bn", 256, True)
    keys |= {"decode_head.linear_pred.weight": (19, 256, 1, 1), "decode_head.linear_pred.bias": (19,),
             "decode_head.conv_seg.weight": (19, 256, 1, 1), "decode_head.conv_seg.bias": (19,)}
    values = save_reference(tmp_path / "segformer.b0.city.pth", keys)
    model = segment.load_evaluator("segformer-b0", tmp_path / "segformer.b0.city.pth")
    assert (model.decode_head.linear_pred.bias == values["decode_head.linear_pred.bias"]).all()
    assert (model.encoder.block1[0].attn.q.weight == values["backbone.block1.0.attn.q.weight"]).all()
    mmseg = {k: v for k, v in keys.items() if not k.startswith("decode_head.linear_pred")}  # conv_seg classifies
    values = save_reference(tmp_path / "mmseg.pth", mmseg)
    model = segment.load_evaluator("segformer-b0", tmp_path / "mmseg.pth")
    assert (model.decode_head.linear_pred.weight == values["decode_head.conv_seg.weight"]).all()
    assert set(segment.EVALUATORS) == {"drn-d-105", "upernet-101", "deeplabv2-cocostuff"} | {
        f"segformer-b{i}" for i in range(6)}


# --- issue 17 §1: the segmenter's training dynamics ----------------------------------------------

def bn_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 3, 1))


def test_optimizer_moves_only_the_student_and_the_teacher_starts_equal_buffers_included():
    torch.manual_seed(0)
    student = segment.build_model("deeplabv3plus-r18", 3, output_stride=16)
    student(torch.rand(2, 3, 32, 32))  # train mode: BN running statistics move away from their defaults
    mt = segment.MeanTeacher(student, decay=0.99)
    for (k, t), s in zip(mt.teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(t, s), k
    args = segment.parse_args(["--lr", "0.1", "--optimizer", "sgd", "--weight-decay", "0"])
    optimizer = segment.make_optimizer(student, args)
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in student.parameters()) and len(ids) == len(set(ids))
    assert not set(ids) & {id(p) for p in mt.teacher.parameters()}
    before = copy_state(mt.teacher)
    student(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in mt.teacher.state_dict().items())  # only its own network


def copy_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_mean_teacher_follows_by_ema_copies_buffers_stays_in_eval_and_makes_the_pseudo_labels():
    torch.manual_seed(0)
    student = bn_net()
    mt = segment.MeanTeacher(student, decay=0.9)
    assert not mt.teacher.training and not any(p.requires_grad for p in mt.teacher.parameters())
    t0, s_before = copy_state(mt.teacher), copy_state(student)
    with torch.no_grad():
        student[0].weight.add_(1.0)
    student(torch.rand(4, 3, 8, 8))  # moves the student's BN statistics
    mt.update(student, step=50)
    assert torch.allclose(mt.teacher[0].weight, 0.9 * t0["0.weight"] + 0.1 * student[0].weight)
    assert torch.equal(mt.teacher[1].running_mean, student[1].running_mean)
    assert not torch.equal(student[1].running_mean, s_before["1.running_mean"])
    student.train()
    mt.update(student, step=51)
    assert not mt.teacher.training
    with torch.no_grad():  # the pseudo-labels are the teacher's, not the student's
        mt.teacher[3].bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
        student[3].bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
    assert (mt.pseudo_labels(torch.rand(2, 3, 8, 8), threshold=0.9) == 2).all()


def test_evaluation_runs_in_eval_mode_and_gives_the_model_back_in_train_mode():
    modes = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            modes.append(self.training)
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    model = Spy().train()
    batch = {"image": torch.rand(1, 3, 4, 4), "labels": torch.zeros(1, 4, 4, dtype=torch.long),
             "anomaly": torch.tensor([[[0, 1] * 2] * 4], dtype=torch.uint8), "name": ["a"]}
    segment.evaluate(model, [batch], "cpu", num_classes=2)
    segment.evaluate_ood(model, [batch], "cpu")
    assert modes and not any(modes) and model.training


def test_ddp_shards_of_two_ranks_are_disjoint_and_cover_the_data():
    dataset = list(range(10))
    shards = [list(segment.ResumableSampler(dataset, 2, rank, shuffle=True, seed=3, drop_last=False))
              for rank in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(dataset)
    assert len(shards[0]) == len(shards[1]) == 5


DDP_STEP = """
import sys, torch
sys.path.insert(0, {root!r})
import segment
run = segment.Run(segment.parse_args(["--device", "cpu", "--out", {out!r}, "--name", "ddp-step"]))
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
x, y = torch.rand(4, 3, 6, 6), torch.randint(0, 2, (4, 6, 6))
model = run.wrap(net)
opt = torch.optim.SGD(model.parameters(), lr=0.5)
half = slice(2 * run.rank, 2 * run.rank + 2) if run.distributed else slice(0, 4)
torch.nn.functional.cross_entropy(model(x[half]), y[half]).backward()  # DDP averages the two halves' gradients
opt.step()
if run.is_main:
    torch.save(segment.unwrap(model).state_dict(), {out!r} + "/" + str(run.world_size) + ".pt")
if run.distributed:
    torch.distributed.barrier()  # no rank tears the group down while the other still uses it
run.close()
"""


def test_one_ddp_step_on_two_processes_equals_one_process_on_the_combined_batch(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(DDP_STEP.format(root=str(ROOT), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script)], check=True, env=env, timeout=120)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           free_port(), str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = torch.load(tmp_path / "1.pt"), torch.load(tmp_path / "2.pt")
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), (k, (one[k] - two[k]).abs().max())
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    assert not torch.allclose(start[0].weight, one["0.weight"])  # the step moved the weights


def test_bf16_autocast_step_losses_are_within_a_few_percent_of_fp32(tmp_path):
    losses = {}
    for amp in ("off", "bf16"):
        run = segment.Run(segment.parse_args(["--device", "cpu", "--out", str(tmp_path), "--name", amp, "--amp", amp]))
        torch.manual_seed(0)
        net = bn_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 3, (4, 16, 16))
        losses[amp] = []
        for _ in range(3):
            with run.autocast():
                loss = torch.nn.functional.cross_entropy(net(x).float(), y)
            opt.zero_grad()
            run.scaler.scale(loss).backward()
            run.scaler.step(opt)
            assert run.update_scaler()
            losses[amp].append(loss.item())
    assert losses["off"][-1] < losses["off"][0]
    for a, b in zip(losses["off"], losses["bf16"]):
        assert abs(a - b) / a < 0.03


def test_an_inf_gradient_makes_the_fp16_scaler_skip_the_optimizer_and_the_mean_teacher(toycity, tmp_path, monkeypatch):
    data.make_toycity(tmp_path / "generated", 4, size=(64, 128), domain="target", split="train", seed=5)
    (tmp_path / "generated" / "manifest.json").write_text(json.dumps({"generator": "test"}))
    build = segment.build_model

    def build_with_inf_at_third_backward(*args, **kwargs):
        model = build(*args, **kwargs)
        calls = []
        model.classifier.weight.register_hook(lambda g: calls.append(1) or (g * float("inf") if len(calls) == 3 else g))
        return model

    common = ["--batch-size", "2", "--size", "32", "64", "--no-eval", "--amp", "fp16", "--poly-power", "0",
              "--generated", str(tmp_path / "generated"), "--mean-teacher", "--pseudo-threshold", "0", "--ema", "0.5"]
    # the scaler is what is tested: fp16 kernels are slow on a CPU, so autocast is left out (same arithmetic in both runs)
    monkeypatch.setattr(segment.Run, "autocast", lambda self: contextlib.nullcontext())
    segment.train_segmenter(train_args(toycity, tmp_path, "two", "--steps", "2", *common))
    monkeypatch.setattr(segment, "build_model", build_with_inf_at_third_backward)
    segment.train_segmenter(train_args(toycity, tmp_path, "three", "--steps", "3", *common))
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    three = torch.load(tmp_path / "three" / "last.pt", weights_only=True)
    assert three["scaler"]["scale"] == two["scaler"]["scale"] / 2  # exactly one step skipped
    for key, value in two["teacher"].items():
        assert torch.equal(three["teacher"][key], value), key
    for key, value in two["model"].items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):  # BN counts every forward
            assert torch.equal(three["model"][key], value), key


def test_mean_teacher_survives_a_resume(toycity, tmp_path, monkeypatch):
    data.make_toycity(tmp_path / "generated", 4, size=(64, 128), domain="target", split="train", seed=5)
    (tmp_path / "generated" / "manifest.json").write_text(json.dumps({"generator": "test"}))
    common = ["--steps", "3", "--checkpoint-every", "1", "--batch-size", "2", "--size", "32", "64", "--no-eval",
              "--generated", str(tmp_path / "generated"), "--mean-teacher", "--pseudo-threshold", "0.3"]
    segment.train_segmenter(train_args(toycity, tmp_path, "straight", *common))
    train_killed_at(3, monkeypatch, train_args(toycity, tmp_path, "killed", *common))
    segment.train_segmenter(train_args(toycity, tmp_path, "killed", *common, "--resume", "auto"))
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key
    assert not torch.equal(a["teacher"]["classifier.weight"], a["model"]["classifier.weight"])


def test_user_mistakes_answer_with_one_error_line_and_status_2(tmp_path, capsys):
    for argv, words in ((["--dataset", "gta5", "--out", str(tmp_path)], "--data-root"),
                        (["--dataset", "gta5", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path)], "published"),
                        (["--mean-teacher", "--out", str(tmp_path)], "--generated"),
                        (["--style", "caffe", "--model", "deeplabv2-r50", "--out", str(tmp_path)], "AdaptSegNet")):
        with pytest.raises(SystemExit) as exit_:
            data.cli(segment.main, argv + ["--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and words in err[0], err
    with pytest.raises(data.MissingFile, match="published"):
        segment.load_evaluator("deeplabv2-cocostuff", tmp_path / "none.pth")
