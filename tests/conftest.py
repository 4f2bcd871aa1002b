"""Test-session settings. `make test` runs the suite on pytest-xdist workers (`-n auto`: one per core, 2 on CI),
one file per worker at a time (`--dist loadfile`, so module fixtures such as test_cli's tiny run are built once).
Each worker, and the train.py/sample.py processes its tests start, then uses one torch thread: two workers with two
threads each would oversubscribe the cores."""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
