"""What the entry points (train.py, sample.py, repeat.py, sweep.py) share on the command line.

One error type for bad input: `InputError` (a flag, a flag combination, a data set, a checkpoint or a device
that cannot work). It is raised before any work starts where possible, and every entry point prints it as one
line, `prog: error: <what was wrong and what to do>`, and exits with status 2, as argparse does for a bad flag.
`TrainingError` is the other failure: training that cannot go on (a persistently non-finite loss).
It imports nothing from the project, so every file may use it.
"""
import argparse
import contextlib
import sys


class InputError(ValueError):
    """Bad input (flags, files, data, checkpoint, device): printed as one line by the entry points, exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error form: a bad flag is one line, `prog: error: message (see prog --help)`,
    exit status 2, instead of argparse's usage block before the message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a persistently non-finite loss); printed as one line, exit 2."""


@contextlib.contextmanager
def one_line_errors(prog, cleanup=None):
    """Turn InputError / TrainingError into `prog: error: message` on stderr and exit status 2.

    cleanup(), if given, runs first on any failure (also a crash or Ctrl-C), e.g. to remove a folder the
    failed run created.
    """
    try:
        yield
    except (InputError, TrainingError) as e:
        if cleanup is not None:
            cleanup()
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except BaseException:
        if cleanup is not None:
            cleanup()
        raise


def parse_ints(text, flag, kind=int):
    """'1,2,2' -> (1, 2, 2); raises InputError naming the flag."""
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{flag} {text!r} is not a comma-separated list of numbers, e.g. 1,2,2") from None


def parse_lambdas(text, num_classes=None):
    """'30,30' -> [30.0, 30.0], the guidance weights λ_m of one classifier; raises InputError."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--lambdas {text!r} is not a comma-separated list of numbers, e.g. --lambdas 30,30") \
            from None
    if any(v != v or abs(v) == float("inf") for v in values):
        raise InputError(f"--lambdas {text!r} has a NaN or infinite value; give finite numbers, e.g. 30,30")
    if num_classes is not None and len(values) != num_classes:
        raise InputError(f"--lambdas {text!r} has {len(values)} value(s) but the classifier has {num_classes} "
                         f"classes; give one weight per class, e.g. --lambdas {','.join(['30'] * num_classes)}")
    return values


def format_time(seconds):
    """4000 -> '1h06m', 75 -> '1m15s' (progress lines: elapsed, ETA)."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
