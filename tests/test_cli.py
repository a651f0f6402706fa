import json
import subprocess
import sys
import textwrap

import pytest

from graphopt.cli import main

MODEL_FILE = textwrap.dedent('''
    import dataclasses
    import torch
    from torch import nn


    @dataclasses.dataclass
    class Out:
        eps: torch.Tensor


    class Block(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))

        def forward(self, x):
            return x + self.ff(self.norm(x))


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(8) for _ in range(3)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return Out(eps=x)


    class Branchy(nn.Module):
        def forward(self, x):
            if x.mean() > 0:
                return x
            return -x


    def make():
        torch.manual_seed(0)
        return Net().eval(), (torch.randn(2, 4, 8),)


    def broken():
        return Branchy().eval(), (torch.randn(2, 3),)


    def only_model():
        return Net()
''')


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "elsewhere" / "mymodel.py"
    path.parent.mkdir()
    path.write_text(MODEL_FILE)
    return path


def test_inspect_prints_the_structure(model_file, capsys):
    assert main(["inspect", f"{model_file}:make"]) == 0
    out = capsys.readouterr().out
    assert "Net:" in out and "batch [2, inf]" in out
    assert "residual" in out.lower() and "flops" in out.lower()


def test_inspect_json(model_file, capsys):
    assert main(["inspect", f"{model_file}:make", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["residual_blocks"]) == 3


def test_optimize_saves_and_export_loads_the_directory(model_file, tmp_path, capsys):
    out_dir = tmp_path / "opt"
    assert main(["optimize", f"{model_file}:make", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "noop" in printed and "eval-dropout x3" in printed and f"saved to {out_dir}" in printed
    assert (out_dir / "graphopt.json").is_file()
    assert main(["optimize", f"{model_file}:make", "--out", str(out_dir)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err

    onnx_path = tmp_path / "net.onnx"
    assert main(["export", str(out_dir), "--out", str(onnx_path)]) == 0
    printed = capsys.readouterr().out
    assert onnx_path.is_file() and "ONNX parity" in printed and "max abs err" in printed


def test_export_from_a_spec_with_chosen_passes(model_file, tmp_path, capsys):
    onnx_path = tmp_path / "raw.onnx"
    assert main(["export", f"{model_file}:make", "--out", str(onnx_path), "--passes", "none"]) == 0
    assert "outputs eps" in capsys.readouterr().out


@pytest.mark.parametrize("argv, code, message", [
    (["inspect", "no_colon_here"], 2, "is not a reference model"),
    (["inspect", "/no/such/file.py:make"], 2, "does not exist"),
    (["inspect", "no_such_package_xyz.mod:make"], 2, "cannot import module"),
    (["inspect", "{file}:missing"], 2, "no callable 'missing'"),
    (["inspect", "{file}:only_model"], 2, "returned only a model"),
    (["optimize", "{file}:make", "--passes", "dce,nope"], 2, "unknown pass 'nope'"),
    (["optimize", "{file}:make", "--out", "/no/such/dir/x"], 2, "does not exist"),
    (["export", "{file}:make", "--out", "/no/such/dir/x.onnx"], 2, "does not exist"),
    (["inspect", "{file}:broken"], 1, "could not capture"),
])
def test_errors_are_one_line_with_the_right_exit_code(model_file, capsys, argv, code, message):
    argv = [a.replace("{file}", str(model_file)) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    progress = [line for line in err if line.endswith(" ...")]
    assert len(err) == len(progress) + 1  # progress lines, then the one error line
    assert err[-1].startswith("graphopt: error:") and message in err[-1]


def test_capture_error_names_the_source_line(model_file, capsys):
    main(["inspect", f"{model_file}:broken"])
    err = capsys.readouterr().err
    assert "mymodel.py" in err and "x.mean() > 0" in err and "hint:" in err


def test_usage_errors_exit_2_and_every_subcommand_has_help(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    for sub in ("inspect", "optimize", "export", "passes"):
        with pytest.raises(SystemExit) as info:
            main([sub, "--help"])
        assert info.value.code == 0
        assert "usage: graphopt" in capsys.readouterr().out
    assert main(["passes"]) == 0
    assert "default pipeline: noop,fold,dce" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "inspect" in result.stdout
