"""opd: on-policy distillation of language models (G-OPD / ExOPD, TrOPD and their baselines)."""

__version__ = "0.1.0"
