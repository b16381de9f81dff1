"""The project's own contract: layout, dependencies, the README's commands, CI."""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_DEPS = {"torch", "torchvision", "numpy", "pillow", "pytest"}
MODULES = ["data.py", "metrics.py", "segment.py", "robusta.py", "ash.py"]
IMPORT_NAMES = {"torch", "torchvision", "numpy", "PIL", "pytest"} | {m[:-3] for m in MODULES}


def test_requirements_are_lower_bounds_of_the_allowed_packages():
    lines = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    names = {re.split(r"[<>=!~ \[]", l)[0].lower() for l in lines}
    assert names == ALLOWED_DEPS
    assert all(">=" in l and "==" not in l for l in lines)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    head = (ROOT / "README.md").read_text()[:2000]
    demo = "pip install -r requirements.txt && python robusta.py"
    tests = "pip install -r requirements.txt && python -m pytest -q"
    assert demo in head and tests in head
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_modules_import_only_allowed_packages():
    for name in MODULES + [p.name for p in (ROOT / "tests").glob("*.py")]:
        path = ROOT / name if (ROOT / name).exists() else ROOT / "tests" / name
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                assert top in IMPORT_NAMES | set(sys.stdlib_module_names), f"{path.name} imports {top}"


def test_layout_is_flat():
    top_py = {p.name for p in ROOT.glob("*.py")}
    assert top_py <= set(MODULES), top_py - set(MODULES)
    assert not any((d / "__init__.py").exists() for d in ROOT.iterdir() if d.is_dir() and d.name != "tests")
