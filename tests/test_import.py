"""`import gradprobe` needs only torch and numpy, and has no side effects."""
from reference.fresh import run_python

BLOCK = ["matplotlib", "scipy", "sklearn", "lightning", "pytorch_lightning", "transformers", "tensorboard", "rich", "pandas",
         "accelerate"]


def test_import_needs_only_torch_and_numpy():
    code = (
        "import sys\n"
        f"for m in {BLOCK!r}: sys.modules[m] = None  # any import of these raises ImportError\n"
        "import gradprobe, gradprobe.cli, gradprobe.report, gradprobe.models, gradprobe.diagnosis\n"
        "import gradprobe.integrations, gradprobe.integrations.tensorboard\n"
        "import torch\n"
        "from torch import nn\n"
        "net = gradprobe.models.DeepMLP(4, 2, width=8, depth=2)\n"
        "with gradprobe.Probe(net) as p:\n"
        "    net(torch.randn(3, 4)).sum().backward(); p.step()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in set(" + repr(BLOCK) + ") and sys.modules[m] is not None))\n"
    )
    r = run_python(code, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_plot_without_matplotlib_names_the_extra():
    code = (
        "import sys\nsys.modules['matplotlib'] = None\n"
        "from gradprobe.report.plots import plot_signal_heatmap\nfrom gradprobe.trace import Trace, LayerFlow\n"
        "t = Trace(); t.append(LayerFlow.from_arrays(['a'], grad_norm=[1.0], step=0))\n"
        "try:\n    plot_signal_heatmap(t)\nexcept ImportError as e:\n    print(e)\n"
    )
    r = run_python(code, timeout=120)
    assert "pip install 'gradprobe[plot]'" in r.stdout, r.stdout + r.stderr


def test_import_has_no_side_effects():
    code = (
        "import torch, os\nbefore = set(os.listdir('.'))\n"
        "n = torch.get_num_threads(); g = torch.is_grad_enabled(); d = torch.get_default_dtype()\n"
        "import gradprobe\n"
        "assert (torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype()) == (n, g, d)\n"
        "assert set(os.listdir('.')) == before\nprint('ok')\n"
    )
    r = run_python(code, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr


def test_integrations_without_their_framework_name_the_extra():
    """Each integration module raises MissingExtraError naming its extra when its framework is missing."""
    code = (
        "import sys\n"
        "for m in ('lightning', 'transformers'): sys.modules[m] = None\n"
        "from gradprobe.errors import MissingExtraError\n"
        "for name, extra in (('lightning', 'lightning'), ('transformers', 'transformers')):\n"
        "    try:\n"
        "        __import__('gradprobe.integrations.' + name)\n"
        "    except MissingExtraError as e:\n"
        "        assert f\"gradprobe[{extra}]\" in str(e), e\n"
        "        print(name, 'ok')\n"
    )
    r = run_python(code, timeout=120)
    assert r.stdout.split() == ["lightning", "ok", "transformers", "ok"], r.stdout + r.stderr
