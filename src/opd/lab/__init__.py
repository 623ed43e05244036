"""`opd lab`: the papers' findings reproduced with tiny models on a CPU (see docs/lab.md)."""
