"""A remedy is one object: its call text names real functions, applying it equals calling them by
hand, its fit check agrees with what the transform can actually do, and the diagnosis only names
remedies that fit the model (issue 11: no "gated cells" for an LSTM, no "scale residual branches"
for a Sequential without skips, residual connections for gradprobe's own DeepMLP)."""
import copy
import importlib
import re
import warnings

import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.diagnosis import Remedy as DiagnosisRemedy
from gradprobe.errors import ConfigError
from gradprobe.models import DeepMLP
from gradprobe.probe.layers import model_facts
from gradprobe.remedies import (
    CATALOGUE,
    Call,
    Remedy,
    TrainingChange,
    add_residual,
    clip_grad_norm_,
    initialize_,
    remedies_for,
    swap_activations,
    to_gated,
    to_leaky,
)
from gradprobe.remedies.catalogue import MODEL, public_name
from reference.models import LastStepReadout

PAPER = re.compile(r"[A-Z][a-z]+.*(19|20)\d\d")


def _resolve(dotted: str):
    if dotted.startswith("nn."):
        return getattr(nn, dotted[3:])
    mod, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def test_the_remedy_is_one_object_everywhere():
    assert gradprobe.Remedy is Remedy and DiagnosisRemedy is Remedy


@pytest.mark.parametrize("rid", sorted(CATALOGUE))
def test_why_cites_a_paper_and_never_a_seed(rid):
    r = CATALOGUE[rid]
    assert r.id == rid and r.title and PAPER.search(r.why), r.why
    assert "seed" not in (r.why + r.title + r.call).lower()


@pytest.mark.parametrize("rid", sorted(CATALOGUE))
def test_call_text_names_the_functions_that_are_run(rid):
    r = CATALOGUE[rid]
    for c in r.calls + ((r.by_hand,) if r.by_hand else ()):
        shown = str(c)
        assert shown in r.call
        name = shown.split("(", 1)[0]
        assert _resolve(name) is c.fn, name  # the text is derived from the object, so it resolves to it
    if r.trialable:
        assert r.call, "a remedy gradprobe can apply must show how"


def test_public_name_is_the_shortest_importable_path():
    assert public_name(initialize_) == "gradprobe.remedies.initialize_"
    assert public_name(nn.ReLU) == "nn.ReLU"
    assert public_name(torch.nn.utils.clip_grad_norm_) == "torch.nn.utils.clip_grad_norm_"


def _sigmoid_mlp():
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(8, 8), nn.Sigmoid())], nn.Linear(8, 2))


def test_apply_equals_calling_the_functions_by_hand_and_leaves_the_model_alone():
    net = _sigmoid_mlp()
    before = copy.deepcopy(net.state_dict())
    torch.manual_seed(3)
    got = CATALOGUE["relu_activation"].apply(net)
    torch.manual_seed(3)
    want = initialize_(swap_activations(copy.deepcopy(net), (nn.Sigmoid, nn.Tanh), nn.ReLU), "he")
    assert [type(m) for m in got.modules()] == [type(m) for m in want.modules()]
    for (k, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), k
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())


def test_he_init_is_fitted_to_the_activation():
    sig, relu = model_facts(_sigmoid_mlp()), model_facts(DeepMLP(8, 2, width=8, depth=2))
    assert CATALOGUE["he_init"].for_model(sig).calls == (Call(initialize_, (MODEL, "xavier")),)
    assert CATALOGUE["he_init"].for_model(relu).calls == (Call(initialize_, (MODEL, "he")),)
    assert 'initialize_(model, "xavier")' in CATALOGUE["he_init"].for_model(sig).call


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):  # (B, T) -> (B, T, vocab)
        return self.head(self.lstm(self.emb(ids))[0])


class TanhRNN(LastStepReadout):
    def __init__(self):  # (T, B, 4) -> (B, 1), read out at the last step
        super().__init__(nn.RNN, 4, 16)


def _zoo():
    seq_relu = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(8, 8), nn.ReLU())], nn.Linear(8, 2))
    return {
        "sigmoid_sequential": _sigmoid_mlp(),
        "relu_sequential": seq_relu,
        "deep_mlp": DeepMLP(8, 2, width=8, depth=3, activation="tanh"),
        "deep_mlp_residual": DeepMLP(8, 2, width=8, depth=3, residual=True),
        "residual_sequential": add_residual(copy.deepcopy(seq_relu)),
        "batchnorm_sequential": nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)),
        "lstm_lm": LSTMLanguageModel(),
        "tanh_rnn": TanhRNN(),
        "leaky_rnn": to_leaky(TanhRNN(), 0.5),
        "cnn": nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 2)),
        "transformer": nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True),
    }


def _fit_cases():
    for name, model in _zoo().items():
        for rid, r in sorted(CATALOGUE.items()):
            if not r.calls:
                continue
            yield pytest.param(name, rid, id=f"{name}-{rid}")


@pytest.mark.parametrize("name, rid", list(_fit_cases()))
def test_a_remedy_that_fits_by_the_facts_can_be_applied(name, rid):
    """The fit check reads only ModelFacts; the oracle is the transform itself on the real model:
    whenever the check says "fits", applying the remedy succeeds and changes the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nn.TransformerEncoderLayer's nested-tensor notice
        model = _zoo()[name]
    r = CATALOGUE[rid]
    facts = model_facts(model)
    if not r.applies_to(facts):
        assert r.why_not(facts)
        return
    torch.manual_seed(0)
    out = r.for_model(facts).apply(model)
    changed = [type(m) for m in out.modules()] != [type(m) for m in model.modules()] or any(
        not torch.equal(a, b) for a, b in zip(out.state_dict().values(), model.state_dict().values()))
    assert changed, f"{rid} fits {name} by its facts but changed nothing"


def test_issue_11_lstm_lm_is_not_told_to_use_gated_cells():
    facts = model_facts(LSTMLanguageModel())
    assert "already gated (LSTM)" in CATALOGUE["gated_cells"].why_not(facts)
    ranked = [r.id for r in gradprobe.diagnosis.remedies.rank_for_vanishing_in_time(facts)]
    assert "gated_cells" not in ranked and "pascanu_omega" not in ranked
    assert ranked[0] == "forget_bias"
    assert "gated_cells" not in [r.id for r in gradprobe.diagnosis.remedies.rank_for_vanishing(facts)]


def test_issue_11_tanh_rnn_vanishing_in_time_gets_gated_cells_first():
    torch.manual_seed(0)
    model = TanhRNN()
    d = gradprobe.diagnose(model, torch.randn(300, 8, 4), lambda y: y.pow(2).mean(), temporal=True)
    v = next(v for v in d.verdicts if v.kind == "vanishing_in_time")
    assert [r.id for r in v.remedies][:2] == ["gated_cells", "pascanu_omega"]
    assert "relu_activation" not in [r.id for r in v.remedies]  # the tanh is inside nn.RNN


def test_issue_11_sequential_without_skips_is_not_told_to_scale_residual_branches():
    torch.manual_seed(0)
    layers = []
    for _ in range(16):
        lin = nn.Linear(64, 64)
        nn.init.normal_(lin.weight, 0.0, (8.0 / 64) ** 0.5)  # σ_w² = 8: ReLU's √(σ_w²/2) = 2 per layer
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(64, 4))
    d = gradprobe.diagnose(net, torch.randn(64, 64), lambda y: y.pow(2).mean())
    assert d.verdict == "exploding", str(d)
    ids = [r.id for r in d.remedies]
    assert "scale_residual" not in ids and ids[0] == "smaller_init"
    for v in d.verdicts:
        assert all(r.applies_to(model_facts(net)) for r in v.remedies)


def test_issue_11_residual_fits_deep_mlp():
    facts = model_facts(DeepMLP(8, 2, width=8, depth=3, activation="sigmoid", init="standard"))
    assert CATALOGUE["residual"].applies_to(facts)
    assert "residual" in [r.id for r in gradprobe.diagnosis.remedies.rank_for_vanishing(facts)]
    assert "already has skip connections" in CATALOGUE["residual"].why_not(model_facts(DeepMLP(8, 2, residual=True)))
    torch.manual_seed(0)
    net = DeepMLP(8, 2, width=8, depth=3, activation="sigmoid", init="standard")
    assert model_facts(CATALOGUE["residual"].apply(net)).skip_connections == ("Residual",)


def test_unknown_facts_name_every_remedy_and_unknown_ids_are_an_error():
    assert [r.id for r in remedies_for(None, "gated_cells", "residual")] == ["gated_cells", "residual"]
    with pytest.raises(ConfigError, match="unknown remedy"):
        remedies_for(None, "no_such_remedy")


def test_training_change_clips_as_pascanu_algorithm_1():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 5) * 10
    for m in (a, b):
        m(x).pow(2).sum().backward()
    res = TrainingChange(clip_norm=0.5).clip_(a.parameters())
    pre = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    assert res.pre_norm == pytest.approx(float(pre), rel=1e-6) and res.clipped
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0)
    assert TrainingChange().clip_(a.parameters()) is None


def test_training_change_optimizers_and_text():
    net = nn.Linear(3, 1)
    opt = TrainingChange(lr_scale=0.1).make_optimizer(net, 0.5)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert TrainingChange(optimizer="momentum").make_optimizer(net, 0.1).param_groups[0]["momentum"] == 0.9
    assert isinstance(TrainingChange(optimizer="rprop").make_optimizer(net, 0.1), torch.optim.Rprop)
    assert public_name(clip_grad_norm_) in str(TrainingChange(clip_norm=1.0))
    with pytest.raises(ConfigError):
        TrainingChange(optimizer="adam")
    with pytest.raises(ConfigError):
        TrainingChange(lr_scale=0.0)


def test_remedy_api_is_deprecated_and_derived():
    r = CATALOGUE["clip_norm"]
    with pytest.warns(DeprecationWarning, match="Remedy.call"):
        assert r.api == r.call
    assert r.as_dict()["call"] == r.call and r.as_dict()["trialable"] is True
    assert CATALOGUE["check_inputs"].trialable is False


def test_catalogue_is_read_only():
    with pytest.raises(TypeError):
        CATALOGUE["x"] = CATALOGUE["clip_norm"]


def test_to_gated_is_what_gated_cells_runs():
    torch.manual_seed(0)
    got = CATALOGUE["gated_cells"].apply(TanhRNN())
    torch.manual_seed(0)
    want = to_gated(TanhRNN(), "lstm")
    assert [type(m) for m in got.modules()] == [type(m) for m in want.modules()]
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))


def test_fitted_remedies_survive_the_run_log(tmp_path):
    """A saved diagnosis names remedies by id; reloading fits them to the saved facts again, so the
    reloaded diagnosis equals the live one, calls included (He → Xavier for a sigmoid MLP)."""
    net = DeepMLP(16, 4, width=16, depth=8, activation="sigmoid", init="standard")
    with gradprobe.Probe(net, log_dir=tmp_path, run_name="r") as probe:
        net(torch.randn(32, 16)).pow(2).mean().backward()
        probe.step()
        live = probe.diagnose()
    he = next(r for r in live.remedies if r.id == "he_init")
    assert 'initialize_(model, "xavier")' in he.call
    loaded = gradprobe.load_run(tmp_path / "r.sqlite").diagnosis
    assert loaded == live and [r.call for r in loaded.remedies] == [r.call for r in live.remedies]
    unknown = gradprobe.diagnosis.verdict.Verdict.from_dict(
        {"kind": "x", "severity": "info", "evidence": [], "remedies": [{"id": "new", "title": "T", "why": "W"}]})
    assert unknown.remedies[0].title == "T" and unknown.remedies[0].call == ""
