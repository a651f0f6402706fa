"""Kernels and the autotuner (installed as ``graphopt.autotune``)."""
