"""Benchmarks (`opd bench NAME`): each variant runs in a fresh subprocess and every table reports ratios
against a baseline measured in the same run, on the same machine."""
