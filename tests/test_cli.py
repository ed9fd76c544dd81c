"""The command line: --help, env, demo (small), and usage errors (exit 2, no traceback)."""
import subprocess
import sys

import pytest

from gradprobe.cli import main
from gradprobe.runlog import load_trace


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gradprobe.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    for sub in ("demo", "env"):
        assert sub in r.stdout


def test_env_reports_versions(capsys):
    import torch

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch            {torch.__version__}" in out
    assert "gradprobe" in out and "matplotlib" in out


def test_usage_error_exits_2_without_traceback():
    r = run_cli("demo", "--epochs", "not-a-number")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "invalid int value" in r.stderr


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_demo_small_run_writes_logs_plots_and_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "2", "--depth", "6", "--width", "32",
                 "--rnn-steps", "3", "--rnn-length", "60"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 60  # a short story; the detail is in the report
    rows = {}
    for line in out.splitlines():
        if line.split():
            rows.setdefault(line.split()[0], line.split())  # the table rows come first
    # depth: the vanishing network is called vanishing at init, the remedy is not
    assert rows["sigmoid-standard"][1] == "vanishing" and rows["relu-he-residual"][1] == "healthy"
    # time: the tanh RNN vanishes in time at init and at the end, the LSTM with forget bias ln T does not
    assert rows["tanh-rnn"][1:3] == ["vanishing_in_time", "vanishing_in_time"]
    assert rows["lstm-forget-bias-lnT"][1:3] == ["healthy", "healthy"]
    assert "Pascanu et al. 2013: λ₁(W_hh) = " in out and "Glorot & Bengio 2010" in out
    for name in ("report.html", "signal_profiles.png", "sigmoid-standard_signal.png", "relu-he-residual_signal.png",
                 "tanh-rnn_temporal.png", "lstm-forget-bias-lnT_temporal.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and "vanishing_in_time" in html
    assert "<title>gradprobe demo: vanishing gradients through depth and through time, and a fix for each</title>" in html
    assert "<th>test accuracy</th>" in html  # noted into the runs, so the rebuilt report has it too
    # `gradprobe report` on the demo's run logs, in another process, rebuilds the very same page and PNGs
    logs = [str(tmp_path / "runs" / f"{n}.sqlite")
            for n in ("sigmoid-standard", "relu-he-residual", "tanh-rnn", "lstm-forget-bias-lnT")]
    r = run_cli("report", *logs, "--out", str(tmp_path / "rebuilt"))
    assert r.returncode == 1, r.stderr  # the sigmoid run is unhealthy
    assert (tmp_path / "rebuilt" / "report.html").read_bytes() == (tmp_path / "report.html").read_bytes()
    for png in tmp_path.glob("*.png"):
        assert (tmp_path / "rebuilt" / png.name).read_bytes() == png.read_bytes(), png.name
    trace = load_trace(tmp_path / "runs" / "sigmoid-standard.sqlite")
    steps_per_epoch = -(-1437 // 64)
    assert len(trace) == 2 * steps_per_epoch
    assert trace.steps.tolist() == list(range(2 * steps_per_epoch))
    # every logged step has the same 8 layers (input, 6 hidden, output), input side starved
    first = trace[0]
    assert len(first) == 8 and first.output_grad_norm[0] < 1e-3 * first.output_grad_norm[-1]


def test_report_rebuilds_from_run_logs_without_the_model(tmp_path, capsys):
    import torch
    from torch import nn

    import gradprobe

    torch.manual_seed(0)
    for name, act in (("sig", nn.Sigmoid), ("relu", nn.ReLU)):
        net = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), act())], nn.Linear(16, 2))
        if act is nn.ReLU:  # He init; PyTorch's default (variance 1/(3·fan_in)) vanishes with ReLU too
            for m in net:
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        with gradprobe.Probe(net, log_dir=tmp_path / "logs", run_name=name) as probe:
            for _ in range(3):
                net.zero_grad()
                net(torch.randn(32, 16)).pow(2).mean().backward()
                probe.step()
    capsys.readouterr()
    code = main(["report", str(tmp_path / "logs" / "sig.sqlite"), str(tmp_path / "logs" / "relu.sqlite"),
                 "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert code == 1  # the sigmoid run is unhealthy
    assert "sig: 3 steps, verdict vanishing" in out and "relu: 3 steps, verdict healthy" in out
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    # the signal of both runs, then per run: heat map and parameter gradients (no loss was given, and no
    # optimizer moved the weights, so there is no loss curve and every update ratio is 0: nothing to draw)
    assert html.count("data:image/png;base64,") == 5
    assert {p.name for p in (tmp_path / "rep").glob("*.png")} == {
        "signal_profiles.png", *(f"{n}_{k}.png" for n in ("sig", "relu") for k in ("signal", "grad_norm"))}
    assert main(["report", str(tmp_path / "logs" / "relu.sqlite"), "--out", str(tmp_path / "t"), "--title", "<T>"]) == 0
    assert "<title>&lt;T&gt;</title>" in (tmp_path / "t" / "report.html").read_text(encoding="utf-8")
    assert main(["report", str(tmp_path / "nope.sqlite")]) == 2
