"""`gradprobe doctor`: model loading from strings, verdicts, exit codes (0 healthy, 1 problem, 2 usage)."""
import subprocess
import sys
import textwrap

import pytest
import torch

from gradprobe.cli import main
from gradprobe.cli.loading import parse_kwargs, parse_shape
from gradprobe.errors import ConfigError
from gradprobe.models import DeepMLP
from reference.fresh import run_python

MLP = ["gradprobe.models:DeepMLP", "-k", "in_features=32", "-k", "out_features=10", "-k", "width=64", "-k", "depth=10"]


def test_vanishing_model_exits_1_with_verdict(capsys):
    code = main(["doctor", *MLP, "-k", "activation=sigmoid", "-k", "init=standard", "--input", "64,32", "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 1
    assert "== at init: vanishing ==" in out and "== after 2 steps: vanishing ==" in out
    assert "Use a non-saturating activation" in out


def test_healthy_model_exits_0(capsys):
    assert main(["doctor", *MLP, "-k", "activation=relu", "-k", "init=he", "--input", "64,32"]) == 0
    assert "== at init: healthy ==" in capsys.readouterr().out


def test_model_from_file_with_data_function(tmp_path, capsys):
    f = tmp_path / "mymodel.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        def build(scale=1.0):
            layers = []
            for _ in range(20):
                lin = nn.Linear(64, 64)
                with torch.no_grad():
                    lin.weight.normal_(0, scale / 8)  # sigma_w = scale (fan_in 64)
                layers += [lin, nn.Tanh()]
            return nn.Sequential(*layers, nn.Linear(64, 3))
        def data():
            g = torch.Generator().manual_seed(0)
            return torch.randn(32, 64, generator=g), torch.randint(0, 3, (32,), generator=g)
    """))
    assert main(["doctor", f"{f}:build", "-k", "scale=3.0", "--data", f"{f}:data"]) == 1
    out = capsys.readouterr().out
    assert "loss cross_entropy" in out and "exploding" in out


def test_state_dict_is_loaded_safely_and_pickles_refused(tmp_path, capsys):
    net = DeepMLP(32, 10, width=64, depth=10, activation="relu", init="he")
    torch.save(net.state_dict(), tmp_path / "w.pt")
    torch.save(net, tmp_path / "whole.pt")
    assert main(["doctor", *MLP, "--state", str(tmp_path / "w.pt"), "--input", "16,32"]) == 0
    capsys.readouterr()
    assert main(["doctor", str(tmp_path / "whole.pt"), "--input", "16,32"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["doctor", str(tmp_path / "whole.pt"), "--allow-pickle", "--input", "16,32"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["doctor", "gradprobe.models:Nope", "--input", "3,4"], "has no attribute 'Nope'"),
        (["doctor", "no_such_module_xyz:f", "--input", "3,4"], "cannot import"),
        (["doctor", "gradprobe.models", "--input", "3,4"], "must be 'package.module:name'"),
        (["doctor", *MLP, "--input", "3,5"], "forward failed on an input of shape (3, 5)"),
        (["doctor", *MLP], "--input SHAPE"),
        (["doctor", *MLP, "--input", "a,b"], "comma-separated"),
        (["doctor", *MLP, "-k", "bogus=1", "--input", "3,32"], "calling gradprobe.models:DeepMLP"),
        (["doctor", *MLP, "--input", "3,32", "--steps", "-1"], "--steps -1"),
    ],
)
def test_usage_errors_exit_2_with_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_usage_error_has_no_traceback_in_a_real_process():
    r = subprocess.run([sys.executable, "-m", "gradprobe.cli", "doctor", "x:y", "--input", "2,2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot import 'x'" in r.stderr


def test_parsers():
    assert parse_kwargs(["a=1", "b='x'", "c=True", "d=word", "e=[1, 2]"]) == {"a": 1, "b": "x", "c": True, "d": "word", "e": [1, 2]}
    assert parse_shape("32x64") == (32, 64)
    with pytest.raises(ConfigError):
        parse_kwargs(["1a=2"])
    with pytest.raises(ConfigError):
        parse_shape("0,3")


def _nan_flow():
    from gradprobe.trace import LayerFlow

    return LayerFlow.from_arrays(["a", "b"], ["Linear", "Linear"], output_grad_norm=[float("nan"), 1.0],
                                 grad_norm=[float("inf"), 2.0], has_output_grad=[True, True], has_grad=[True, True],
                                 weight_norm=[1.0, 1.0])


def test_tables_print_measured_non_finite_values_and_dash_only_for_unmeasured():
    import io

    from gradprobe.cli._console import print_flow_table
    from gradprobe.trace import LayerFlow

    flow = _nan_flow()
    text = flow.table()
    assert "nan" in text and "inf" in text
    buf = io.StringIO()
    print_flow_table(flow, stream=buf)  # rich path (rich is in the test extra)
    out = buf.getvalue()
    assert "nan" in out and "inf" in out and "‖∂L/∂h‖" in out
    unmeasured = LayerFlow.from_arrays(["a"], output_grad_norm=[float("nan")], has_output_grad=[False], weight_norm=[1.0])
    assert "—" in unmeasured.table() and "nan" not in unmeasured.table().split("\n", 2)[2]


def test_plain_table_without_rich():
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "from gradprobe.cli._console import print_flow_table\n"
        "from gradprobe.trace import LayerFlow\n"
        "print_flow_table(LayerFlow.from_arrays(['x'], ['Linear'], grad_norm=[0.5], output_grad_norm=[0.25]))\n"
    )
    r = run_python(code, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "layer" in r.stdout and "0.25" in r.stdout
