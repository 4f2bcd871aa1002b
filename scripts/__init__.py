"""Scripts that loop over runs or measure them, each run as `python -m scripts.NAME` from the repository root:
repeat (classifier seeds), sweep (λ grid, Fig. S13), target_sweep (target levels), bench (speed), gpu_check (a GPU
user's first ten minutes)."""
