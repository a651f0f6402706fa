"""Reference generators (installed as ``graphopt.models``): inputs to graphopt like any user model."""
