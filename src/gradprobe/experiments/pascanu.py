"""Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural networks": Fig. 7.

Success rate of SGD, SGD-C (norm clipping) and SGD-CR (clipping + Ω) with the "sigmoid", "basic tanh"
and "smart tanh" initialisations of a 50-unit RNN on the pathological tasks, as a function of the
sequence length. Protocol as in the authors' ``RNN.py`` (see ``shared/references.md``):

* plain SGD, lr 0.01, batch 20; sequence length drawn per batch from [min, max) ("training for a
  range", e.g. [50, 200)) or fixed;
* SGD-C: clipping at 1.0 over all parameters; SGD-CR: α·∂Ω/∂W_rec added before the clipping norm
  (α = 2, the code's default; the paper's text says 4 — configurable); the code's guard when the norm
  is NaN/Inf/>1e10 (∂W_rec ← 0.02·W_rec, the rest 0; only with clipping, as in the code);
* validation every 20 updates on 10,000 fresh sequences (chunks of 1,000, each chunk its own length);
  a run stops when it makes 0 errors ("solved" as the code defines it) or after ``max_updates``
  (5M in the paper). We also record when the error first fell below 1 % (the paper's criterion).

Differences we introduce, always stated in the report:

* the length of each batch (and of each validation chunk) comes from a stream seeded by the point,
  shared by its seeds, so that the seeds can be trained as one batched computation (``K`` models in
  ``bmm``); each run still equals the same run trained alone (tested);
* ``screen_size > 0`` (the quick profile): the 20-update check first looks at ``screen_size`` fresh
  sequences and runs the full 10,000 only when those are below 1 % wrong, which saves most of the
  validation cost (10,000 sequences cost 30–100× a training step) without changing which runs are
  solved except by sampling luck at the 1 % edge.

The probe's view: every validation also records the temporal gradient profile ∂E/∂h_t of the last
training batch as :class:`gradprobe.TemporalFlow` and its ``horizon()`` (steps back the gradient stays
above 1 % of its peak) and ``decay_rate``, per model.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from gradprobe.errors import ConfigError
from gradprobe.experiments.reporting import pascanu_report
from gradprobe.experiments.rnn_trainer import RNNParams, RNNTrainer, head_for, init_params
from gradprobe.experiments.runner import Experiment, Job, JobContext, Report, RunOutput, derive_seed
from gradprobe.experiments.tasks import make_task
from gradprobe.models.rnn import PASCANU_INITS

__all__ = ["PascanuPoint", "PascanuConfig", "Pascanu2013", "METHODS", "train_point"]

#: method -> (clipping threshold or None, uses Ω)
METHODS = {"sgd": (None, False), "sgd_c": (1.0, False), "sgd_cr": (1.0, True)}
OWN_LENGTH_TASKS = ("addition", "multiplication")  # length l ∈ [L, 1.1L) drawn inside every batch
PAPER_TASKS = ("temporal_order", "temporal_order_3bit", "addition", "multiplication", "permutation", "memorization")


@dataclass(frozen=True)
class PascanuPoint:
    """One point of Fig. 7 (all its seeds share it). Lengths are drawn from ``[min_length, max_length)``
    per batch (``max_length == min_length``: fixed length)."""

    task: str
    init: str
    method: str
    min_length: int
    max_length: int
    max_updates: int
    lr: float = 0.01
    batch: int = 20
    clip: float = 1.0
    alpha: float = 2.0
    n_hidden: int = 50
    val_every: int = 20
    val_size: int = 10_000
    val_chunk: int = 1_000
    screen_size: int = 0
    fast_tanh: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        if self.init not in PASCANU_INITS:
            raise ConfigError(f"unknown init {self.init!r}; choose one of {sorted(PASCANU_INITS)}")
        if not 1 <= self.min_length <= self.max_length:
            raise ConfigError(f"need 1 <= min_length <= max_length; got {self.min_length}, {self.max_length}")
        if self.val_size % self.val_chunk:
            raise ConfigError(f"val_size={self.val_size} must be a multiple of val_chunk={self.val_chunk}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}")
        make_task(self.task)  # raises for an unknown task

    @property
    def length_label(self) -> str:
        return str(self.min_length) if self.max_length == self.min_length else f"{self.min_length}-{self.max_length}"


@dataclass(frozen=True)
class PascanuConfig:
    profile: str
    tasks: tuple[str, ...]
    inits: tuple[str, ...]
    methods: tuple[str, ...]
    lengths: tuple[tuple[int, int], ...]  # (min, max) per point; min == max: fixed
    seeds: int
    point: PascanuPoint = field(repr=False, default=None)  # template: every other field

    def points(self) -> list[PascanuPoint]:
        return [replace(self.point, task=t, init=i, method=m, min_length=lo, max_length=hi)
                for t in self.tasks for i in self.inits for (lo, hi) in self.lengths for m in self.methods]


def _template(**kw) -> PascanuPoint:
    base = dict(task="temporal_order", init="basic_tanh", method="sgd", min_length=50, max_length=50, max_updates=1000)
    base.update(kw)
    return PascanuPoint(**base)


PROFILES = {
    # seconds: what the tests run
    "smoke": PascanuConfig("smoke", ("temporal_order",), ("basic_tanh",), tuple(METHODS), ((10, 10),), 2,
                           _template(max_updates=40, val_every=20, val_size=200, val_chunk=100)),
    # ≤ 15 minutes on 2 cores (``--workers 2``): short fixed lengths, 5 seeds vectorized, screened validation,
    # 20k updates; smart tanh at L = 50 (where the three methods separate within the budget; listed first, as
    # its jobs are the longest, so two workers finish together), every init at L = 20
    "quick": (PascanuConfig("quick", ("temporal_order",), ("smart_tanh",), tuple(METHODS), ((50, 50),), 5,
                            _template(max_updates=20_000, screen_size=500, fast_tanh=True)),
              PascanuConfig("quick", ("temporal_order",), tuple(PASCANU_INITS), tuple(METHODS), ((20, 20),), 5,
                            _template(max_updates=20_000, screen_size=500, fast_tanh=True))),
    # the authors' protocol (a cluster or a GPU: one point of Fig. 7 is 10–30 h on 2 cores)
    "paper": PascanuConfig("paper", PAPER_TASKS, tuple(PASCANU_INITS), tuple(METHODS),
                           ((50, 200),) + tuple((L, L) for L in (50, 100, 150, 200, 250)), 5,
                           _template(max_updates=5_000_000)),
}


# ------------------------------------------------------------------------------------------ training
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % (2**63))


class _Lengths:
    """Lengths drawn per batch from [lo, hi) by a generator (the authors' ``min + randint(max − min)``)."""

    def __init__(self, lo: int, hi: int, seed: int):
        self.lo, self.hi, self.g = lo, hi, _gen(seed)

    def next(self) -> int:
        if self.hi <= self.lo:
            return self.lo
        return self.lo + int(torch.randint(0, self.hi - self.lo, (1,), generator=self.g))


def _stack_batches(batches, head: str, dtype):
    x = torch.stack([b.x for b in batches], 1).to(dtype)  # (T, K, B, I)
    if head == "softmax_all":
        y = torch.stack([b.y for b in batches], 1)  # (T, K, B)
    elif head == "linear_last":
        y = torch.stack([b.y for b in batches]).to(dtype)  # (K, B, O)
    else:
        y = torch.stack([b.y for b in batches])  # (K, B)
    return x, y


def _spectral_radius(R: torch.Tensor) -> np.ndarray:
    return torch.linalg.eigvals(R.detach().to(torch.float64).cpu()).abs().amax(-1).numpy()


@dataclass
class _ModelState:
    """Per-run bookkeeping, JSON-able (saved in checkpoints)."""

    active: bool = True
    solved_at: int | None = None  # first update with 0 validation errors (the code's "solved")
    below1_at: int | None = None  # first update with < 1 % validation errors (the paper's criterion)
    best_error: float = 100.0
    last_error: float = math.nan
    fallbacks: int = 0
    diverged_at: int | None = None  # plain SGD: the loss became NaN/Inf (the code would go on with NaN weights)
    full_checks: int = 0
    horizons: list = field(default_factory=list)


def train_point(point: PascanuPoint, seeds: list[int], ctx: JobContext | None = None, *, keys: list[str] | None = None,
                device: str | torch.device | None = None,
                loop_backend: str = "torch") -> tuple[list[dict], list[list], list[list]]:
    """Train the runs ``seeds`` of ``point`` as one batched computation.

    ``loop_backend`` is :class:`~gradprobe.experiments.rnn_trainer.RNNTrainer`'s (``"numpy"``: the step loop
    in NumPy, CPU only, exact NumPy tanh, so not with ``point.fast_tanh``). It is a way of computing, not
    part of the point: the run keys and seeds do not depend on it, and in float32 its results differ from
    the torch loop's at the rounding level (``EXPERIMENTS.md`` was produced with ``"torch"``, the default).

    Returns ``(results, metrics, arrays)``, one list per seed, in the order of ``seeds``; ``metrics``
    rows are ``(update, name, value)`` written at every validation: ``valid_error`` (%, on the full set;
    ``screen_error`` when only screened), ``train_loss`` and ``grad_norm`` (means since the last check),
    ``omega``, ``rho`` (spectral radius of W_rec), ``horizon`` and ``decay_rate`` of the probe's
    temporal profile. ``arrays`` hold the temporal profile ``‖∂E/∂h_t‖`` (``temporal_profile``) at each check.
    """
    task = make_task(point.task)
    head = head_for(task)
    dtype = getattr(torch, point.dtype)
    K = len(seeds)
    if K > 1 and point.task in OWN_LENGTH_TASKS:
        raise ConfigError(f"{point.task} draws its own length per batch, so its seeds cannot share one batched "
                          "computation; train them one per job")
    keys = keys or [str(s) for s in seeds]
    clip, use_omega = METHODS[point.method]
    clip = point.clip if clip is not None else None
    activation = PASCANU_INITS[point.init]
    point_seed = derive_seed(asdict(point), "lengths")
    lengths = _Lengths(point.min_length, point.max_length, point_seed)
    val_lengths = _Lengths(point.min_length, point.max_length, derive_seed(asdict(point), "valid-lengths"))
    g_train = [_gen(derive_seed(s, "train")) for s in seeds]
    g_valid = [_gen(derive_seed(s, "valid")) for s in seeds]
    params = init_params(task.n_in, point.n_hidden, task.n_out, point.init, [_gen(derive_seed(s, "init")) for s in seeds],
                         dtype=dtype, device=device)
    states = [_ModelState() for _ in seeds]
    metrics: list[list] = [[] for _ in seeds]
    arrays: list[list] = [[] for _ in seeds]
    start = 0
    resumed = ctx.resume() if ctx is not None else None
    if resumed is not None:
        start, saved = resumed
        params = RNNParams(**{n: torch.from_numpy(saved[n].copy()).to(dtype=dtype, device=device) for n in ("U", "R", "b", "V", "c")})
        for i, g in enumerate(g_train):
            g.set_state(torch.from_numpy(saved[f"g_train{i}"].copy()))
            g_valid[i].set_state(torch.from_numpy(saved[f"g_valid{i}"].copy()))
        lengths.g.set_state(torch.from_numpy(saved["g_lengths"].copy()))
        val_lengths.g.set_state(torch.from_numpy(saved["g_val_lengths"].copy()))
        states = [_ModelState(**d) for d in json.loads(bytes(saved["states"]).decode())]

    def make_trainer(p):
        return RNNTrainer(p, activation=activation, head=head, lr=point.lr, clip=clip,
                          alpha=point.alpha if use_omega else 0.0, keep_state_grads=True, fast_tanh=point.fast_tanh,
                          loop_backend=loop_backend)

    sums = np.zeros((K, 4))  # loss, norm, omega, count since the last check
    n = start
    active = [i for i in range(K) if states[i].active]
    trainer = make_trainer(RNNParams.stack([params.select(i) for i in active])) if active else None

    def validate(idx: list[int], size: int) -> np.ndarray:
        wrong = np.zeros(len(idx))
        chunk = min(point.val_chunk, size)
        sub = RNNTrainer(RNNParams.stack([trainer.p.select(active.index(i)) for i in idx]), activation=activation,
                         head=head, fast_tanh=point.fast_tanh, loop_backend=loop_backend)
        for _ in range(size // chunk):
            L = val_lengths.next()
            bs = [task.generate(chunk, L, g_valid[i]) for i in idx]
            x, y = _stack_batches(bs, head, dtype)
            _, w = sub.evaluate(x.to(params.R.device), y.to(params.R.device), task)
            wrong += w.sum(-1).cpu().numpy()
        return 100.0 * wrong / size

    while active and n < point.max_updates:
        n += 1
        L = lengths.next()
        bs = [task.generate(point.batch, L, g_train[i]) for i in active]
        x, y = _stack_batches(bs, head, dtype)
        st = trainer.step(x.to(params.R.device), y.to(params.R.device))
        loss = st.loss.cpu().numpy()
        sums[active, 0] += loss
        sums[active, 1] += st.norm.cpu().numpy()
        sums[active, 2] += st.omega.cpu().numpy()
        sums[active, 3] += 1
        if clip is not None:
            for j, f in enumerate(st.fallback.cpu().numpy()):
                states[active[j]].fallbacks += int(f)
        if clip is None:
            bad = [active[j] for j in np.flatnonzero(~np.isfinite(loss))]
            for i in bad:  # plain SGD has no guard in the authors' code: the run is lost
                states[i].diverged_at, states[i].active = n, False
        if n % point.val_every == 0 or n == point.max_updates:
            alive = [i for i in active if states[i].active]
            flows = trainer.temporal_flows()
            rho = _spectral_radius(trainer.p.R)
            errors = {}
            if alive:
                if point.screen_size > 0:
                    screen = dict(zip(alive, validate(alive, point.screen_size)))
                    full = [i for i in alive if screen[i] < 1.0]
                    errors = {i: (screen[i], False) for i in alive}
                else:
                    full = alive
                if full:
                    errors.update({i: (e, True) for i, e in zip(full, validate(full, point.val_size))})
            for j, i in enumerate(active):
                s = states[i]
                c = max(sums[i, 3], 1)
                row = [(n, "train_loss", sums[i, 0] / c), (n, "grad_norm", sums[i, 1] / c), (n, "rho", float(rho[j]))]
                if use_omega:
                    row.append((n, "omega", sums[i, 2] / c))
                fl = flows[j]
                if np.isfinite(fl.per_sequence).all():
                    h = fl.horizon()
                    s.horizons.append(h)
                    row += [(n, "horizon", h), (n, "decay_rate", fl.decay_rate)]
                    arrays[i].append((n, "temporal_profile", fl.grad_norm))
                if i in errors:
                    e, is_full = errors[i]
                    row.append((n, "valid_error" if is_full else "screen_error", e))
                    if is_full:
                        s.full_checks += 1
                        s.last_error = e
                        s.best_error = min(s.best_error, e)
                        if e < 1.0 and s.below1_at is None:
                            s.below1_at = n
                        if e < 1e-4:  # the code: error < .0001 (percent) ⇒ 0 errors of 10,000
                            s.solved_at, s.active = n, False
                metrics[i] += row
            sums[:] = 0.0
            still = [i for i in active if states[i].active]
            if still != active:
                keep = [active.index(i) for i in still]
                for j, i in enumerate(active):  # keep the final weights of the runs that stopped
                    params = _put(params, i, trainer.p, j)
                active = still
                trainer = make_trainer(RNNParams.stack([trainer.p.select(j) for j in keep])) if active else None
            if ctx is not None:
                ctx.progress(n / point.max_updates)
                if ctx.due():
                    full_params = params
                    for j, i in enumerate(active):
                        full_params = _put(full_params, i, trainer.p, j)
                    tensors = {**full_params.tensors(), "g_lengths": lengths.g.get_state(),
                               "g_val_lengths": val_lengths.g.get_state(),
                               "states": np.frombuffer(json.dumps([asdict(s) for s in states]).encode(), dtype=np.uint8)}
                    for i in range(K):
                        tensors[f"g_train{i}"] = g_train[i].get_state()
                        tensors[f"g_valid{i}"] = g_valid[i].get_state()
                    ctx.checkpoint(n, tensors, dict(zip(keys, metrics)), dict(zip(keys, arrays)))
                    metrics = [[] for _ in seeds]
                    arrays = [[] for _ in seeds]
    if trainer is not None:
        for j, i in enumerate(active):
            params = _put(params, i, trainer.p, j)
    results = []
    for i, s in enumerate(states):
        hz = s.horizons
        results.append(dict(
            solved=s.solved_at is not None, solved_at=s.solved_at,
            below_1pct=s.below1_at is not None, below_1pct_at=s.below1_at,
            best_valid_error=None if s.full_checks == 0 else s.best_error,
            last_valid_error=None if s.full_checks == 0 else s.last_error,
            updates=s.solved_at or s.diverged_at or n, diverged_at=s.diverged_at, fallback_steps=s.fallbacks,
            horizon_first=hz[0] if hz else None, horizon_last=hz[-1] if hz else None,
            horizon_median=float(np.median(hz)) if hz else None,
            rho_final=float(_spectral_radius(params.R[i : i + 1])[0]),
        ))
    return results, metrics, arrays


def _put(dst: RNNParams, i: int, src: RNNParams, j: int) -> RNNParams:
    out = dst.clone()
    for name in ("U", "R", "b", "V", "c"):
        getattr(out, name)[i] = getattr(src, name)[j]
    return out


# ------------------------------------------------------------------------------------------ experiment
class Pascanu2013(Experiment):
    name = "pascanu2013"
    title = "Pascanu, Mikolov & Bengio 2013: success rate of SGD, SGD-C and SGD-CR (Fig. 7)"
    version = "2"  # 2: Ω from the backward loop's δ (float32 rounding differs from 1)
    paper = "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural networks"

    def config(self, profile: str) -> tuple[PascanuConfig, ...]:
        """The profile's configurations (one, or several grids whose points are joined)."""
        self._check_profile(profile)
        cfg = PROFILES[profile]
        return cfg if isinstance(cfg, tuple) else (cfg,)

    def jobs(self, config: tuple[PascanuConfig, ...]) -> list[Job]:
        out = []
        for cfg, p in [(c, p) for c in config for p in c.points()]:
            runs = tuple(self.spec(p, s) for s in range(cfg.seeds))
            label = f"{p.task} {p.init} L={p.length_label} {p.method}"
            if p.task in OWN_LENGTH_TASKS:  # one model per job (see train_point)
                out += [Job((r,), f"{label} seed {r.seed}") for r in runs]
            else:
                out.append(Job(runs, label))
        return out

    def run_job(self, job: Job, ctx: JobContext) -> dict[str, RunOutput]:
        point = PascanuPoint(**job.config)
        results, metrics, arrays = train_point(point, [r.seed for r in job.runs], ctx, keys=job.keys)
        return {k: RunOutput(r, m, a) for k, r, m, a in zip(job.keys, results, metrics, arrays)}

    def report(self, runs, store, out_dir):
        return pascanu_report(self, runs, store, out_dir)
