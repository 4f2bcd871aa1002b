"""What runs the paper's method without being part of it: checkpoints (atomic saves, run configs), the device and
mixed precision, seeded batched sampling over torchrun processes, and image files decoded as a viewer shows them."""
