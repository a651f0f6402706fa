"""The graphopt package itself: its public names, and what importing it costs."""

import subprocess
import sys
import types

import pytest

import graphopt


def test_every_public_name_resolves_to_what_it_names_not_to_a_module():
    import graphopt.distill  # noqa: F401 - importing a submodule must not rebind a public name of the same name

    for name in graphopt.__all__:
        assert not isinstance(getattr(graphopt, name), types.ModuleType), name
    assert set(graphopt.__all__) <= set(dir(graphopt))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'graphopt' has no attribute 'optimise'"):
        graphopt.optimise  # noqa: B018


def test_importing_graphopt_leaves_the_heavy_stacks_for_first_use():
    # a process that loads and calls a saved model, or a CLI start, needs none of these (sympy alone is
    # about 0.5 s, networkx 0.2 s); the names that need them import them on first use, and subpackages
    # resolve as attributes
    code = ("import sys, graphopt, graphopt.cli\n"
            "heavy = ('sympy', 'onnx', 'onnxscript', 'networkx', 'graphopt.autodiffusion')\n"
            "heavy = [m for m in heavy if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert graphopt.models.load and graphopt.passes.REGISTRY and graphopt.SamplingPlan\n"
            "assert 'sympy' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_graphopt_autotune_names_its_parts_on_first_use():
    import graphopt.autotune as autotune

    for name in autotune.__all__:
        assert not isinstance(getattr(autotune, name), types.ModuleType), name
    assert isinstance(autotune.kernels, types.ModuleType)  # submodules resolve as attributes
    with pytest.raises(AttributeError, match="module 'graphopt.autotune' has no attribute 'tuning'"):
        autotune.tuning  # noqa: B018
    # a GPU load served by stored forwards needs neither the lowering nor sympy
    code = ("import sys, graphopt.autotune.stored\n"
            "assert 'sympy' not in sys.modules and 'graphopt.autotune.lower' not in sys.modules\n"
            "import graphopt.autotune\n"
            "assert graphopt.autotune.TuningOptions and 'graphopt.autotune.lower' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
