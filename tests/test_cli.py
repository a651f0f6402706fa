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


    def not_a_module():
        return (lambda x: x), (torch.randn(2, 4),)

    def only_model():
        return Net()


    def training():
        torch.manual_seed(0)
        return Net(), (torch.randn(2, 4, 8),)
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
    assert "Net:" in out and "batch [1, inf]" in out
    assert "residual" in out.lower() and "flops" in out.lower()


def test_inspect_json(model_file, capsys):
    assert main(["inspect", f"{model_file}:make", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["residual_blocks"]) == 3


def test_inspect_marks_cross_attention(capsys):
    assert main(["inspect", "tests.zoo:text_unet", "--static"]) == 0
    out = capsys.readouterr().out
    assert "attention sites: 8 (4 self, 4 cross)" in out
    site_lines = [line for line in out.splitlines() if ".block.attn" in line and "sdpa" in line]
    assert [" cross to " in line for line in site_lines] == [False, True] * 4
    assert main(["inspect", "tests.zoo:text_unet", "--static", "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)["attention_sites"]
    assert [s["cross"] for s in sites] == [False, True] * 4
    assert all(s["q_input"] == s["kv_input"] for s in sites[::2])
    assert len({s["kv_input"] for s in sites[1::2]}) == 1  # the context input


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
    (["optimize", "dit-digits", "--distill-steps", "5"], 2, "give one in --passes"),
    (["inspect", "{file}:not_a_module"], 2, "the model must be a torch.nn.Module"),
    (["optimize", "{file}:make", "--out", "{file}/sub"], 2, "mymodel.py is a file, not a folder"),
    (["optimize", "dit-digits", "--passes", "linear-attention", "--distill-checkpoint", "x"], 2,
     "need --distill-steps"),
    (["optimize", "{file}:make", "--passes", "linear-attention", "--nfe", "4"], 2, "judge a reference generator"),
    (["optimize", "{file}:training"], 2, "Net is in training mode (blocks.0.ff.2, blocks.1.ff.2, blocks.2.ff.2)"),
    (["optimize", "{file}:make", "--out", ".", "--overwrite"], 2, "cannot save to .: it is the current folder"),
    (["optimize", "{file}:make", "--pass-option", "atconv.hybrid=true"], 2, "'atconv', which is not in the passes"),
    (["optimize", "{file}:make", "--pass-option", "heads=2"], 2, "write it as PASS.OPTION=VALUE"),
    (["optimize", "{file}:make", "--compile", "--target", "cuda"], 2, "--compile builds the CPU program"),
    (["optimize", "{file}:make", "--passes", "linear-attention", "--pass-option", "linear-attention.heads=x"], 2,
     "takes a number"),
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
    assert "default pipeline: noop,fold,cse,merge-linears,batch-branches,dce" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "inspect" in result.stdout


def _tuned_cache(directory):
    from graphopt.autotune import CacheEntry, Config, DeviceKey, Timing, TuningCache

    device = DeviceKey("NVIDIA H100", (9, 0), 132, "12.4", "2.13.0", "3.9.0", "0.1.0")
    entry = CacheEntry.from_timings("layernorm", "abc123", (16, 256), "cfg", [
        Timing(Config(BLOCK=128, num_warps=4), 0.02), Timing(Config(BLOCK=256, num_warps=8), 0.015)])
    TuningCache(device, directory).put(entry)


def test_autotune_cache_list_export_import_clear(tmp_path, capsys):
    src, dst, bundle = tmp_path / "a", tmp_path / "b", tmp_path / "fleet.json"
    _tuned_cache(src)
    assert main(["autotune", "--list", "--cache-dir", str(src)]) == 0
    listing = capsys.readouterr().out
    assert "NVIDIA H100" in listing and "layernorm" in listing and "'BLOCK': 256" in listing
    assert main(["autotune", "--export", str(bundle), "--cache-dir", str(src)]) == 0
    assert main(["autotune", "--import", str(bundle), "--cache-dir", str(dst)]) == 0
    assert "imported 1 entries" in capsys.readouterr().out
    assert main(["autotune", "--list", "--cache-dir", str(dst)]) == 0
    assert "layernorm" in capsys.readouterr().out
    assert main(["autotune", "--clear", "--cache-dir", str(dst)]) == 0
    assert main(["autotune", "--list", "--cache-dir", str(dst)]) == 0
    assert "no tuning cache entries" in capsys.readouterr().out


def test_autotune_clear_also_removes_the_stored_forwards(capsys):
    from graphopt.autotune import stored
    from graphopt.autotune.cache import cache_dir

    _tuned_cache(cache_dir())
    for name in ("a" * 32, "b" * 32):
        (stored.store_dir() / name).mkdir(parents=True)
        (stored.store_dir() / name / stored.ENTRY).write_text("{}")
    (stored.store_dir() / ".c.tmp-1").mkdir()  # a killed writer's leftover: removed, not counted
    assert main(["autotune", "--clear"]) == 0
    assert "removed 1 cache file(s) and 2 stored forward(s)" in capsys.readouterr().out
    assert not list(stored.store_dir().iterdir()) and not list(cache_dir().glob("*.json"))


def test_autotune_bad_requests(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{]")
    assert main(["autotune", "--import", str(tmp_path / "bad.json"), "--cache-dir", str(tmp_path)]) == 2
    assert "malformed tuning bundle" in capsys.readouterr().err
    assert main(["autotune", "--export", str(tmp_path / "no" / "x.json"), "--cache-dir", str(tmp_path)]) == 2
    assert main(["autotune"]) == 2  # a model or an action is required
    assert "name a MODEL to tune" in capsys.readouterr().err
    assert main(["autotune", "dit-digits", "--clear", "--cache-dir", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err
    for bad in (["--batch", "0"], ["--batch", "1,x"], ["--budget-s", "-1"]):
        assert main(["autotune", "dit-digits", *bad]) == 2
        assert capsys.readouterr().err.startswith("graphopt: error: --b")


def test_autotune_a_model_without_a_gpu_says_so_in_one_line(model_file, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["autotune", f"{model_file}:make", "--batch", "1,8"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err


def test_optimize_for_cuda_lowers_onto_kernels(model_file, capsys):
    pytest.importorskip("triton")
    assert main(["optimize", f"{model_file}:make", "--target", "cuda"]) == 0  # TRITON_INTERPRET=1: on the CPU
    out = capsys.readouterr().out
    assert "lower: " in out and "norm" in out and "left on ATen: linear" in out


def test_reference_models_are_named_directly(capsys):
    assert main(["inspect", "unet-digits"]) == 0
    out = capsys.readouterr().out
    assert "EDMUNet" in out and "skip edges: 6" in out
    assert main(["optimize", "dit-digits"]) == 0
    assert "SiT on cpu" in capsys.readouterr().out


def test_autotune_casts_the_model_and_only_its_float_inputs():
    import torch

    from graphopt.cli import _cast

    model, args, kwargs = _cast(torch.nn.Linear(3, 3), (torch.randn(2, 3), torch.arange(2)),
                                {"extra": [torch.randn(1)]}, "bfloat16")
    assert model.weight.dtype == torch.bfloat16 and args[0].dtype == torch.bfloat16
    assert args[1].dtype == torch.int64 and kwargs["extra"][0].dtype == torch.bfloat16


def test_any_model_gets_attention_replaced_and_distilled_judged_by_its_outputs(tmp_path, capsys):
    """A factory model has no sampler or data: the pass and distillation are judged by the relative
    error of its outputs against the original's, on inputs drawn like its example inputs."""
    out_dir = tmp_path / "lit"
    assert main(["optimize", "tests.zoo:dit", "--passes", "noop,fold,dce,linear-attention", "--distill-steps", "3",
                 "--pass-option", "linear-attention.heads=1", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "linear-attention: quality rel. output error" in printed and "site x3" in printed
    assert "distilled 3 steps" in printed and "on synthetic inputs" in printed
    assert "kept the state of step" in printed  # scored at the start and the end, the better one kept
    assert "heads 1" in (out_dir / "report.json").read_text()  # the pass option took effect
    assert main(["optimize", "tests.zoo:dit", "--passes", "skip-scale,skip-tune"]) == 2  # before any work
    assert "skip-tune needs a sampler" in capsys.readouterr().err


def test_verbose_after_the_subcommand_and_malformed_pass_lists(capsys):
    assert main(["inspect", "no_colon_here", "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "run with --verbose" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["optimize", "dit-digits", "--passes", "noop,,dce"])
    assert exit_info.value.code == 2 and "an empty pass name" in capsys.readouterr().err


def test_export_refuses_to_replace_a_file_without_overwrite(model_file, tmp_path, capsys):
    target = tmp_path / "m.onnx"
    target.write_text("precious")
    assert main(["export", f"{model_file}:make", "--out", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err and target.read_text() == "precious"
    assert main(["export", f"{model_file}:make", "--out", str(target), "--overwrite"]) == 0
    assert target.stat().st_size > len("precious")


def test_overwrite_replaces_a_previous_save_and_nothing_else(model_file, tmp_path, capsys):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "precious.txt").write_text("precious")
    assert main(["optimize", f"{model_file}:make", "--out", str(user), "--overwrite"]) == 2
    assert "is not a graphopt save (it holds precious.txt)" in capsys.readouterr().err
    assert [p.name for p in user.iterdir()] == ["precious.txt"]
    saved = tmp_path / "saved"
    for _ in range(2):  # a save, then its replacement
        assert main(["optimize", f"{model_file}:make", "--out", str(saved), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "saved", "userdir"]


def test_a_training_mode_model_is_optimized_as_in_eval_mode_on_request(model_file, capsys):
    assert main(["optimize", f"{model_file}:training", "--eval"]) == 0
    assert "eval-dropout x3" in capsys.readouterr().out  # traced as in eval mode: the dropouts are no-ops


@pytest.mark.slow
def test_optimize_compile_saves_a_program_that_loads_warm(model_file, tmp_path, capsys):
    out_dir = tmp_path / "compiled"
    assert main(["optimize", f"{model_file}:make", "--compile", "--out", str(out_dir)]) == 0
    assert "compile: inductor (AOTInductor, CPU, freezing), compiled in" in capsys.readouterr().out
    assert (out_dir / "model.aoti.pt2").is_file()
    assert main(["export", str(out_dir), "--out", str(tmp_path / "c.onnx")]) == 0  # the graph exports as before


PIPELINE_FILE = textwrap.dedent('''
    import torch
    import diffusers


    def make():
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4).eval()
        return diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()), {"batch_size": 2}


    def bad_kwargs():
        return make()[0], [2]
''')


def test_optimize_a_pipeline_factory_saves_its_denoiser(tmp_path, capsys):
    pytest.importorskip("diffusers")
    import torch

    import graphopt

    path = tmp_path / "pipeline.py"
    path.write_text(PIPELINE_FILE)
    assert main(["optimize", f"{path}:make", "--out", str(tmp_path / "unet")]) == 0
    assert "UNet2DModel on cpu" in capsys.readouterr().out
    loaded = graphopt.load(tmp_path / "unet")
    assert loaded.config.sample_size == 8
    x, t = torch.randn(3, 3, 8, 8), torch.tensor(10)
    assert main(["optimize", f"{path}:bad_kwargs"]) == 2
    assert "returns it alone or as (pipeline, call_kwargs)" in capsys.readouterr().err
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline_factory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipe, _ = module.make()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, pipe.unet(x, t).sample, atol=1e-5, rtol=0)
