"""ModelFacts: what the module tree says about a model (vanilla vs gated recurrence, skips, plain MLP),
checked against models whose structure is known by construction."""
import warnings

import pytest
import torch
from torch import nn

from gradprobe.models import DeepMLP
from gradprobe.probe.layers import model_facts
from gradprobe.remedies import Residual, add_residual, to_gated, to_leaky
from gradprobe.trace import ModelFacts


class HiddenSkip(nn.Module):
    """A skip written inside forward: invisible to the module tree (documented limitation)."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.f(x))


def test_plain_mlp_and_square_linears_by_construction():
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 8),
                        nn.LayerNorm(8), nn.Sigmoid(), nn.Linear(8, 8), nn.Linear(8, 2))
    f = model_facts(net)
    assert f.plain_mlp and f.square_linears == 2 and f.sequential_layers == 4
    assert f.saturating == ("Sigmoid", "Tanh") and f.normalization == ("LayerNorm",)
    assert f.skip_connections == () and f.recurrent == ()
    d = DeepMLP(5, 3, width=7, depth=4)
    # DeepMLP keeps each hidden block in an nn.Sequential (linear, norm, act): 4 insertion points
    assert model_facts(d).plain_mlp and model_facts(d).square_linears == 4 and model_facts(d).sequential_layers == 4
    assert model_facts(DeepMLP(5, 3, width=7, depth=4, residual=True)).square_linears == 8  # linear + proj


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 1)),
    nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4)),
    nn.Sequential(nn.RNN(3, 4)),
    nn.MultiheadAttention(4, 2),
    nn.Sequential(nn.ReLU()),  # no Linear at all
], ids=["conv", "embedding", "rnn", "attention", "no_linear"])
def test_not_a_plain_mlp(model):
    assert not model_facts(model).plain_mlp


def test_vanilla_and_gated_recurrence():
    f = model_facts(nn.ModuleList([nn.RNN(3, 4), nn.RNNCell(3, 4), nn.Linear(4, 1)]))
    assert f.vanilla_recurrent == ("RNN", "RNNCell") and f.gated_recurrent == ()
    assert f.recurrent == ("RNN", "RNNCell")
    g = model_facts(nn.ModuleList([nn.LSTM(3, 4), nn.GRUCell(3, 4)]))
    assert g.gated_recurrent == ("GRUCell", "LSTM") and g.vanilla_recurrent == ()
    # the transforms move a model from one to the other
    net = nn.Sequential(nn.RNN(3, 4))
    assert model_facts(to_gated(net, "gru")).gated_recurrent == ("GRU",)
    leaky = model_facts(to_leaky(net, 0.5))  # the nn.RNN now runs inside gradprobe's leaky recurrence
    assert leaky.vanilla_recurrent == ("Leaky",) and leaky.recurrent == ("Leaky", "RNN") and not leaky.plain_mlp


def test_gradprobe_hand_written_recurrences_are_recurrent_not_mlps():
    from gradprobe.models import LeakyRNN, SigmoidRNN

    for model in (LeakyRNN(3, 5), SigmoidRNN(3, 5, 2)):
        f = model_facts(model)
        name = type(model).__name__
        assert f.vanilla_recurrent == (name,) and name in f.recurrent
        assert not f.plain_mlp and f.mlp is None  # it is built of nn.Linear, yet it is no MLP


def test_known_skip_connections_are_detected():
    assert model_facts(nn.Sequential(Residual(nn.Linear(4, 4)))).skip_connections == ("Residual",)
    assert model_facts(DeepMLP(4, 2, depth=2, residual=True)).skip_connections == ("ResidualBlock",)
    assert model_facts(DeepMLP(4, 2, depth=2)).skip_connections == ()
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    assert model_facts(add_residual(net)).skip_connections == ("Residual",)
    res = model_facts(add_residual(DeepMLP(4, 2, width=4, depth=2)))
    assert res.skip_connections == ("Residual",) and res.mlp is None  # mean-field's plain MLP no longer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16), 2)
    f = model_facts(enc)
    assert f.skip_connections == ("TransformerEncoderLayer",) and not f.plain_mlp
    assert model_facts(nn.TransformerDecoderLayer(8, 2, dim_feedforward=16)).skip_connections == ("TransformerDecoderLayer",)


def test_a_skip_inside_a_custom_forward_cannot_be_seen():
    f = model_facts(HiddenSkip())
    assert f.skip_connections == () and f.plain_mlp  # as the ModelFacts docstring says
    x = torch.randn(2, 4)
    m = HiddenSkip()
    assert not torch.equal(m(x), m.act(m.f(x)))  # and yet it has one


def test_torchvision_resnet_blocks_are_matched_by_module_and_name():
    """torchvision is not a dependency: its ResNet blocks are recognised by (module, class name)."""
    BasicBlock = type("BasicBlock", (HiddenSkip,), {"__module__": "torchvision.models.resnet"})
    Other = type("BasicBlock", (HiddenSkip,), {"__module__": "somewhere.else"})
    assert model_facts(BasicBlock()).skip_connections == ("BasicBlock",)
    assert model_facts(Other()).skip_connections == ()


def test_forget_gate_bias_is_a_fact_and_the_forget_bias_remedy_fits_only_a_closed_gate():
    """The fact is the mean of ``b_ih + b_hh`` over the forget block (rows H..2H), checked by hand; the
    forget-bias remedy is not offered to an LSTM whose gate is already open (bias ≥ 1)."""
    from gradprobe.remedies import forget_bias_
    from gradprobe.remedies.catalogue import CATALOGUE

    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, num_layers=2)
    by_hand = min(float((getattr(lstm, f"bias_ih_l{k}")[5:10] + getattr(lstm, f"bias_hh_l{k}")[5:10]).mean().detach())
                  for k in range(2))
    f = model_facts(lstm)
    assert f.forget_bias == pytest.approx(by_hand, abs=1e-6) and abs(f.forget_bias) < 0.5
    assert CATALOGUE["forget_bias"].why_not(f) is None
    forget_bias_(lstm, 1.0)
    f1 = model_facts(lstm)
    assert f1.forget_bias == pytest.approx(1.0, abs=1e-6)
    assert "already 1" in CATALOGUE["forget_bias"].why_not(f1)
    assert model_facts(nn.GRU(3, 5)).forget_bias is None and model_facts(nn.LSTM(3, 5, bias=False)).forget_bias is None
    assert ModelFacts.from_dict(f1.as_dict()) == f1
