"""CUDA smoke test of every trainer: start, kill after the first checkpoint, resume, finish - with AMP.

A CPU test cannot show device bugs of a resume (optimizer state left on the CPU, mixed-device steps,
a GradScaler restored on the wrong device). This script runs each trainer of the project on the GPU
at toy scale: it starts the run, kills the process once the first checkpoint is on disk, resumes it
with `--resume auto` and checks that the resumed run finishes with status 0, at its last step,
and that its checkpoint holds finite weights. Not collected by pytest (its name does not start with
test_); it exits 0 with a "skipped" line where no GPU is visible.

    python tests/cuda_smoke.py                 # every trainer, --amp fp16 and bf16
    python tests/cuda_smoke.py segment         # one trainer
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# 6 steps, a checkpoint every 3: the kill falls after step 3, the resume runs steps 4-6.
TRAINERS = {
    "segment": lambda out, amp: [
        "segment.py", "--dataset", "toycity", "--model", "deeplabv3plus-r18", "--output-stride", "16",
        "--size", "64", "128", "--batch-size", "2", "--steps", "6", "--checkpoint-every", "3", "--train-minutes", "0",
        "--workers", "0", "--no-eval", "--amp", amp, "--out", out, "--name", "smoke", "--log-every", "1"],
    "segment-mean-teacher": lambda out, amp: [
        "segment.py", "--dataset", "toycity", "--model", "deeplabv2-r50", "--size", "64", "128",
        "--batch-size", "2", "--steps", "6", "--checkpoint-every", "3", "--train-minutes", "0", "--workers", "0",
        "--no-eval", "--amp", amp, "--out", out, "--name", "smoke", "--log-every", "1",
        "--generated", str(toycity_generated(out)), "--mean-teacher"],
    "robusta": lambda out, amp: [
        "robusta.py", "train", "--dataset", "toycity", "--size", "64", "128", "--batch-size", "2", "--epochs", "1",
        "--fine-epochs", "1", "--checkpoint-every", "3", "--workers", "0", "--amp", amp, "--out", out, "--name", "smoke"],
    "ash": lambda out, amp: [
        "ash.py", "--source", "toycity", "--target", "toycity", "--depth", "18", "--size", "64", "128", "--iters", "6",
        "--save-every", "3", "--eval-every", "0", "--image-every", "3", "--workers", "0", "--amp", amp, "--out", out,
        "--name", "smoke"],
}


def toycity_generated(out):
    """A tiny generated-data folder (ToyCity target domain + manifest) for the mean teacher."""
    sys.path.insert(0, str(ROOT))
    import data
    folder = Path(out) / "generated"
    if not (folder / "manifest.json").is_file():
        data.make_toycity(folder, 4, size=(64, 128), domain="target", split="train", seed=5)
        (folder / "manifest.json").write_text('{"generator": "cuda_smoke"}')
    return folder


def checkpoints(run_dir):
    return sorted(run_dir.glob("*.pt")) if run_dir.is_dir() else []


def smoke(name, amp):
    out = tempfile.mkdtemp(prefix=f"smoke-{name}-{amp}-")
    cmd = [sys.executable] + TRAINERS[name](out, amp)
    cmd[1] = str(ROOT / cmd[1])
    run_dir = Path(out) / "smoke"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(cmd + ["--device", "cuda"], cwd=ROOT, env=env)
    deadline = time.time() + 900
    while not checkpoints(run_dir) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if first.poll() is None:
        first.kill()  # the crash: a checkpoint is on disk, the run is not finished
        first.wait()
    if not checkpoints(run_dir):
        return f"{name} ({amp}): no checkpoint before the kill (status {first.returncode})"
    second = subprocess.run(cmd + ["--device", "cuda", "--resume", "auto"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1800)
    if second.returncode != 0:
        return f"{name} ({amp}): the resumed run failed:\n{second.stderr[-3000:]}"
    for path in checkpoints(run_dir):
        state = torch.load(path, map_location="cpu", weights_only=True)
        tensors = [v for v in _tensors(state) if v.is_floating_point()]
        if not all(torch.isfinite(v).all() for v in tensors):
            return f"{name} ({amp}): {path} holds non-finite values after the resume"
    return None


def _tensors(state):
    if torch.is_tensor(state):
        yield state
    elif isinstance(state, dict):
        for v in state.values():
            yield from _tensors(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _tensors(v)


def main(names):
    if not torch.cuda.is_available():
        print("cuda_smoke: skipped (no GPU visible)")
        return 0
    failures = []
    for name in names or TRAINERS:
        for amp in ("fp16", "bf16"):
            problem = smoke(name, amp)
            print(f"cuda_smoke: {name} {amp}: {'FAILED' if problem else 'ok'}", flush=True)
            if problem:
                failures.append(problem)
    print("\n".join(failures) if failures else "cuda_smoke: every trainer resumed on the GPU")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
