"""What the entry points (train.py, sample.py, scripts/repeat.py, scripts/sweep.py) share on the command line.

One error type for bad input: `InputError` (a flag, a flag combination, a data set, a checkpoint or a device
that cannot work). It is raised before any work starts where possible, and every entry point prints it as one
line, `prog: error: <what was wrong and what to do>`, and exits with status 2, as argparse does for a bad flag.
`TrainingError` is the other failure: training that cannot go on (a persistently non-finite loss); `SamplingError`
its sampling twin (samples that are not finite numbers, never written as images).
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


class SamplingError(RuntimeError):
    """Sampling diverged: samples that are NaN or infinite (data.to_uint8 refuses them); printed as one line, exit 2."""


FLOAT32_MAX = 3.4028234663852886e38   # the networks and samplers compute in float32 (or less): larger is inf there
GUIDANCE_MAX = 1e6   # |weight| of any guidance (λ, CFG, target scale); the paper's λ are at most 100. Beyond it
# the guided x_t can leave float32's range (seen: λ = 1e20 on a tiny run turned DDIM samples into NaN)
SEED_MAX = 2 ** 32 - 1


def finite_float(text):
    """argparse type of every float flag: a number whose float32 value is finite (no NaN, inf, or |x| > 3.4e38,
    which parses in Python's float64 but is inf in the float32 arithmetic of the networks and samplers)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not abs(value) <= FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"{text} is not a finite float32 number (|x| <= 3.4e+38, no NaN or inf)")
    return value


def check_ranges(args, ranges):
    """Each (flag, interval, why) of `ranges`: args.<flag> (None: not given) must lie in the interval, written as
    "[a, b]", "(a, b]", ... (a bracket: the end is included); InputError naming the flag, its range and why."""
    for flag, interval, why in ranges:
        value = getattr(args, flag[2:].replace("-", "_"))
        low, high = (float(v) for v in interval[1:-1].split(","))
        if value is not None and not ((low <= value if interval[0] == "[" else low < value) and
                                      (value <= high if interval[-1] == "]" else value < high)):
            raise InputError(f"{flag} must be in {interval}{why}, got {value}")


def parse_given(parser, argv=None):
    """parser.parse_args(argv) with `given` added: the set of flags (dests) on the command line, however spelt
    (abbreviated, --flag=value), told from defaults by parsing again with every default suppressed."""
    args = parser.parse_args(argv)
    defaults = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        args.given = set(vars(parser.parse_args(argv)))
    finally:                                         # the parser stays usable
        for action, default in defaults:
            action.default = default
    return args


def check_unused(args, rules):
    """Each (flags, applies, what it needs) of `rules`: a flag given (parse_given) while `applies` is False would do
    nothing; InputError naming it. Flags are dests ("guide_t_min")."""
    for flags, applies, needs in rules:
        given = [f for f in flags.split() if f in getattr(args, "given", ())]
        if given and not applies:
            raise InputError(f"--{given[0].replace('_', '-')} does nothing here: {needs}")


@contextlib.contextmanager
def one_line_errors(prog, cleanup=None):
    """Turn InputError / TrainingError / SamplingError into `prog: error: message` on stderr and exit status 2.

    cleanup(), if given, runs first on any failure (also a crash or Ctrl-C), e.g. to remove a folder the
    failed run created.
    """
    try:
        yield
    except (InputError, TrainingError, SamplingError) as e:
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
    if any(abs(v) > GUIDANCE_MAX for v in values):
        raise InputError(f"--lambdas {text!r}: each weight must be in [-{GUIDANCE_MAX:g}, {GUIDANCE_MAX:g}], where "
                         f"guided samples stay finite float32 numbers (the paper uses up to 100)")
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
