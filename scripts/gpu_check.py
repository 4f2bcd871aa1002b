"""A GPU user's first ten minutes in one command: `make gpu-check` (= `python -m scripts.gpu_check`), one report
(gpu_check.md and .json in --out). On one H200 the stages but compile took about 6 minutes together (measured
one by one; the compile stage, limited to 4, has not been timed on a GPU). Nothing here is in the paper; it checks that the paper's
runs (App. C hyperparameters, `--preset paper`) work and how fast they go on the user's card.

Stages, each a subprocess with a time limit; the report is rewritten after each, so a stage that hangs or crashes
leaves the others' results:
  tests    the tests that run the networks on the default device (CUDA_TESTS, pytest -n auto): on a GPU host
           train.py / sample.py then run with `--device auto`, i.e. on CUDA with fp16 AMP, and
           tests/test_cuda.py compares CUDA with the CPU. (`make test` runs all of them, about 7 min there.)
  bench    scripts/bench.py on the paper's 121M U-Net at batch 64: fp32, fp16 AMP, bf16 AMP, AMP + channels_last,
           bf16 + channels_last, and AMP with SDPA's unfused attention; GFLOP/s against the card's measured
           fp16 matrix-product rate.
  compile  the same for AMP + channels_last + torch.compile, beside the eager AMP + channels_last (its own
           stage: compiling the 121M U-Net takes minutes, and a time-out must not lose the bench's rows).
  profile  where a training step's and a guided sampling step's time goes (scripts/bench.py --profile): device busy
           time against wall time, split into convolutions, matmuls, attention, normalisation, optimizer, ...
  circles  a short paper-preset circles run (train.py --preset paper with few steps, then sample.py
           --lambdas 30,30): step rates, the projected time of the full run, the samples' grid and figures.
Without a GPU the same stages run in a reduced form on the CPU (`--quick`: one small test file, the CPU-preset
bench at batch 2, the profile, a 16-px circles run; no compile stage), which tests/test_gpu_check.py runs.
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from scripts.bench import HEADER, format_row
from infra.checkpoint import write_json
from cli import ArgumentParser, InputError, format_time, one_line_errors
from infra.device import amp_default, host_info, resolve_device

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("tests", "bench", "compile", "profile", "circles")
GPU_MODES = "fp32,amp,bf16,amp+channels_last,bf16+channels_last,amp+sdpa_math"
# the tests that run the networks on the default device (CUDA on a GPU host), ~2 min on one H200 with 16 cores;
# the whole suite there (`make test`) takes about 7 min
CUDA_TESTS = "tests/test_cuda.py,tests/test_cli.py,tests/test_device.py,tests/test_training.py,tests/test_ddim.py"
COMPILE_MODES = "amp+channels_last,amp+channels_last+compile"   # compiled and eager, timed in the same run
# (train.py flags, DDPM steps, classifier steps, samples) of the circles stage
FULL_RUN = (["--preset", "paper"], 200, 200, 256)
QUICK_RUN = (["--image-size", "16", "--model-channels", "8", "--classifier-width", "8", "--sample-steps", "4",
              "--eval-samples", "4", "--log-every", "2", "--ckpt-every", "2"], 6, 4, 8)


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m scripts.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (the reduced form runs on a CPU)")
    p.add_argument("--quick", action="store_true", help="the reduced form (default where no GPU is visible)")
    p.add_argument("--out", default="gpu_check", help="folder of the report (gpu_check.md, .json, logs)")
    p.add_argument("--run-dir", default=None, help="folder of the circles run (default <out>/circles_run)")
    p.add_argument("--tests", default=None, help="comma-separated test paths (default: the files that run the "
                   "networks on the default device, see CUDA_TESTS; --quick: tests/test_ddpm_small.py)")
    p.add_argument("--stage-timeout", type=int, default=None, help="seconds each stage may run (default: "
                   "tests 180, bench 150, compile 240, profile 90, circles 180 per command)")
    p.add_argument("--stages", default=None, help="comma-separated stages, run in the order given (default: all; "
                                                  "--quick: all but compile, which on a CPU takes many minutes)")
    return p.parse_args(argv)


def run_stage(name, argv, timeout, log):
    """Run one stage's command; (exit status or 'timeout', seconds). Its output is appended to `log`."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n===== {name}: {' '.join(map(str, argv))}\n")
        f.flush()
        try:
            rc = subprocess.run(list(map(str, argv)), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    print(f"[{name}] {'ok' if rc == 0 else f'FAILED ({rc})'} in {format_time(time.time() - t0)}", flush=True)
    return rc, round(time.time() - t0, 1)


def junit_counts(path):
    """{passed, failed, skipped, failures: [test ids]} from pytest's --junitxml file."""
    cases = ET.parse(path).getroot().iter("testcase")
    counts, failures = dict(passed=0, failed=0, skipped=0), []
    for case in cases:
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            counts["failed"] += 1
            failures.append(f"{case.get('classname')}::{case.get('name')}")
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return dict(counts, failures=failures)


def log_counts(log_text):
    """The same counts from pytest -v lines ("tests/x.py::name PASSED", or with xdist "[gw3] FAILED tests/x.py::
    name"): what a stage that timed out had finished (its junit file is written only at the end)."""
    outcome, kinds = {}, "(PASSED|FAILED|SKIPPED|ERROR)"
    for line in log_text.splitlines():
        m = (re.match(rf"^\[gw\d+\] \[ *\d+%\] {kinds} (\S.*?)\s*$", line)
             or re.match(rf"^(\S+::.*?) {kinds}(?: +\[ *\d+%\])?\s*$", line))
        if m:
            kind, name = m.groups() if m[1] in ("PASSED", "FAILED", "SKIPPED", "ERROR") else m.groups()[::-1]
            outcome[name] = kind
    counts = dict(passed=0, failed=0, skipped=0)
    for kind in outcome.values():
        counts[{"PASSED": "passed", "SKIPPED": "skipped"}.get(kind, "failed")] += 1
    return dict(counts, failures=[n for n, k in outcome.items() if k in ("FAILED", "ERROR")])


def last_rate(loss_csv):
    """Steps per second at the end of a training run: the last column of the last row of <name>_loss.csv."""
    rows = list(csv.reader(open(loss_csv)))
    return float(rows[-1][-1])


def stage_commands(args, device, work):
    """name -> (argv, timeout in s, what to read afterwards) of each stage."""
    py, quick = sys.executable, args.quick
    tests = (args.tests or ("tests/test_ddpm_small.py" if quick else CUDA_TESTS)).split(",")
    workers = ["-p", "no:xdist"] if quick else ["-n", "auto", "--dist", "load"]
    bench = [py, "-m", "scripts.bench", "--device", device, "--repeats", "1" if quick else "6"]
    bench += (["--skip-paper", "--cpu-batch", "2", "--warmup", "0"] if quick else
              ["--skip-cpu-preset", "--paper-batch", "64", "--warmup", "2"])
    modes = ("fp32,channels_last", "fp32,compile") if quick else (GPU_MODES, COMPILE_MODES)
    profile = [py, "-m", "scripts.bench", "--device", device, "--profile", "--repeats", "3"]
    profile += (["--skip-paper", "--cpu-batch", "2", "--modes", "fp32"] if quick else
                ["--skip-cpu-preset", "--paper-batch", "64", "--modes", "amp"])
    flags, steps, clf_steps, n = QUICK_RUN if quick else FULL_RUN
    run = Path(args.run_dir or work / "circles_run")
    train = [py, "train.py", "--data", "circles", *flags, "--device", device, "--steps", steps,
             "--classifier-steps", clf_steps, "--out", run, "--overwrite"]
    sample = [py, "sample.py", "--run", run, "--lambdas", "30,30", "--num-samples", n, "--device", device,
              "--name", "gpu_check", "--overwrite"]
    limits = dict(tests=180, bench=150, compile=240, profile=90, circles=180)
    limits.update(dict.fromkeys(limits, args.stage_timeout) if args.stage_timeout else {})
    return dict(tests=([py, "-m", "pytest", "-v", *workers, *tests, f"--junitxml={work / 'junit.xml'}"], limits["tests"]),
                bench=(bench + ["--modes", modes[0], "--json", work / "bench.json"], limits["bench"]),
                compile=(bench + ["--modes", modes[1], "--json", work / "compile.json"], limits["compile"]),
                profile=(profile + ["--json", work / "profile.json"], limits["profile"]),
                circles=((train, sample, run, steps), limits["circles"]))


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors("python -m scripts.gpu_check"):
        device = resolve_device(args.device)
        args.quick = args.quick or device.type != "cuda"
        stages = (",".join(s for s in STAGES if not (args.quick and s == "compile")) if args.stages is None
                  else args.stages).split(",")
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise InputError(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
        if args.stage_timeout is not None and args.stage_timeout < 1:
            raise InputError(f"--stage-timeout is seconds per stage, >= 1; got {args.stage_timeout}")
        out = Path(args.out).resolve()          # the stages run in the repository's folder
        args.run_dir = args.run_dir and str(Path(args.run_dir).resolve())
        out.mkdir(parents=True, exist_ok=True)
        check(args, str(device), out, stages)


def check(args, device, out, stages):
    log = out / "gpu_check.log"
    log.write_text("")
    commands = stage_commands(args, device, out)
    report = dict(host=host_info(device, amp=amp_default(device)), quick=args.quick, stages={})
    t_start = time.time()
    for name in stages:
        (cmd, timeout) = commands[name]
        if name == "circles":
            train, sample, run, steps = cmd
            rc, secs = run_stage("circles: train", train, timeout, log)
            result = dict(status=rc, seconds=secs)
            if rc == 0:
                result["ddpm_steps_per_s"] = last_rate(run / "ddpm_loss.csv")
                result["projected_30k_steps"] = format_time(30_000 / result["ddpm_steps_per_s"])
                rc, s_secs = run_stage("circles: sample", sample, timeout, log)
                result.update(status=rc, sample_seconds=s_secs)
                folder = run / "samples" / "gpu_check"
                if rc == 0:
                    sampled = json.loads((folder / "report.json").read_text())
                    result.update({k: sampled[k] for k in ("num_samples", "steps", "accuracy_middle",
                                                           "zero_or_multi") if k in sampled})
                    shutil.copy(folder / "grid.png", out / "circles_grid.png")
        else:
            rc, secs = run_stage(name, cmd, timeout, log)
            result = dict(status=rc, seconds=secs)
            if name == "tests":
                junit = out / "junit.xml"
                result.update(junit_counts(junit) if rc != "timeout" and junit.exists() else
                              log_counts(log.read_text().rsplit("===== tests:", 1)[-1]))
            if name in ("bench", "compile", "profile") and rc == 0:
                result.update(json.loads((out / f"{name}.json").read_text()))
        report["stages"][name] = result
        report["seconds"] = round(time.time() - t_start, 1)
        write_json(report, out / "gpu_check.json")
        (out / "gpu_check.md").write_text(markdown(report))
    failed = [n for n, r in report["stages"].items() if r["status"] != 0]
    print(f"report: {out / 'gpu_check.md'}" + (f"; FAILED: {', '.join(failed)}" if failed else "; all stages ok"))
    if failed:
        sys.exit(1)


def markdown(report):
    """The report as Markdown: host, then one section per stage with its figures."""
    h, st = report["host"], report["stages"]
    lines = [f"# gpu_check{' (reduced CPU form)' if report['quick'] else ''}",
             f"host: {h.get('gpu', h['cpu'])}, torch {h['torch']}, AMP {h['amp']}, "
             f"total {format_time(report['seconds'])}", ""]
    for name, r in st.items():
        status = "ok" if r["status"] == 0 else f"FAILED ({r['status']})"
        lines += [f"## {name}: {status}, {format_time(r['seconds'])}", ""]
        if name == "tests" and "passed" in r:
            lines.append(f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped")
            lines += [f"- failed: `{f}`" for f in r["failures"]]
        if name in ("bench", "compile") and "rows" in r:
            lines += [r["where"], "", HEADER] + [format_row(row) for row in r["rows"]]
        if name == "profile" and "steps" in r:
            for step, p in r["steps"].items():
                lines.append(f"- {step} ({r['mode']}, batch {r['batch']}): {p['wall_ms']:.1f} ms wall, "
                             f"{p['busy_ms']:.1f} ms device busy ({100 * p['busy_ms'] / p['wall_ms']:.0f}%): "
                             + ", ".join(f"{k} {v:.1f} ms" for k, v in p["split_ms"].items()))
        if name == "circles" and "ddpm_steps_per_s" in r:
            lines.append(f"DDPM {r['ddpm_steps_per_s']:.2f} steps/s (30k steps: {r['projected_30k_steps']})")
            if "accuracy_middle" in r:
                lines.append(f"{r['num_samples']} samples, {r['steps']} steps: {100 * r['accuracy_middle']:.1f}% "
                             f"middle, {100 * r['zero_or_multi']:.1f}% broken (a short run: not the paper's "
                             f"figure); grid: circles_grid.png")
        lines.append("")
    lines.append("Full output: gpu_check.log")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
