"""scripts/gpu_check.py in its reduced CPU form: each stage's figures in the report are the ones its command wrote, and a
failing stage is reported and fails the command (what `make gpu-check` does on a GPU, at a size a CPU runs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(*args):
    return subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--device", "cpu", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_the_test_stage_counts_passes_failures_and_skips_and_fails_the_command(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text("import pytest\n\ndef test_ok():\n    assert 1 + 1 == 2\n\n"
                       "def test_wrong():\n    assert 1 + 1 == 3\n\n"
                       "@pytest.mark.skip(reason='planted')\ndef test_skipped():\n    pass\n")
    proc = gpu_check("--stages", "tests", "--tests", planted, "--out", tmp_path / "out")
    assert proc.returncode == 1 and "FAILED: tests" in proc.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    tests = report["stages"]["tests"]
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 1, 1) and tests["status"] == 1
    [failure] = tests["failures"]                     # junit's classname depends on pytest's rootdir: its tail
    assert failure.endswith("test_planted::test_wrong")
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "1 passed, 1 failed, 1 skipped" in md and f"`{failure}`" in md and "reduced CPU form" in md


def test_a_test_stage_that_times_out_reports_the_tests_it_finished(tmp_path):
    planted = tmp_path / "test_slow.py"
    planted.write_text("import time\n\ndef test_ok():\n    pass\n\ndef test_wrong():\n    assert False\n\n"
                       "def test_slow():\n    time.sleep(600)\n")
    proc = gpu_check("--stages", "tests", "--tests", planted, "--out", tmp_path / "out", "--stage-timeout", "10")
    assert proc.returncode == 1 and "FAILED (timeout)" in proc.stdout
    tests = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"]["tests"]
    assert tests["status"] == "timeout" and (tests["passed"], tests["failed"]) == (1, 1)
    assert [f.split("::")[-1] for f in tests["failures"]] == ["test_wrong"]


def test_bench_and_circles_stages_report_what_their_commands_wrote(tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--device", "cpu", "--stages", "bench,circles",
                           "--out", "out", "--run-dir", "run"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))   # relative folders, elsewhere
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["quick"] is True and report["host"]["device"] == "cpu"
    bench = report["stages"]["bench"]
    assert [r["mode"] for r in bench["rows"]] == ["fp32", "channels_last"] and bench["status"] == 0
    assert bench["rows"] == json.loads((out / "bench.json").read_text())["rows"]
    circles = report["stages"]["circles"]
    sampled = json.loads((run / "samples" / "gpu_check" / "report.json").read_text())
    assert circles["num_samples"] == sampled["num_samples"] == 8
    assert circles["accuracy_middle"] == sampled["accuracy_middle"]
    rate = float((run / "ddpm_loss.csv").read_text().strip().splitlines()[-1].split(",")[-1])
    assert circles["ddpm_steps_per_s"] == rate
    grid = np.asarray(Image.open(out / "circles_grid.png"))
    assert np.array_equal(grid, np.asarray(Image.open(run / "samples" / "gpu_check" / "grid.png")))
    md = (out / "gpu_check.md").read_text()
    assert f"{rate:.2f} steps/s" in md and "| cpu preset 32px | 0.72M | channels_last | 2 |" in md


@pytest.mark.parametrize("flags,message", [(["--stages", "tests,fly"], "unknown ['fly']"),
                                           (["--stages", ""], "unknown ['']"),
                                           (["--stage-timeout", "-5"], "--stage-timeout")])
def test_bad_flags_are_one_line_and_nothing_runs(tmp_path, flags, message):
    proc = gpu_check(*flags, "--out", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert message in proc.stderr and not (tmp_path / "out").exists()
