"""The codebase's shape: imports flow one way (no cycle, none inside a function), the entry points stay short, and
the tracked files hold no lab-notebook chronology or references to files outside the repository."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each file may import only files of lower layers: the paper's math at the bottom, entry points and orchestration
# on top. Modules in folders by their dotted name. A new file must be placed here.
LAYERS = [
    {"cli"},                                                     # the one error type, flag parsers
    {"appendix.augment", "beyond.morpho", "infra.images"},       # zoom-crop under data.Batches; stroke thickness;
                                                                 # image files decoded as a viewer shows them
    {"beyond.mnist"},                                            # the digits and their thickness split, under data
    {"data", "ddpm", "unet", "guidance", "infra.device", "appendix.inception", "beyond.target_guidance"},
    {"appendix.dit", "classifier", "beyond.cpu_preset"},         # build on unet.py's blocks; the preset reads data
    {"infra.checkpoint", "infra.generate"},
    {"evaluate"},
    {"appendix.evaluator", "appendix.quality", "appendix.extrapolation"},
    {"appendix.inversion", "config", "beyond.mnist_eval", "beyond.target"},
    {"sample_flags"},
    {"train", "sample"},
    {"scripts.sweep", "scripts.repeat", "scripts.bench", "scripts.target_sweep"},
    {"scripts.gpu_check"},                                       # runs bench, train.py, sample.py, pytest
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
FOLDERS = ("infra", "appendix", "beyond", "scripts")
DESIGN_CARD = {"ddpm", "unet", "classifier", "guidance", "data", "evaluate", "train", "sample"}


def module_name(path):
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def project_files():
    return sorted([*ROOT.glob("*.py"), *(p for f in FOLDERS for p in (ROOT / f).glob("*.py")
                                         if p.name != "__init__.py")])


def imports(path):
    """[(module, inside_a_function)] of the project modules a file imports (dotted names for the folders')."""
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if node.module in FOLDERS else node.module for a in node.names]
        else:
            continue
        out += [(n, id(node) in nested) for n in names
                if n in LAYER or (ROOT / f"{n.replace('.', '/')}.py").exists() or n.split(".")[0] in FOLDERS]
    return out


def test_the_top_level_holds_the_design_card_and_at_most_five_others():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert DESIGN_CARD <= top and len(top - DESIGN_CARD) <= 5, sorted(top - DESIGN_CARD)
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(FOLDERS)


def test_the_papers_files_hold_none_of_the_beyond_the_paper_samplers():
    """ddpm.py and guidance.py define no Langevin corrector, no SMC resampling and no target-level guidance: no
    function, method or argument of theirs is named for them (beyond/target_guidance.py holds them)."""
    words = ("langevin", "smc", "resampl", "corrector", "target", "potential", "shift")
    for name in ("ddpm.py", "guidance.py"):
        tree = ast.parse((ROOT / name).read_text())
        defined = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        defined += [a.arg for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) for a in n.args.args]
        assert [d for d in defined if any(w in d.lower() for w in words)] == [], name


def test_every_file_has_a_layer_and_imports_only_lower_layers():
    files = {module_name(p) for p in project_files()}
    assert files == set(LAYER), f"place new files in LAYERS / drop removed ones: {files ^ set(LAYER)}"
    upward = [(module_name(p), m) for p in project_files() for m, _ in imports(p) if LAYER[m] >= LAYER[module_name(p)]]
    assert upward == [], f"imports that go sideways or up (a cycle in the making): {upward}"


def test_no_project_import_inside_a_function():
    nested = [(module_name(p), m) for p in project_files() for m, inside in imports(p) if inside]
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


def test_the_file_table_lists_every_file_with_its_line_count():
    """docs/code.md's rows (`| [`f`](../f), [`g`](../g) | n, m | what |`) name every project file once and count the
    lines each has."""
    rows = re.findall(r"^\| ((?:\[`[\w/]+\.py`\]\(\.\./[\w/]+\.py\)(?:, )?)+) \| ([\d, ]+) \|",
                      (ROOT / "docs" / "code.md").read_text(), re.M)
    listed = []
    for files, counts in rows:
        names = re.findall(r"\[`([\w/]+\.py)`\]", files)
        got = [len((ROOT / n).read_text().splitlines()) for n in names]
        assert [int(c) for c in counts.split(",")] == got, f"docs/code.md: {names} have {got} lines"
        listed += names
    assert sorted(listed) == sorted(str(p.relative_to(ROOT)) for p in project_files())
