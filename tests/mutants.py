"""Mutation runner: plant one plausible bug at a time and check that the tests catch it.

    python tests/mutants.py                 # every mutant, 2 at a time
    python tests/mutants.py --list          # what each mutant plants, and which tests should catch it
    python tests/mutants.py --only D-real-detached,G-adv-detached --json out.json

A development tool, not part of `python -m pytest -q` (pytest only collects `test_*.py`). Each mutant
is one exact source edit (`old` -> `new`, where `old` must occur exactly once in the file) applied to a
temporary copy of the repository; the runner then runs the tests named for it. The mutant is

- caught:   the tests fail (or time out),
- survived: the tests pass — the suite would not notice this bug,
- stale:    `old` no longer occurs exactly once (the code moved: update the mutant),
- broken:   the edit does not compile (fix the mutant; it proves nothing).

Before any mutant, the same tests run on the unmutated copy; a failing baseline stops the run.
Exit status 0 when at least --threshold of the live mutants (caught + survived) are caught.
Keep the list current when the code moves: a stale mutant is reported, never silently skipped.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = []


def add(id, file, old, new, why, tests):
    """Register a mutant: replace `old` (once) by `new` in `file`; `tests` are pytest arguments."""
    MUTANTS.append(dict(id=id, file=file, old=old, new=new, why=why, tests=list(tests)))


# ---- metrics.py --------------------------------------------------------------------------------
M = ["tests/test_metrics.py"]
add("iou-union-without-fp", "metrics.py",
    "return tp / (mat.sum(0) + mat.sum(1) - tp)", "return tp / (mat.sum(1) + 0 * mat.sum(0))",
    "IoU's union forgets the false positives", M)
add("miou-zero-for-absent", "metrics.py", "return torch.nanmean(iou).item()",
    "return torch.nan_to_num(iou).mean().item()", "classes absent from GT and prediction count as IoU 0", M)
add("subset-16-terrain-for-sky", "metrics.py", '"16": (0, 1, 2, 3, 4, 5, 6, 7, 8, 10,',
    '"16": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9,', "mIoU16 takes terrain instead of sky", M)
add("auroc-ties-count-one", "metrics.py", "(tp - pos + pos / 2)", "(tp - pos + pos)",
    "AUROC counts a tied (pos, neg) pair as a win", M)
add("fpr-at-tpr-90", "metrics.py", "_ood_metrics(counts[:, 1], counts[:, 0], tpr=0.95)",
    "_ood_metrics(counts[:, 1], counts[:, 0], tpr=0.90)", "the streaming meter reads FPR at 90% TPR", M)
add("msp-is-max-prob", "metrics.py", "return -torch.expm1(logits.log_softmax(1).amax(1))",
    "return logits.softmax(1).amax(1)", "MSP score not inverted: confident pixels look anomalous", M)
add("frechet-no-cross-term", "metrics.py", "- 2 * tr_covmean).item()", "- 0 * tr_covmean).item()",
    "Frechet distance without the cross term", M)
add("cov-biased", "metrics.py", "return mean, scatter / (n - 1)", "return mean, scatter / n",
    "Inception statistics with the biased covariance", M)

# ---- data.py -----------------------------------------------------------------------------------
D = ["tests/test_data.py"]
add("flip-image-only", "data.py", "v.flip(-1) if (k in IMAGE_KEYS or k in LABEL_PAD) else v",
    "v.flip(-1) if k in IMAGE_KEYS else v", "random flip leaves the labels unflipped", D)
add("edges-one-side", "data.py", "    edge[:, :, :-1] |= dx\n", "",
    "instance edges mark only one side of a vertical boundary", D)
add("one-hot-keeps-invalid", "data.py", "return (out * valid[..., None]).permute(0, 3, 1, 2).float()",
    "return out.permute(0, 3, 1, 2).float()", "ids outside the table become class 0 in the generator input", D)
add("labels-resized-bilinear", "data.py", 'size=size, mode="nearest-exact")[0, 0].to(value.dtype)',
    'size=size, mode="bilinear")[0, 0].round().to(value.dtype)', "label maps resized by interpolation", D)


# ---- robusta.py --------------------------------------------------------------------------------
R = ["tests/test_robusta.py"]
add("D-real-detached", "robusta.py", "d_real = [[f[n:] for f in feats] for feats in outputs]",
    "d_real = [[f[n:].detach() for f in feats] for feats in outputs]",
    "D's loss gets no gradient from real pairs (the issue-12 bug)", R)
add("D-no-step", "robusta.py", "    run.scaler.step(opt_d)\n", "",
    "D's optimizer never steps", R)
add("G-adv-detached", "robusta.py", "generator_loss(d(label, fake), d_real,",
    "generator_loss(d(label, fake.detach()), d_real,", "G's adversarial / FM path detached from G", R)
add("FM-targets-old-D", "robusta.py", "            d_real = d(label, real)  # targets of Eq. (A4), from the updated D\n",
    "            pass\n", "FM targets taken from D before its update", R)
add("D-targets-flipped", "robusta.py", "loss_d = discriminator_loss(d_real, d_fake, mode)",
    "loss_d = discriminator_loss(d_fake, d_real, mode)", "D's real / fake targets swapped", R)

# ---- ash.py ------------------------------------------------------------------------------------
A = ["tests/test_ash.py"]
add("noise-elementwise-off", "ash.py", "    return feat * (1 + v)\n", "    return feat\n",
    "the element-wise noise does nothing", A)
add("bn-affine-trained", "ash.py", "    for p in params:\n        p.requires_grad_(False)\n    return params",
    "    return params", "BN affine parameters trained (CLAN freezes them)", A)
add("line9-updates-running-stats", "ash.py",
    "        for m, saved in zip(self.layers, self.saved):\n            for k, v in saved.items():\n                setattr(m, k, v)",
    "        pass", "Algorithm 1 line 9 leaves its batch statistics in G's running statistics", A)
add("default-noise-rotation", "ash.py", 'DEFAULT_NOISE = "elementwise"', 'DEFAULT_NOISE = "rotation"',
    "the default noise silently changes reading", A)

# ---- segment.py --------------------------------------------------------------------------------
S = ["tests/test_segment.py"]
add("teacher-frozen", "segment.py", "            t.lerp_(s.detach(), 1.0 - decay)  # Robusta F.1: teacher = EMA of the student\n",
    "            pass\n", "the mean teacher never follows the student", S)
add("teacher-buffers-not-copied", "segment.py", "        for t, s in zip(self.teacher.buffers(), student.buffers()):\n            t.copy_(s)\n",
    "", "the teacher's BN buffers are never copied", S)
add("pseudo-loss-mean-over-confident", "segment.py", "    return ce / pseudo.numel()\n",
    "    return ce / (pseudo != data.IGNORE_INDEX).sum()\n",
    "pseudo-label loss averaged over confident pixels only (NaN when none)", S)

def tracked_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return [ROOT / line for line in out.stdout.splitlines()]
    return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts and "runs" not in p.parts]


def copy_repo(dest):
    for path in tracked_files():
        if not path.exists():
            continue
        target = Path(dest) / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def run_tests(workdir, tests, timeout):
    """Returns (status, seconds): status 'pass', 'fail' or 'timeout'."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start
    return ("pass" if proc.returncode == 0 else "fail"), time.time() - start


def mutate(workdir, m):
    """Applies the mutant in `workdir`; returns None on success or 'stale' / 'broken'."""
    path = Path(workdir) / m["file"]
    text = path.read_text()
    if text.count(m["old"]) != 1:
        return "stale"
    text = text.replace(m["old"], m["new"])
    try:
        compile(text, str(path), "exec")
    except SyntaxError:
        return "broken"
    path.write_text(text)
    return None


def run_mutant(m, timeout):
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        copy_repo(tmp)
        problem = mutate(tmp, m)
        if problem:
            return dict(m, result=problem, seconds=0.0)
        status, seconds = run_tests(tmp, m["tests"], timeout)
        return dict(m, result="survived" if status == "pass" else "caught", seconds=round(seconds, 1))


def baseline(mutants, timeout):
    """Runs every test selection once on the unmutated code; returns the failing ones."""
    selections = sorted({tuple(m["tests"]) for m in mutants})
    failing = []
    with tempfile.TemporaryDirectory(prefix="mutant-base-") as tmp:
        copy_repo(tmp)
        for tests in selections:
            status, _ = run_tests(tmp, list(tests), timeout)
            if status != "pass":
                failing.append(" ".join(tests))
    return failing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated mutant ids")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--json", default="", help="write the results to this file")
    p.add_argument("--timeout", type=float, default=600, help="seconds per test run (a timeout counts as caught)")
    p.add_argument("--jobs", type=int, default=2, help="mutants run at once")
    p.add_argument("--threshold", type=float, default=0.9, help="fraction of live mutants that must be caught")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = p.parse_args(argv)

    ids = {m["id"] for m in MUTANTS}
    assert len(ids) == len(MUTANTS), "duplicate mutant ids"
    chosen = MUTANTS
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in ids]
        if unknown:
            print(f"error: unknown mutant ids {unknown}", file=sys.stderr)
            return 2
        chosen = [m for m in MUTANTS if m["id"] in wanted]
    if args.list:
        for m in chosen:
            print(f"{m['id']:32s} {m['file']:11s} {m['why']}  [{' '.join(m['tests'])}]")
        print(f"{len(chosen)} mutants")
        return 0
    if not args.no_baseline:
        failing = baseline(chosen, args.timeout)
        if failing:
            print("error: the unmutated code fails: " + "; ".join(failing), file=sys.stderr)
            return 1
    start = time.time()
    results = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for r in pool.map(lambda m: run_mutant(m, args.timeout), chosen):
            results.append(r)
            print(f"{r['result']:8s} {r['id']:32s} {r['seconds']:6.1f}s  {r['why']}", flush=True)
    counts = {k: sum(r["result"] == k for r in results) for k in ("caught", "survived", "stale", "broken")}
    live = counts["caught"] + counts["survived"]
    rate = counts["caught"] / live if live else 0.0
    print(f"\n{counts['caught']}/{live} live mutants caught ({100 * rate:.0f}%); "
          f"{counts['stale']} stale, {counts['broken']} broken; {time.time() - start:.0f} s")
    for r in results:
        if r["result"] != "caught":
            print(f"  {r['result']}: {r['id']} ({r['file']}): {r['why']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(counts=counts, rate=rate, results=results), indent=1))
    return 0 if rate >= args.threshold and not counts["stale"] and not counts["broken"] else 1


if __name__ == "__main__":
    sys.exit(main())
