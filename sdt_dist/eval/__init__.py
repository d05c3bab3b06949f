"""Evaluation of SelfDistil-T runs: perplexity, calibration, pruning degradation, compute (`sdt-eval`),
and ablation sweeps aggregated into the paper's tables (`sdt-sweep`)."""
