"""``gradprobe doctor MODEL``: probe a model at init and after a few steps; print the flow, verdicts and remedies.

Exit codes: 0 healthy, 1 a problem found, 2 a usage error (clear message, no traceback).
"""
from __future__ import annotations

import copy

import torch

from gradprobe.cli._console import print_flow_table
from gradprobe.specs import LOSSES, load_data, load_model, make_loss, parse_kwargs, parse_shape
from gradprobe.diagnosis import Diagnosis
from gradprobe.errors import ConfigError
from gradprobe.oneshot import _forward
from gradprobe.monitor import Probe


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="diagnose a model's gradient flow at init and after a few steps",
        description="MODEL is package.module:factory or path/to/file.py:factory (called with -k name=value "
        "arguments), e.g. gradprobe.models:DeepMLP -k in_features=64 -k out_features=10 -k activation=sigmoid.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("-k", "--kwarg", action="append", metavar="NAME=VALUE", help="argument for the factory (repeatable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", metavar="SHAPE", help="synthetic N(0,1) input of this shape, e.g. 64,128")
    src.add_argument("--data", metavar="MODULE:FN", help="function returning x or (x, y)")
    p.add_argument("--loss", choices=LOSSES, default=None,
                   help="loss of the output (default: cross_entropy when --data gives labels, else mean_square)")
    p.add_argument("--steps", type=int, default=0, help="SGD steps on the batch before the second diagnosis")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--state", help="state dict to load into the model (read with weights_only=True)")
    p.add_argument("--allow-pickle", action="store_true", help="allow MODEL to be a whole pickled model (runs its code)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--try-remedies", action="store_true",
                   help="run short equal-budget A/B trials of the top remedies and print their measured effect")
    p.add_argument("--trials", type=int, default=3, help="how many remedies to try (default: %(default)s)")
    p.add_argument("--trial-steps", type=int, default=100, help="training steps per trial (default: %(default)s)")
    p.set_defaults(run=run)


def _print_diagnosis(title: str, flow, diagnosis: Diagnosis) -> None:
    print(f"\n== {title}: {diagnosis.verdict} ==")
    print_flow_table(flow, max_rows=40)
    print()
    print(diagnosis)


def run(args) -> int:
    if args.steps < 0:
        raise ConfigError(f"--steps {args.steps} must be >= 0")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = load_model(args.model, parse_kwargs(args.kwarg), args.state, args.allow_pickle)
    if args.data:
        x, y = load_data(args.data)
    elif args.input:
        x, y = torch.randn(parse_shape(args.input), generator=gen), None
    else:
        raise ConfigError("give the input: --input SHAPE (synthetic data) or --data MODULE:FN")
    loss_name = args.loss or ("cross_entropy" if y is not None and not y.is_floating_point() else "mean_square")
    loss_fn = make_loss(loss_name, y, gen)
    model.train()
    pristine = copy.deepcopy(model) if args.try_remedies else None
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    print(f"gradprobe doctor: {type(model).__name__}, input {tuple(x.shape)}, loss {loss_name}, {args.steps} steps")
    worst = 0
    first = None
    with Probe(model, budget=None) as probe:
        for step in range(args.steps + 1):
            opt.zero_grad(set_to_none=True)
            try:
                out = _forward(model, x)
            except Exception as exc:  # the user's model rejected the input: a usage error
                raise ConfigError(f"the model's forward failed on an input of shape {tuple(x.shape)}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            loss = loss_fn(out)
            loss.backward()
            flow = probe.step(loss)
            if step == 0 or step == args.steps:
                d = probe.diagnose()
                first = first or d
                _print_diagnosis("at init" if step == 0 else f"after {step} steps", flow, d)
                worst = max(worst, 0 if d.ok else 1)
            if step < args.steps:
                opt.step()
    for p in model.parameters():
        p.grad = None
    if args.try_remedies:
        _try_remedies(pristine, x, loss_fn, first, args)
    return worst


def _try_remedies(pristine, x, loss_fn, diagnosis: Diagnosis, args) -> None:
    from gradprobe.experiments.trials import format_trials, run_trials, treatment_for

    if args.trials < 1 or args.trial_steps < 1:
        raise ConfigError("--trials and --trial-steps must be >= 1")
    treatments = []
    for v in diagnosis.verdicts:
        for r in v.remedies:
            t = treatment_for(r)
            if t is not None and t.id not in {x.id for x in treatments}:
                treatments.append(t)
    treatments = treatments[: args.trials]
    if not treatments:
        print("\n--try-remedies: the diagnosis names no remedy that a short trial can apply")
        return
    print(f"\n== remedy trials: {args.trial_steps} steps each, same seed, same batch, lr {args.lr} ==")
    results = run_trials(lambda: copy.deepcopy(pristine), lambda s: (x, None), lambda out, _: loss_fn(out),
                         treatments, steps=args.trial_steps, lr=args.lr, seed=args.seed)
    print(format_trials(results))
    base = results[0]
    tried = [r for r in results[1:] if r.ok]
    if tried:
        best = min(tried, key=lambda r: r.loss_end)
        change = "lower" if best.loss_end < base.loss_end else "not lower"
        print(f"\nbest: {best.treatment.id} (loss {best.loss_end:.4g} vs {base.loss_end:.4g} without: {change}; "
              f"signal ratio {best.ratio_end:.3g} vs {base.ratio_end:.3g}; verdict {best.verdict_end})")
