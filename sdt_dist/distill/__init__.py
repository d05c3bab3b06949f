"""SelfDistil-T's method, one concept per file:

  teacher.py      the EMA teacher (sharded like ZeRO, updated in place)
  predictor.py    the alignment predictors q_l
  losses.py       LM, KD and alignment losses, and their weighted sum
  fused_lm_kd.py  LM + KD in one pass over the logits (the single-program path)
  layerdrop.py    which layers the student skips this micro-batch
  freezing.py     which parameters progressive freezing takes out
  schedules.py    learning rate, tau, kappa(t) and freezing milestones as pure functions of the step

Nothing here knows how it is run (parallel/, the trainer): docs/architecture.md.
"""
