"""`gradprobe doctor` as issue 11 asks: it looks through time for recurrent models, ranks tried remedies
by restored flow then held-out loss, turns exceptions from the user's code into exit 2 with one message,
prints machine-readable JSON, and honours --device / --dtype."""
import json
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from gradprobe.cli import build_parser, main
from gradprobe.cli.doctor import DEFAULT_STEPS

SIGMOID_README = ["gradprobe.models:DeepMLP", "-k", "in_features=64", "-k", "out_features=10", "-k", "activation=sigmoid",
                  "-k", "init=standard", "--input", "128,64"]


@pytest.fixture
def user_file(tmp_path):
    f = tmp_path / "usercode.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def tanh_rnn():
            torch.manual_seed(0)
            return nn.RNN(8, 32)                      # tanh, torch's default init: contracting

        class LM(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(20, 8)
                self.lstm = nn.LSTM(8, 8, batch_first=True)
                self.head = nn.Linear(8, 20)
            def forward(self, ids):
                return self.head(self.lstm(self.emb(ids))[0])

        def lm():
            torch.manual_seed(0)
            return LM()

        def ids():
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 20, (8, 12), generator=g)
            return x, torch.roll(x, -1, dims=1)

        def broken_factory():
            raise ValueError("width must be even")

        def broken_data():
            return {}["no such key"]

        def small():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))

        def deep_sigmoid():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(4, 16), *[m for _ in range(10) for m in (nn.Linear(16, 16), nn.Sigmoid())],
                                 nn.Linear(16, 3))

        def ids_for_small():
            g = torch.Generator().manual_seed(2)
            return torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)

        def small_data():
            g = torch.Generator().manual_seed(1)
            return torch.randn(10, 4, generator=g), torch.randn(10, 5, generator=g)   # 5 targets for 3 outputs
    """))
    return f


def test_tanh_rnn_over_300_steps_is_vanishing_in_time(user_file, capsys):
    assert main(["doctor", f"{user_file}:tanh_rnn", "--input", "300,16,8", "--steps", "1"]) == 1
    out = capsys.readouterr().out
    assert "== at init: vanishing_in_time ==" in out
    assert "through time (the model has recurrent layers (RNN)): the loss reads the last of 300 time steps" in out
    assert "1. Use gated recurrent cells" in out
    # without looking through time the same model is called healthy (what issue 11 reported)
    assert main(["doctor", f"{user_file}:tanh_rnn", "--input", "300,16,8", "--steps", "0", "--no-temporal"]) == 0
    assert "== at init: healthy ==" in capsys.readouterr().out


def test_lstm_lm_with_token_ids_is_never_told_to_use_gated_cells(user_file, capsys):
    main(["doctor", f"{user_file}:lm", "--data", f"{user_file}:ids", "--steps", "0", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["temporal"] is True and report["loss"] == "cross_entropy"
    named = {r["id"] for d in report["diagnoses"] for v in d["verdicts"] for r in v["remedies"]}
    assert "gated_cells" not in named and "pascanu_omega" not in named and "relu_activation" not in named


def test_embedding_model_given_float_input_gets_a_data_hint(user_file, capsys):
    assert main(["doctor", f"{user_file}:lm", "--input", "8,12"]) == 2
    err = capsys.readouterr().err
    assert "forward failed on an input of shape (8, 12)" in err and "starts with nn.Embedding" in err and "--data" in err


@pytest.mark.parametrize("argv, message", [
    (["{f}:broken_factory", "--input", "2,4"], "calling {f}:broken_factory() raised ValueError: width must be even"),
    (["{f}:small", "--data", "{f}:broken_data"], "calling the data function {f}:broken_data() raised KeyError"),
    (["{f}:small", "--data", "{f}:small_data", "--loss", "mse"],
     "the loss mse failed on the model's output of shape (10, 3) and the target of shape (10, 5)"),
])
def test_exceptions_from_user_code_exit_2_with_one_message(user_file, capsys, argv, message):
    argv = [a.format(f=user_file) for a in argv]
    assert main(["doctor", *argv]) == 2
    err = capsys.readouterr().err
    assert message.format(f=user_file) in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert main(["doctor", *argv, "--traceback"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and message.format(f=user_file) in err


def test_json_diagnosis_matches_autograd_and_the_text_verdict(user_file, capsys):
    argv = ["doctor", f"{user_file}:small", "--input", "16,4", "--steps", "0", "--seed", "3"]
    code = main(argv + ["--json"])
    report = json.loads(capsys.readouterr().out)
    assert main(argv) == code == report["exit_code"]
    text = capsys.readouterr().out
    (d,) = report["diagnoses"]
    assert f"== at init: {d['verdict']} ==" in text
    for v in d["verdicts"]:
        assert v["kind"] in text and all(e in text for e in v["evidence"])
        assert all(r["call"] in text for r in v["remedies"])
    # oracle: ‖∂L/∂h_l‖ and ‖∂L/∂θ_l‖ by hand with autograd, same model, same input draw
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    hs, h = [], x
    for m in net:
        h = m(h)
        if isinstance(m, nn.Linear):
            h.retain_grad()
            hs.append(h)
    h.pow(2).mean().backward()
    layers = d["flow"]["layers"]
    assert [row["layer"] for row in layers] == ["0", "2", "4"]
    for row, hl, lin in zip(layers, hs, [net[0], net[2], net[4]]):
        assert row["output_grad_norm"] == pytest.approx(float(hl.grad.norm()), rel=1e-5)
        g = torch.cat([lin.weight.grad.flatten(), lin.bias.grad.flatten()])
        assert row["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-5)
        assert row["update_ratio"] is None  # not measured at the first step


def test_dtype_float64_and_device(user_file, capsys):
    assert main(["doctor", f"{user_file}:small", "--input", "16,4", "--steps", "2", "--dtype", "float64",
                 "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "float64" and report["device"] == "cpu" and len(report["diagnoses"]) == 2
    assert main(["doctor", f"{user_file}:small", "--input", "16,4", "--device", "nonsense"]) == 2
    assert "--device 'nonsense'" in capsys.readouterr().err


def test_help_states_the_steps_default():
    parser = build_parser()
    doctor = parser._subparsers._group_actions[0].choices["doctor"]
    assert doctor.get_default("steps") == DEFAULT_STEPS
    assert f"after --steps SGD steps on one batch (default {DEFAULT_STEPS})" in doctor.description
    assert f"(default: {DEFAULT_STEPS};" in doctor.format_help()


def test_readme_sigmoid_example_relu_beats_he_init(capsys):
    """Issue 11: on the README's own example the winner used to be he_init (still vanishing, lower loss
    on the one memorised batch). Ranked by restored flow first, relu_activation wins; both numbers shown."""
    assert main(["doctor", *SIGMOID_README, "--try-remedies", "--json"]) == 1
    trials = json.loads(capsys.readouterr().out)["trials"]
    by_id = {r["remedy"]: r for r in trials["results"]}
    ranking = trials["ranking"]
    assert ranking.index("relu_activation") < ranking.index("he_init")
    # every remedy that restored the flow ranks above every one that did not, whatever the losses
    restored = [by_id[r]["restored"] for r in ranking]
    assert restored == sorted(restored, reverse=True) and ranking[-1] == "he_init"
    assert by_id["relu_activation"]["restored"] and by_id["relu_activation"]["verdict"][1] == "healthy"
    assert not by_id["he_init"]["restored"] and by_id["he_init"]["verdict"][1] == "vanishing"
    assert all(np.isfinite(by_id[k]["held_out_loss"]) for k in ("baseline", "relu_activation", "he_init"))
    assert "second synthetic batch" in trials["held_out"]


def test_try_remedies_with_data_holds_out_the_last_quarter(user_file, capsys):
    assert main(["doctor", f"{user_file}:deep_sigmoid", "--data", f"{user_file}:ids_for_small", "--steps", "0",
                 "--try-remedies", "--trials", "1", "--trial-steps", "3", "--json"]) == 1
    trials = json.loads(capsys.readouterr().out)["trials"]
    assert trials["held_out"] == "the last quarter of --data, never trained on"
    base, relu = trials["results"]
    assert relu["remedy"] == "relu_activation" and np.isfinite(relu["held_out_loss"]) and np.isfinite(base["held_out_loss"])


def test_split_keeps_the_batch_axis():
    from gradprobe.cli.doctor import _split

    x, y = torch.arange(40.0).reshape(5, 8, 1), torch.arange(8)  # time-major (T=5, B=8, 1), labels (B,)
    (xt, yt), (xh, yh) = _split(x, y, batch_dim=1)
    assert xt.shape == (5, 6, 1) and xh.shape == (5, 2, 1) and yt.tolist() == list(range(6)) and yh.tolist() == [6, 7]
    assert torch.equal(torch.cat([xt, xh], 1), x)
    assert _split(x[:, :3], y[:3], batch_dim=1)[1] is None  # fewer than 4 samples: nothing held out


def test_report_option_writes_the_html_report_and_gradprobe_report_rebuilds_it(tmp_path, capsys):
    """--report DIR: the page holds the verdict, the temporal profile of the RNN and the remedy trials;
    `gradprobe report` on its run log rebuilds it byte for byte (settings and trials are in the log)."""
    out = tmp_path / "rep"
    spec = ["gradprobe.models:DeepMLP", "-k", "in_features=16", "-k", "out_features=4", "-k", "activation=sigmoid",
            "-k", "init=standard", "-k", "depth=6", "-k", "width=16", "--input", "32,16"]
    assert main(["doctor", *spec, "--steps", "2", "--try-remedies", "--trials", "2", "--trial-steps", "5",
                 "--report", str(out)]) == 1
    text = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in text
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<title>gradprobe doctor: DeepMLP</title>" in html and "vanishing" in html
    assert "Remedies tried" in html and "held out loss" in html  # the trials table
    assert main(["report", str(out / "runs" / "doctor.sqlite"), "--out", str(tmp_path / "rebuilt")]) == 1
    assert (tmp_path / "rebuilt" / "report.html").read_bytes() == (out / "report.html").read_bytes()
