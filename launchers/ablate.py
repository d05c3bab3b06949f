"""Ablation sweeps: train named variants x seeds from one YAML, evaluate them, aggregate the paper's tables.

  python launchers/ablate.py launchers/configs/sweeps/paper.yaml --tables table1
  python launchers/ablate.py launchers/configs/sweeps/paper.yaml --dry-run

Same as the `sdt-sweep` console script; see sdt_dist/eval/sweep.py and docs/evaluation.md.
"""

from sdt_dist.eval.sweep import main

if __name__ == "__main__":
    main()
