"""The codebase's shape: imports flow one way (no cycle, none inside a function), the entry points stay short, and
the tracked files hold no lab-notebook chronology or references to files outside the repository."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each file may import only files of lower layers: the paper's math at the bottom, entry points and orchestration
# on top. A new file must be placed here.
LAYERS = [
    {"cli"},                                                     # the one error type, flag parsers
    {"augment", "morpho", "images"},                             # zoom-crop under data.Batches; stroke thickness;
                                                                 # image files decoded as a viewer shows them
    {"mnist"},                                                   # the digits and their thickness split, under data
    {"data", "ddpm", "unet", "device", "cpu_preset", "guidance", "inception"},
    {"dit", "classifier"},                                       # build on unet.py's blocks
    {"checkpoint"},
    {"evaluate"},
    {"generate", "evaluator", "quality"},
    {"inversion", "config", "mnist_eval", "target"},             # mnist_eval: the digits experiment's report
    {"train", "sample"},
    {"sweep", "repeat", "bench", "target_sweep"},
    {"gpu_check"},                                               # runs bench.py, train.py, sample.py, pytest
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def project_files():
    return sorted(p for p in ROOT.glob("*.py"))


def imports(path):
    """[(module, inside_a_function)] of the project modules a file imports."""
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        out += [(n, id(node) in nested) for n in names if n in LAYER or (ROOT / f"{n}.py").exists()]
    return out


def test_every_file_has_a_layer_and_imports_only_lower_layers():
    files = {p.stem for p in project_files()}
    assert files == set(LAYER), f"place new files in LAYERS / drop removed ones: {files ^ set(LAYER)}"
    upward = [(p.stem, m) for p in project_files() for m, _ in imports(p) if LAYER[m] >= LAYER[p.stem]]
    assert upward == [], f"imports that go sideways or up (a cycle in the making): {upward}"


def test_no_project_import_inside_a_function():
    nested = [(p.stem, m) for p in project_files() for m, inside in imports(p) if inside]
    assert nested == []


def test_the_layer_check_sees_cycles_and_nested_imports(tmp_path):
    """The two checks above on a planted file: an upward import at the top and one inside a function."""
    planted = tmp_path / "ddpm.py"
    planted.write_text("import sample\n\ndef f():\n    from train import main\n")
    assert imports(planted) == [("sample", False), ("train", True)]
    assert all(LAYER[m] > LAYER["ddpm"] for m, _ in imports(planted))


@pytest.mark.parametrize("name,limit", [("train.py", 450), ("sample.py", 300)])
def test_entry_points_stay_short(name, limit):
    assert len((ROOT / name).read_text().splitlines()) <= limit


def test_no_file_over_500_lines():
    long = {p.name: n for p in [*project_files(), *ROOT.glob("tests/*.py")]
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def tracked_files():
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / n for n in names.splitlines() if (ROOT / n).is_file()]


def test_tracked_files_hold_no_chronology_or_outside_references():
    # the patterns are assembled so that this file does not match itself
    pattern = re.compile("|".join(["ses" + r"sion [0-9]", "EXPERIMENTS" + r"\.md", "/" + "tmp/"]), re.IGNORECASE)
    hits = []
    for path in tracked_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_readme_file_table_gives_each_files_line_count():
    """README's "What is where" rows (`| [file](file), [file](file) | n, n | what |`) count the lines each file has."""
    rows = re.findall(r"^\| ((?:\[`\w+\.py`\]\(\w+\.py\)(?:, )?)+) \| ([\d, ]+) \|", (ROOT / "README.md").read_text(),
                      re.M)
    assert len(rows) >= 15
    for files, counts in rows:
        names = re.findall(r"\[`(\w+\.py)`\]", files)
        got = [len((ROOT / n).read_text().splitlines()) for n in names]
        assert [int(c) for c in counts.split(",")] == got, f"README: {names} have {got} lines"
