"""Work beyond the paper: the CPU preset and its three additions, sampling at a chosen level of the gap (target
guidance, Langevin corrector, sequential Monte Carlo), and MNIST stroke thickness as the attribute."""
