"""Renamed public names keep working for one release and warn: in-place functions gained their "_",
returned records are named for what they hold (no "...Result"), the unroll moved to functional."""
import importlib

import pytest
import torch
from torch import nn

import gradprobe.functional as functional
import gradprobe.remedies as remedies
from gradprobe.models import rnn as models_rnn
from gradprobe.remedies import pretraining
from reference.fresh import run_python

# the submodules by name: `gradprobe.functional.lanczos` is also the name of a function in the package
lanczos = importlib.import_module("gradprobe.functional.lanczos")
clipping = importlib.import_module("gradprobe.remedies.clipping")


@pytest.mark.parametrize(
    "module,old,new",
    [
        (lanczos, "LanczosResult", "RitzValues"),
        (lanczos, "PowerResult", "DominantEigenpair"),
        (lanczos, "KrylovSVDResult", "SingularValues"),
        (functional, "LanczosResult", "RitzValues"),
        (functional, "KrylovSVDResult", "SingularValues"),
        (clipping, "ClipResult", "ClipStep"),
        (remedies, "ClipResult", "ClipStep"),
    ],
)
def test_old_record_names_warn_and_are_the_new_classes(module, old, new):
    with pytest.warns(DeprecationWarning, match=new):
        cls = getattr(module, old)
    assert cls is getattr(module, new)
    with pytest.raises(AttributeError):
        getattr(module, old + "X")


def test_importing_the_packages_does_not_warn():
    # a fresh interpreter (reloading modules here would leave two copies of their classes behind)
    code = (
        "import warnings\nwarnings.simplefilter('error')\n"
        "import gradprobe, gradprobe.functional, gradprobe.remedies, gradprobe.models, gradprobe.probe.unroll\n"
        "from gradprobe.functional import *\nfrom gradprobe.remedies import *\nprint('ok')\n"
    )
    r = run_python(code, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr


def test_in_place_functions_old_names_warn_and_do_the_same():
    w = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    with pytest.warns(DeprecationWarning, match="scale_to_spectral_radius_"):
        out = models_rnn.scale_to_spectral_radius(w, 0.5)
    assert out is w and models_rnn.spectral_radius(w) == pytest.approx(0.5, rel=1e-14)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 1))
    before = net[0].weight.detach().clone()
    with pytest.warns(DeprecationWarning, match="greedy_layerwise_pretrain_"):
        same = remedies.greedy_layerwise_pretrain(net, torch.randn(32, 4), steps_per_layer=3)
    assert same is net and not torch.equal(before, net[0].weight)  # trained in place, as the new name says
    _, stages = pretraining.split_stages(net)
    with pytest.warns(DeprecationWarning, match="pretrain_layer_"):
        first, last = remedies.pretrain_layer(stages[0], torch.randn(16, 4), steps=2)
    assert first >= 0 and last >= 0
