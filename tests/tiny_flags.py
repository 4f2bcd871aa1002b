"""The suite's tiny sizes reach train.py only where its --what uses them.

config.check_run refuses a flag that would do nothing (a DDPM flag with `--what classifier`, a classifier flag with
`--what ddpm`, `--eval-width` without an evaluation classifier). The tests share one list of tiny flags for every
kind of run; `for_what` drops, from a train.py command line, those of the shared flags (`SHARED`) that its --what
does not use, and leaves every other flag as the test wrote it (so a test that passes an unused flag on purpose
still sees it refused).
"""
from config import CLASSIFIER_FLAGS, DDPM_FLAGS

SHARED = {"image_size", "model_channels", "classifier_width", "eval_width", "eval_steps", "sample_steps",
          "eval_samples", "amp", "steps", "batch_size", "classifier_steps", "classifier_batch_size"}


def for_what(argv):
    """argv (strings or paths) without the SHARED flags (and their values) that its --what (default all) and --data
    (default circles) do not use."""
    argv = [str(a) for a in argv]
    value = lambda flag, default: argv[len(argv) - 1 - argv[::-1].index(flag) + 1] if flag in argv else default
    what, data = value("--what", "all"), value("--data", "circles")
    unused = set()
    if what not in ("all", "ddpm"):
        unused |= set(DDPM_FLAGS.split())
    if what not in ("all", "classifier"):
        unused |= set(CLASSIFIER_FLAGS.split())
    if not (what in ("evaluator", "filter") or what == "all" and data == "mnist"):
        unused |= {"eval_steps", "eval_width"}
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        dest = a[2:].replace("-", "_").removeprefix("no_") if a.startswith("--") else None
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if dest in unused & SHARED:
            i += 2 if takes_value and not a.startswith("--no-") and dest != "amp" else 1
            continue
        out.append(a)
        i += 1
    return out
