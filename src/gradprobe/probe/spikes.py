"""Watch every training step for gradient spikes: detection on the device, a flight recorder, an opt-in guard.

Pascanu, Mikolov & Bengio (2013) define the exploding gradient problem as "the large increase in the
norm of the gradient during training". :class:`SpikeWatch` looks for such increases at every step,
whatever the probe's schedule records, and names the layer where each one started.

**Channels.** Per step ``t``: the norm of every layer's parameter gradient ``‖∇θ_l‖₂`` (``L``
channels, as :class:`~gradprobe.probe.GradRecorder` measures it: after accumulation, before
clipping), the total ``‖∇θ‖₂ = √(Σ_l ‖∇θ_l‖²)`` (Pascanu's ``‖g‖`` over all parameters
concatenated) and, when ``step(loss)`` is given one, the loss. Each channel is watched in log space,
``x_t = ln v_t``; a value ``v_t = 0`` (no gradient reached the layer) or a loss ``≤ 0`` is not used.

**Statistic** (robust, so earlier spikes do not hide later ones). Over the previous ``window`` = W
steps of a channel, ``m`` = median of ``x`` (the lower middle value for an even count, as
``torch.median``) and ``s = 1.4826 · median(|x − m|)`` (the median absolute deviation, scaled to
equal σ for normally distributed ``x``). A channel spikes at step ``t`` when

    x_t − m > max(k · s, ln r_min)        (defaults k = 6, r_min = 3, W = 128)

i.e. its value is more than ``k`` robust standard deviations above its rolling median *and* at least
``r_min`` times that median; a NaN or ±Inf gradient norm or loss always spikes. A channel needs
``min_history`` finite values before it can jump. ``m`` and ``s`` are recomputed every ``refresh``
steps (the median is the costly part), so the statistic a step is compared with is at most
``refresh − 1`` steps old; steps that spiked stay in the window (the median ignores them, and a
lasting change of scale becomes the new normal after about W/2 steps). A step is flagged when the
total norm or the loss spikes (a non-finite layer makes the total non-finite); the layers' own
channels say where it started. ``per_layer=True`` also flags a step on one layer's jump alone
(it catches a small layer exploding before it moves the total, at the price of more alarms: a
single layer's gradient norm is noisier than the total). Flagged steps at most ``merge`` steps apart form one :class:`~gradprobe.trace.SpikeEvent`,
whose evidence is that of its first step: the spiking layers in backward order (the first is where
the explosion entered the backward pass), the layer with the largest ratio to its own median, the
total norm's and the loss's jump ``v / exp(m)``, whether clipping caught it.

**Cost, and when the host learns of a spike.** The statistics live on the device in ring buffers;
a step adds about twenty tiny tensor operations and reuses the gradient norms the
:class:`~gradprobe.probe.GradRecorder` computed when it recorded the step (otherwise it computes
them: one fused ``_foreach_norm``). Detection alone never synchronises per step: the host looks at
the flags every ``check_every`` steps (one small copy; two when something spiked), and at
``diagnose()`` and ``close()``. The guard (``on_spike``) needs a host decision before the optimizer
step, so it costs one device→host synchronisation of a flag per step (and, under
``torch.distributed``, one ``all_reduce`` of that flag: the decision is the OR across ranks, so
every rank skips or stops together).

**Flight recorder.** The last ``flight`` = N ≤ W steps of every channel are in the ring at all
times (for every step, not only the recorded ones); when a spike is found they are copied into the
event (:class:`~gradprobe.trace.FlightRecord`), next to the detection band in force at each step and
whether clipping scaled it. That is the default, watcher-only flight record: it costs nothing beyond
the watch. ``full_flight=True`` (``Probe(model, spikes="full")``) adds the *full* flight recorder
(:mod:`gradprobe.probe.flight`): a private twin of each of the session's recorders runs on every
step, so the flight record also holds the output-gradient norms ‖∂L/∂h_l‖, activation norms, weight
norms, one-step update ratios, unit statistics (saturated, dead), the temporal (BPTT) profiles
‖∂E/∂h_k‖ with ``temporal=True``, and what users' recorders measure when they provide a twin
(:meth:`~gradprobe.probe.Recorder.flight_twin`; those that do not are listed in the record's
``not_recorded``), of each of those steps, whatever the schedule records; the session's own records are
exactly what they are without it. On the steps the schedule records anyway, the twins of the twins
reuse the session's numbers (``flight_reuse``; the weights' where its update ratio spans that one step). Its cost is that of the recorders at every step
(their hooks, one more copy of the parameters for the update ratio, and for a fused RNN the unrolled
replica), outside the overhead budget: measured in ``BENCHMARKS.md``. Under data parallelism the hook
quantities are combined over the ranks at a guarded (collective) spike decision and labelled this
rank's own otherwise (``FlightRecord.rank_local``; see :mod:`gradprobe.probe.flight`).

**Memory bound** (``C = L + 2`` channels, ``S = W/refresh + 2`` snapshots of the statistic): on the
device ``9·W·C + 24·S·C + 3·W + 33·C + 8·S + 9`` bytes (float64 values, bool flags; W = 128, 20 layers:
36,111 bytes, :meth:`SpikeWatch.flight_nbytes`; 1000 layers: 1.6 MB); on the host at most
``max_events`` events, each with ``N·(L + 9)`` numbers. The full flight recorder adds its ring and a
parameter snapshot (bound in :mod:`gradprobe.probe.flight`: 60,616 + 5,010,472 bytes for that MLP).

**Confirmation** (``confirm``). By default a jump of the total gradient norm alone is an alarm. Late
in a healthy AdamW run, single steps of a near-zero gradient jump 3–110× above their rolling median
(6–17 robust σ), and a few of those batches' loss too (3–11× a loss of 0.003; measured on the test
suite's converged transformer). Both published rules are scale-free and flag such steps: OLMo-core's
stability monitor (mean + 6σ of the last 128 values, the loss and the gradient norm each on its own)
flags 5 of them, and any relative loss rule (Lightning's ``SpikeDetection``: the loss ≥ 3× its running
mean) flags the 11× one. What tells them from a harmful spike is scale: a loss spike of 0.025 after the
loss came down from 2.5 undoes 1 % of the training's progress; a corrupted batch or a bad update undoes
it many times over. ``confirm="loss"`` makes a step an alarm only when

    the loss spikes too (the rule above on the loss channel), and
    loss − m_L ≥ setback · (ref − m_L)        (default setback = 0.1),

``m_L`` the loss's rolling median and ``ref`` the largest rolling median the loss has had so far (the
progress made is ``ref − m_L``; early in training it is about 0, and any loss spike confirms), or when
the total gradient norm or the loss is not finite. The guard acts on alarms only and the verdict counts
only them; a spike the loss does not confirm is still an event, with ``confirmed=False``, its layers
named and its ``loss_setback`` share, so nothing is hidden from the report. The price: a gradient
explosion that has not reached the loss (a layer whose backward blows up) is reported but not acted on
at its step (its update, applied, shows in the next step's loss, which is then an alarm).

**Clipping.** The probe sees the gradient before any clipping, so it needs to be told the
threshold: ``clip=`` a number (``max_norm``), or the clipper itself (anything with a ``max_norm``
attribute, e.g. :class:`gradprobe.remedies.GradClipper`; for ``AutoClip``, whose threshold changes
at every call, the threshold of its previous call). A step counts as clipped when
``‖∇θ‖ + 10⁻⁶ > max_norm``, exactly when ``torch.nn.utils.clip_grad_norm_`` scales it down.

**Guard.** ``on_spike="warn"`` issues a :class:`SpikeWarning`; ``"skip"`` sets every parameter's
``.grad`` to ``None`` so that ``optimizer.step()`` leaves the parameters *and* the optimizer state
(momenta, Adam moments and step counts) exactly as they were (PyTorch optimizers skip parameters
without a gradient); ``"raise"`` raises :class:`~gradprobe.errors.GradientSpikeError` carrying the
event. Call ``probe.step()`` after ``backward()`` and *before* clipping and ``optimizer.step()``.
With ``GradScaler``, check ``probe.skipped`` and do not call ``scaler.step`` on a skipped step (it
expects gradients).

>>> import torch
>>> from torch import nn
>>> from gradprobe.probe import Session
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
>>> opt = torch.optim.SGD(net.parameters(), lr=0.01)
>>> with Session(net, spikes=True, on_spike="skip", budget=None) as s:
...     for step in range(40):
...         x = torch.randn(32, 4) * (1000.0 if step == 30 else 1.0)   # one corrupted batch
...         opt.zero_grad(); loss = net(x).pow(2).mean(); loss.backward()
...         _ = s.step(loss); opt.step()
...     log = s.spikes.log()
>>> log.steps, log.events[0].action, log.events[0].layer
([30], 'skipped', '2')
"""
from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from gradprobe.errors import ConfigError, GradientSpikeError
from gradprobe.functional.norms import grouped_norms
from gradprobe.functional.transfer import to_host
from gradprobe.probe.flight import FullFlight, flight_twins, local_keys
from gradprobe.probe.distributed import local_part
from gradprobe.probe.params import GradRecorder, _sharded_norms
from gradprobe.probe.recorder import Context, Contribution, Deferred, Recorder
from gradprobe.trace import ChannelJump, FlightRecord, SpikeEvent, SpikeLog, Table

__all__ = ["SpikeWatch", "SpikeWarning", "GUARDS", "CONFIRMS", "MAD_TO_SIGMA"]

#: the guard's actions (``None``: detect only)
GUARDS = ("warn", "skip", "raise")
#: what confirms a gradient spike as an alarm (``None``: nothing needed; ``"loss"``: the loss spikes too)
CONFIRMS = (None, "loss")
#: 1/Φ⁻¹(3/4): the MAD of a normal distribution times this is its σ
MAD_TO_SIGMA = 1.4826
_FAST_DTYPES = {torch.float32, torch.float64}
_NO_THRESHOLD = 1e300  # "cannot spike yet": finite, so that an infinite value still exceeds it
_ACTION_OF = {None: "recorded", "warn": "warned", "skip": "skipped", "raise": "raised"}


class SpikeWarning(RuntimeWarning):
    """A gradient spike was detected (``on_spike="warn"``)."""


class _Action:
    """What :meth:`SpikeWatch.observe` tells the session about this step."""

    __slots__ = ("changed", "error")

    def __init__(self, changed: bool, error: GradientSpikeError | None = None):
        self.changed, self.error = changed, error


class _State:
    """The watch's device tensors: rings over the last W steps and the working row, with every view
    a step needs made once (indexing a tensor from Python costs about as much as a small kernel)."""

    def __init__(self, n: int, window: int, snapshots: int, device: torch.device, per_layer: bool):
        C, W = n + 2, window
        f = dict(device=device, dtype=torch.float64)
        b = dict(device=device, dtype=torch.bool)
        self.hist = torch.full((C, W), math.nan, **f)  # x = ln v per channel and step
        self.fl = torch.zeros((C, W), **b)  # which channels spiked
        self.flags = torch.zeros(W, **b)  # the step was flagged
        self.alarm = torch.zeros(W, **b)  # the step was an alarm (confirm="loss": the loss spiked, or non-finite)
        self.clip = torch.zeros(W, **b)  # clipping scaled the step down
        self.snap = torch.full((snapshots, 3, C), math.nan, **f)  # (m, s, threshold) at each refresh
        self.med = torch.zeros(C, **f)
        self.thr = torch.full((C,), _NO_THRESHOLD, **f)
        self.buf = torch.empty(C, **f)  # this step: ‖∇θ_l‖² (L), ‖∇θ‖² (1), loss² (1), then their logs
        self.tmp = torch.empty(C, **f)
        self.flagged = torch.empty(C, **b)
        self.sq, self.total, self.loss = self.buf[:n], self.buf[n:n + 1], self.buf[n + 1]
        self.grads, self.grads_flagged = self.buf[:n + 1], self.flagged[:n + 1]  # the L layers and the total
        self.total0 = self.buf[n]
        self.trigger = self.flagged if per_layer else self.flagged[n:]
        self.nonfinite = torch.empty((), **b)
        self.loss_flagged = self.flagged[n + 1]
        self.ref = torch.full((), -math.inf, **f)  # confirm="loss": the largest rolling median of ln loss so far
        self.refs = torch.full((snapshots,), -math.inf, **f)  # ... at each refresh
        self.cols = [(self.hist[:, i], self.fl[:, i], self.flags[i], self.clip[i], self.alarm[i]) for i in range(W)]


class SpikeWatch(Recorder):
    """Detect gradient spikes every step on the device; see the module docstring for the statistic.

    Args:
        window: W, steps in the rolling median and MAD (default 128).
        k: robust standard deviations above the median that make a spike (default 6).
        min_jump: r_min, the least ratio to the rolling median that is a spike (default 3).
        min_history: finite values a channel needs before it can jump (default 16).
        refresh: steps between recomputations of the median and MAD (default 8).
        flight: N, steps kept in each event's flight record (default 32, at most ``window``).
        merge: flagged steps at most this many steps apart are one event (default 8; 0: one event per step).
        per_layer: one layer's jump alone flags the step (default False: the total or the loss must jump).
        loss: watch the loss passed to ``step(loss)`` (default True).
        clip: the clipping threshold (a number) or the clipper (an object with ``max_norm``).
        on_spike: ``None`` (detect), ``"warn"``, ``"skip"`` or ``"raise"`` (see the module docstring).
        check_every: with ``on_spike=None``, steps between host checks of the flags (default 32).
        max_events: events kept (later ones are counted in ``SpikeLog.dropped``; default 32).
        process_group: the ``torch.distributed`` group whose ranks decide together (default: the
            world, when the default process group is initialised).
        full_flight: the full flight recorder (every recorder's quantities at every step of the flight
            record: the built-in ones', and a user recorder's if it has a
            :meth:`~gradprobe.probe.Recorder.flight_twin`; :mod:`gradprobe.probe.flight`); default False
            (the watcher's quantities only).
            A list of recorder names (``["outputs", "units"]``) twins only those (``"weights"`` costs the
            most on feed-forward models: one more parameter snapshot, read and written every step;
            ``"temporal"`` on recurrent ones: the unrolled replica every step); the others are listed in
            the flight record's ``not_recorded``.
        flight_reuse: on a step the schedule records, the flight takes the session recorders' own numbers
            for the twins that would measure the same (outputs, units, temporal, and the weights where the
            session's update ratio spans that one step; bit for bit the session's) and those twins sit the
            step out (default True; False: every twin runs every step; a list of recorder names: only
            those twins reuse).
        confirm: ``None`` (default: a gradient spike alone is an alarm) or ``"loss"`` (an alarm needs the
            loss to spike too, by at least ``setback`` of its progress, or a non-finite value; other spikes
            are recorded with ``confirmed=False``).
        setback: with ``confirm="loss"``, the least share of the progress the loss made (its largest rolling
            median minus the current one) that the spiking loss must rise above its median (default 0.1).
    """

    name = "spikes"
    scheduled = False  # not driven by the schedule: it observes every step

    def __init__(self, *, window: int = 128, k: float = 6.0, min_jump: float = 3.0, min_history: int = 16,
                 refresh: int = 8, flight: int = 32, merge: int = 8, per_layer: bool = False, loss: bool = True, clip=None,
                 on_spike: str | None = None, check_every: int = 32, max_events: int = 32, process_group=None,
                 full_flight: bool | Sequence[str] = False, confirm: str | None = None, setback: float = 0.1,
                 flight_reuse: bool = True):
        super().__init__()
        window, min_history, refresh, flight = int(window), int(min_history), int(refresh), int(flight)
        if window < 8:
            raise ConfigError(f"SpikeWatch(window={window}) must be at least 8 steps")
        if not 2 <= min_history <= window:
            raise ConfigError(f"SpikeWatch(min_history={min_history}) must be within [2, window={window}]")
        if not 1 <= refresh <= window:
            raise ConfigError(f"SpikeWatch(refresh={refresh}) must be within [1, window={window}]")
        if not 1 <= flight <= window:
            raise ConfigError(f"SpikeWatch(flight={flight}) must be within [1, window={window}] steps")
        if not (float(k) > 0 and math.isfinite(k)):
            raise ConfigError(f"SpikeWatch(k={k}) must be a positive number of robust standard deviations")
        if not (float(min_jump) > 1 and math.isfinite(min_jump)):
            raise ConfigError(f"SpikeWatch(min_jump={min_jump}) must be a ratio above 1, e.g. 3")
        if on_spike not in (None, *GUARDS):
            raise ConfigError(f"on_spike={on_spike!r} must be None (detect only) or one of {GUARDS}")
        limit = window - flight + 1
        if not 1 <= int(check_every) <= limit:
            raise ConfigError(f"SpikeWatch(check_every={check_every}) must be within [1, window − flight + 1 = {limit}] "
                              "so that a spike's flight record is still in the ring when the host looks")
        if confirm not in CONFIRMS:
            raise ConfigError(f"SpikeWatch(confirm={confirm!r}) must be one of {CONFIRMS} (None: a gradient spike alone "
                              "is an alarm; 'loss': only a step whose loss spikes too, or a non-finite one)")
        if not (0.0 <= float(setback) < math.inf):
            raise ConfigError(f"SpikeWatch(setback={setback}) must be a fraction ≥ 0 of the progress the loss made "
                              "(0: any loss spike confirms)")
        if confirm == "loss" and not loss:
            raise ConfigError("SpikeWatch(confirm='loss') needs the loss watched (loss=True) and passed to probe.step(loss)")
        if int(merge) < 0 or int(max_events) < 1:
            raise ConfigError(f"SpikeWatch(merge={merge}) must be at least 0 and max_events={max_events} at least 1")
        self.window, self.k, self.min_jump, self.min_history = window, float(k), float(min_jump), min_history
        self.refresh, self.flight, self.merge, self.watch_loss = refresh, flight, int(merge), bool(loss)
        self.per_layer = bool(per_layer)
        self.on_spike, self.check_every, self.max_events = on_spike, int(check_every), int(max_events)
        self.process_group = process_group
        if isinstance(full_flight, str) or not (isinstance(full_flight, bool) or isinstance(full_flight, Sequence)):
            raise ConfigError(f"SpikeWatch(full_flight={full_flight!r}) must be True, False or a list of recorder names")
        self.full_flight = full_flight if isinstance(full_flight, bool) else tuple(full_flight)
        self.confirm, self.setback = confirm, float(setback)
        if isinstance(flight_reuse, str) or not (isinstance(flight_reuse, bool) or isinstance(flight_reuse, Sequence)):
            raise ConfigError(f"SpikeWatch(flight_reuse={flight_reuse!r}) must be True, False or a list of recorder names")
        self.flight_reuse = flight_reuse if isinstance(flight_reuse, bool) else tuple(flight_reuse)
        self._twins: list[Recorder] = []
        self._pairs: list = []
        self._not_recorded: list[str] = []
        self._combined = None  # (step index, the flight combined over the ranks at the guard's decision)
        self._combine = True  # the session combines over data-parallel ranks (mirror)
        self._full: FullFlight | None = None
        self.clip_source, self._clipper, self._max_norm = _clip_source(clip)
        self.events: list[SpikeEvent] = []
        self.dropped = 0
        self._latest: SpikeEvent | None = None
        self.skipped = False  # the current step's update was skipped (until the next step)
        self._ctx: Context | None = None
        self._state = None
        self._t = 0  # steps observed
        self._checked = 0  # steps the host has looked at
        self._step0 = 0  # the session step number of the first observed step
        self._refreshes: deque[tuple[int, int]] = deque(maxlen=window // refresh + 2)  # (step index, slot)
        self._max_norms: deque[float] = deque(maxlen=window)

    @classmethod
    def from_options(cls, spikes, on_spike: str | None = None, recorders=()) -> SpikeWatch | None:
        """The watch a session's ``spikes=`` / ``on_spike=`` options stand for (``None``: no watch)."""
        if any(isinstance(r, SpikeWatch) for r in recorders):
            raise ConfigError("pass a SpikeWatch as Probe(model, spikes=SpikeWatch(...)), not in recorders=[...]")
        if on_spike not in (None, *GUARDS):
            raise ConfigError(f"on_spike={on_spike!r} must be None (detect only) or one of {GUARDS}")
        if isinstance(spikes, SpikeWatch):
            if on_spike is not None and spikes.on_spike not in (None, on_spike):
                raise ConfigError(f"on_spike={on_spike!r} contradicts SpikeWatch(on_spike={spikes.on_spike!r}); give it once")
            if on_spike is not None:
                spikes.on_spike = on_spike
            return spikes
        if spikes is True or (on_spike is not None and spikes in (False, None)):
            return cls(on_spike=on_spike)
        if isinstance(spikes, str) and spikes == "full":
            return cls(on_spike=on_spike, full_flight=True)
        if spikes is False or spikes is None:
            return None
        raise ConfigError(f"spikes={spikes!r} must be True, 'full' (with the full flight recorder), False or a "
                          "gradprobe.probe.SpikeWatch")

    def mirror(self, recorders, combine: bool = True) -> None:
        """With ``full_flight``: take a twin of each of the session's recorders that has one, and note
        those without (called by the session before :meth:`install`; see :mod:`gradprobe.probe.flight`).
        ``combine``: the session combines its records over data-parallel ranks (``Probe(distributed=False)``:
        it does not, and neither does the flight: every key of a rank's flight is its own)."""
        self._combine = bool(combine)
        pairs, missing = flight_twins(recorders) if self.full_flight else ([], [])
        if isinstance(self.full_flight, tuple):
            names = [r.name for _, r in pairs]
            unknown = sorted(set(self.full_flight) - set(names))
            if unknown:
                raise ConfigError(f"SpikeWatch(full_flight={list(self.full_flight)}): {unknown} have no flight twin in "
                                  f"this probe; its recorders with one are {names}")
            missing += [r.name for _, r in pairs if r.name not in self.full_flight]
            pairs = [(s, r) for s, r in pairs if r.name in self.full_flight]
        if isinstance(self.flight_reuse, tuple) and self.full_flight:
            names = [r.name for _, r in pairs]
            unknown = sorted(set(self.flight_reuse) - set(names))
            if unknown:
                raise ConfigError(f"SpikeWatch(flight_reuse={list(self.flight_reuse)}): {unknown} have no flight twin in "
                                  f"this probe; its twins are {names}")
        self._pairs = pairs
        self._twins = [r for _, r in pairs]
        self._not_recorded = missing

    def config(self) -> dict:
        return {"window": self.window, "k": self.k, "min_jump": self.min_jump, "min_history": self.min_history,
                "refresh": self.refresh, "flight": self.flight, "merge": self.merge, "per_layer": self.per_layer,
                "loss": self.watch_loss, "confirm": self.confirm,
                "full_flight": self.full_flight if isinstance(self.full_flight, bool) else list(self.full_flight),
                "setback": self.setback if self.confirm else None,
                "flight_recorders": [r.name for r in self._twins],
                "flight_not_recorded": list(self._not_recorded) if self.full_flight else [],
                "flight_reuse": self.flight_reuse if isinstance(self.flight_reuse, bool) else list(self.flight_reuse),
                "on_spike": self.on_spike, "check_every": self.check_every, "max_events": self.max_events,
                "clip": {"source": self.clip_source, "max_norm": self._max_norm}}

    # ------------------------------------------------------------------ install
    def install(self, ctx: Context) -> None:
        self._ctx = ctx
        self._params = [p for layer in ctx.layers for p in layer.params]
        self._owner = [layer.index for layer in ctx.layers for _ in layer.params]
        self._names = tuple(layer.name for layer in ctx.layers)
        self.n = len(ctx.layers)
        self._one_device = len({p.device for p in self._params}) <= 1
        # sharded parameters (FSDP2's DTensor): norms from the local shards, squares summed over the mesh
        self._groups = [local_part(p)[1] for p in self._params]
        self._sharded = any(g is not None for g in self._groups)
        self._owners: dict = {}
        if self.full_flight:
            # the host looks every check_every steps: a spike's N steps must still be in the ring then
            # a guarded data-parallel run combines the ranks' flights at the spike: the units twins then keep
            # what a table of the global batch needs (every unit's dead flag)
            combined = self._combine and self.on_spike is not None and self._world()[1] > 1
            self._full = FullFlight(self._pairs, self.flight + self.check_every - 1, self._not_recorded,
                                    reuse=self.flight_reuse, per_unit=combined)
            self._full.install(ctx)

    def follow(self) -> None:
        """Called by the session after it armed its recorders for the coming step: the full flight
        recorder's twins sit out the steps their session recorder records (its numbers are reused)."""
        if self._full is not None:
            self._full.follow()

    def reset(self) -> None:
        if self._full is not None:
            self._full.reset()

    def remove(self) -> None:
        self._state = None
        self._owners = {}
        if self._full is not None:
            self._full.remove()
            self._full = None

    def flight_nbytes(self) -> dict[str, int]:
        """Bytes the watch holds on the device now: ``"watch"`` (its rings and statistics), and with the
        full flight recorder ``"ring"`` (the twins' numbers of the last steps) and ``"snapshot"`` (the
        update-ratio twin's copy of the parameters). See the memory bounds in the module docstrings."""
        st = self._state
        out = {"watch": 0 if st is None else sum(t.untyped_storage().nbytes() for t in (
            st.hist, st.fl, st.flags, st.alarm, st.clip, st.snap, st.med, st.thr, st.buf, st.tmp, st.flagged, st.nonfinite,
            st.ref, st.refs))}
        if self._full is not None:
            out.update(self._full.nbytes())
        return out

    # ------------------------------------------------------------------ device side
    def _alloc(self, device: torch.device) -> None:
        self._state = _State(self.n, self.window, self._refreshes.maxlen, device, self.per_layer)
        self._device = device

    def _owner_index(self, key) -> torch.Tensor:
        idx = self._owners.get(key)
        if idx is None:
            own = self._owner if key is None else [self._owner[k] for k in key]
            idx = self._owners[key] = torch.tensor(own, dtype=torch.long, device=self._device)
        return idx

    def _norms(self, grads: list[torch.Tensor], parts, key=None) -> torch.Tensor:
        """(P_present,) ‖g‖₂ of each present gradient: the GradRecorder's when it recorded this step.

        ``key``: the indices of the present gradients among the watched parameters (``None``: all). A
        sharded gradient (FSDP2) is read through its local shard and its square summed over the mesh
        (one small collective on the norms): every rank sees the unsharded model's norms."""
        for rec, c in parts:
            if isinstance(rec, GradRecorder) and isinstance(c, Deferred) and c.tensors:
                t = c.tensors[0]
                if t.shape == (len(grads),) and t.device == self._device:
                    return t
        if not grads:
            return torch.zeros(0, dtype=torch.float64, device=self._device)
        groups = None
        if self._sharded:
            groups = self._groups if key is None else [self._groups[i] for i in key]
            grads = [local_part(g)[0] for g in grads]
        if self._one_device and {g.dtype for g in grads} <= _FAST_DTYPES and not any(g.is_sparse for g in grads):
            norms = torch.stack(torch._foreach_norm(grads, 2))
        else:
            norms = grouped_norms(grads, device=self._device)
        if groups is not None:
            norms = _sharded_norms(norms, groups)
        return norms

    def _refresh_stats(self, t: int) -> None:
        """m, s and the threshold of every channel from the ring (steps before ``t``)."""
        st = self._state
        h = st.hist
        clean = torch.where(torch.isfinite(h), h, math.nan)  # zero norms (−inf) and non-finite values do not count
        med = clean.nanmedian(dim=1).values
        sig = (clean - med[:, None]).abs().nanmedian(dim=1).values.mul_(MAD_TO_SIGMA)
        thr = torch.clamp(sig * self.k, min=math.log(self.min_jump))
        enough = torch.isfinite(clean).sum(dim=1) >= self.min_history
        st.thr.copy_(torch.where(enough, thr, _NO_THRESHOLD))
        st.med.copy_(torch.nan_to_num(med, nan=0.0))
        slot = (self._refreshes[-1][1] + 1) % self._refreshes.maxlen if self._refreshes else 0
        torch.stack([med, sig, st.thr], out=st.snap[slot])
        if self.confirm:  # the worst typical loss so far: the reference of the progress made
            L1 = self.n + 1
            torch.maximum(st.ref, torch.where(enough[L1], med[L1], -math.inf), out=st.ref)
            st.refs[slot].copy_(st.ref)
        self._refreshes.append((t, slot))

    @torch.no_grad()
    def observe(self, step: int, loss=None, parts=(), scaler=None) -> _Action | None:
        """Take step ``step``'s gradients (and loss): update the device statistics, and act when guarded.

        ``parts`` are the session's ``(recorder, contribution)`` pairs of this step (empty when it
        records nothing); a spike table is appended to them when the guard acted. ``scaler``: the loss
        scaler's :class:`~gradprobe.probe.amp.ScalerSnapshot` of this step (``Probe(scaler=...)``): the
        gradient norms are divided by the scale still in ``.grad`` (on the device), and a non-finite
        gradient norm is not a spike (the scaler skips such a step and lowers its scale: an fp16
        overflow, not an explosion; a non-finite loss still is). Returns ``None`` unless the spike log
        changed (the session then notes it) or training must stop.
        """
        t = self._t
        if t == 0:
            self._step0 = step
        if self._full is not None:
            self._full.take(t, scaler, parts)  # before the guard may set .grad to None
        grads = [p.grad for p in self._params]
        key = None
        if any(g is None for g in grads):
            key = tuple(i for i, g in enumerate(grads) if g is not None)
            grads = [grads[i] for i in key]
        if self._state is None:
            self._alloc(grads[0].device if grads else (self._params[0].device if self._params else torch.device("cpu")))
        st = self._state
        if t >= self.min_history and (t - self.min_history) % self.refresh == 0:
            self._refresh_stats(t)
        col = st.cols[t % self.window]  # this step's slot in every ring (views made once)
        st.sq.zero_().index_add_(0, self._owner_index(key), self._norms(grads, parts, key).to(torch.float64).square())
        torch.sum(st.sq, dim=0, keepdim=True, out=st.total)
        if self.watch_loss and isinstance(loss, torch.Tensor):
            st.loss.copy_(loss if loss.dim() == 0 else loss.reshape(-1)[0]).clamp_(min=0.0).square_()
        else:
            lv = float(loss) if (self.watch_loss and loss is not None) else 0.0
            st.loss.fill_(max(lv, 0.0) ** 2 if not math.isnan(lv) else math.nan)
        x = st.buf.log_().mul_(0.5)  # ln ‖∇θ_l‖, ln ‖∇θ‖, ln loss (−inf: 0 or not given)
        if scaler is not None and not scaler.unscaled:  # .grad holds scale·g: ln ‖g‖ = ln ‖scale·g‖ − ln scale
            sc = scaler.scale
            sc = sc.to(device=x.device, dtype=torch.float64) if isinstance(sc, torch.Tensor) else float(sc)
            st.grads.sub_(torch.log(sc) if isinstance(sc, torch.Tensor) else math.log(sc))
        col[0].copy_(x)
        torch.le(torch.sub(x, st.med, out=st.tmp), st.thr, out=st.flagged).logical_not_()  # NaN, +inf: flagged
        if scaler is not None:  # an overflow of the scaled gradients is the scaler's to skip, not a spike
            st.grads_flagged.logical_and_(torch.isfinite(st.grads))
        col[1].copy_(st.flagged)
        torch.any(st.trigger, dim=0, out=col[2])  # the step's flag, written into the ring
        if self.confirm == "loss":
            # an alarm: the loss spiked and rose by at least `setback` of the progress made (e^x − e^m ≥
            # setback·(e^ref − e^m)), or the total gradient norm or the loss is not finite (NaN, +inf)
            n = self.n
            em = st.med[n + 1].exp()
            material = (x[n + 1].exp() - em) >= (st.ref.exp() - em).clamp_(min=0.0) * self.setback
            torch.any(~(x[n:] < math.inf) & st.flagged[n:], out=st.nonfinite)
            torch.logical_or(st.loss_flagged & material, st.nonfinite, out=col[4])
        max_norm = self._current_max_norm()
        self._max_norms.append(max_norm)
        if max_norm is not None:
            torch.gt(st.total0, math.log(max_norm - 1e-6) if max_norm > 1e-6 else -math.inf, out=col[3])
        flag = col[4] if self.confirm else col[2]
        self._t = t + 1
        self.skipped = False
        if self.on_spike is None:
            return self._periodic()
        return self._guard(flag, parts)

    def _periodic(self) -> _Action | None:
        if self._t - self._checked >= self.check_every:
            return _Action(True) if self.check() else None
        return None

    def _current_max_norm(self) -> float | None:
        if self._clipper is None:
            return self._max_norm
        v = float(self._clipper.max_norm)
        return v if v > 0 and math.isfinite(v) else None

    def _guard(self, flag: torch.Tensor, parts) -> _Action | None:
        """One host decision per step (the OR across ranks under torch.distributed)."""
        decision = flag.to(torch.int32).reshape(1)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(decision, op=dist.ReduceOp.MAX, group=self.process_group)
        if not bool(decision):  # the synchronisation
            if self.confirm:  # unconfirmed spikes are still events: the host looks every check_every steps
                return self._periodic()
            self._checked = self._t
            return None
        local = bool(flag)
        t = self._t - 1
        if self._full is not None and self._combine and self._world()[1] > 1:
            # every rank is here at this step: combine the ranks' flight rings for it (one collective)
            self._combined = (t, self._full.flight(self._flight_steps(t), self.n, self.process_group, self._world()[1]))
        before = len(self.events), (self.events[-1].flagged_steps if self.events else 0), self.dropped
        self._latest = None
        try:
            self.check(remote=None if local else t)
        finally:  # (consumed by the flight record check() built: not kept until the next spike)
            self._combined = None
        event = self._latest  # the event this step started or extended
        if self.on_spike == "skip":
            for p in self._ctx.model.parameters():
                p.grad = None
            self.skipped = True
        changed = (len(self.events), (self.events[-1].flagged_steps if self.events else 0), self.dropped) != before
        if event is not None:
            parts.append((self, Contribution(tables={"spike": self._table(t)})))
        if self.on_spike == "warn" and event is not None:
            warnings.warn(event.sentence() + " (gradprobe SpikeWatch; on_spike='skip' skips such updates)",
                          SpikeWarning, stacklevel=4)
        if self.on_spike == "raise":
            ev = event if event is not None else SpikeEvent(self._step0 + t, "remote", action="raised")
            err = GradientSpikeError(ev.sentence() + "; training stopped (on_spike='raise'). The event, with the "
                                     "flight record of the steps before it, is in the error's .event and the run "
                                     "log's 'spikes' note")
            err.event = ev
            return _Action(True, err)
        return _Action(changed or event is not None)

    # ------------------------------------------------------------------ host side
    def check(self, remote: int | None = None) -> bool:
        """Copy the flags of the steps not yet looked at to the host and turn flagged steps into events.

        ``remote``: a step another rank flagged (the guard's OR) that this rank did not. Returns True
        when the spike log changed.
        """
        if self._state is None or self._checked >= self._t:
            return False
        st = self._state
        W = self.window
        todo = range(self._checked, self._t)
        self._checked = self._t
        flags = to_host([st.flags])[0]
        flagged = [t for t in todo if flags[t % W] > 0 or t == remote]
        if not flagged:
            return False
        hist, fl, clip, snap, alarm, refs = to_host([st.hist, st.fl, st.clip, st.snap, st.alarm, st.refs])
        host = {"hist": hist, "fl": fl > 0, "clip": clip > 0, "snap": snap, "flags": flags > 0, "alarm": alarm > 0,
                "refs": refs}
        rank = self._backward_position()
        for t in flagged:
            self._add(t, host, rank, remote=(t == remote and not flags[t % W]), forced=t == remote)
        return True

    def log(self) -> SpikeLog:
        """Every event so far (after a :meth:`check`, which this does not do)."""
        through = self._step0 + self._checked - 1 if self._checked else None
        return SpikeLog(tuple(self.events), through, self.config(), self.dropped)

    def _backward_position(self) -> np.ndarray:
        """(L,) position of each layer (discovery index) in backward order."""
        order = self._ctx.order
        fwd = order.forward_order()
        rank = order.backward_rank(fwd)
        pos = np.empty(self.n, dtype=np.int64)
        pos[np.asarray(fwd, dtype=np.int64)] = rank
        return pos

    def _stats_at(self, t: int, snap: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(m, s, threshold) in force at step index ``t`` (no statistic yet: m = 0, s = NaN, threshold huge)."""
        slot = None
        for r, sl in self._refreshes:
            if r <= t:
                slot = sl
        C = self.n + 2
        if slot is None:
            return np.zeros(C), np.full(C, np.nan), np.full(C, _NO_THRESHOLD)
        m, s, thr = snap[slot]
        return np.nan_to_num(m, nan=0.0), s, thr

    def _setback_at(self, t: int, loss: ChannelJump | None, host: dict) -> float | None:
        """(loss − median) / (reference − median): the share of the progress made that the step's loss undid."""
        slot = None
        for r, sl in self._refreshes:
            if r <= t:
                slot = sl
        if loss is None or slot is None or not np.isfinite(loss.median):
            return None
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            progress = float(np.exp(host["refs"][slot])) - loss.median
            return float((loss.value - loss.median) / progress) if progress > 0 else math.inf

    def _channel(self, x: float, m: float, s: float, thr: float, spiked: bool) -> ChannelJump:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            value = float(np.exp(x))
            median = float(np.exp(m)) if thr < _NO_THRESHOLD else math.nan
            jump = value / median if median > 0 else math.nan
            z = float((x - m) / s) if thr < _NO_THRESHOLD and s > 0 else math.nan
            bound = float(np.exp(m + thr)) if thr < _NO_THRESHOLD else math.inf
        return ChannelJump(value, median, jump, z, bound, bool(spiked))

    def _add(self, t: int, host: dict, rank: np.ndarray, remote: bool = False, forced: bool = False) -> None:
        """Turn flagged step ``t`` into an event or extend the last one (``forced``: another rank's alarm
        made the guard act on this step, so it is an alarm here too)."""
        W, L = self.window, self.n
        x = host["hist"][:, t % W]
        f = host["fl"][:, t % W]
        m, s, thr = self._stats_at(t, host["snap"])
        step = self._step0 + t
        nonfinite = f & ~(x < np.inf) & ~np.isneginf(x)
        kind = "remote" if remote else ("non_finite" if nonfinite.any() else "jump")
        spiking = [i for i in range(L) if f[i]]
        spiking.sort(key=lambda i: rank[i])
        with np.errstate(invalid="ignore"):
            rel = np.where(np.isfinite(x[:L]) & (thr[:L] < _NO_THRESHOLD), x[:L] - m[:L], np.nan)
        largest = int(np.nanargmax(rel)) if np.isfinite(rel).any() else None
        total = self._channel(x[L], m[L], s[L], thr[L], f[L])
        loss = None
        if self.watch_loss and not np.isneginf(x[L + 1]):
            loss = self._channel(x[L + 1], m[L + 1], s[L + 1], thr[L + 1], f[L + 1])
        max_norm = self._max_norms[t - self._t] if -len(self._max_norms) <= t - self._t < 0 else None
        confirmed = forced or not self.confirm or bool(host["alarm"][t % W])
        action = _ACTION_OF[self.on_spike] if confirmed else "recorded"
        last = self.events[-1] if self.events else None
        if last is not None and 0 < step - last.last_step <= self.merge and last.confirmed == confirmed:
            self.events[-1] = self._latest = _extend(last, step, total.jump, action == "skipped")
            return
        flight = self._flight(t, host)
        before = flight.clipped[:-1] if flight.clipped is not None else ()
        self._latest = SpikeEvent(
            step=step, kind=kind, total=total, loss=loss, layers=tuple(self._names[i] for i in spiking),
            first_layer=self._names[spiking[0]] if spiking else None,
            largest_layer=None if largest is None else self._names[largest],
            largest_jump=None if largest is None else float(np.exp(rel[largest])),
            peak_jump=total.jump, clipped=None if max_norm is None else bool(host["clip"][t % W]),
            max_norm=max_norm, clip_rate=float(np.mean(before)) if len(before) else None, action=action,
            skipped_steps=int(action == "skipped"), flight=flight, confirmed=confirmed,
            loss_setback=self._setback_at(t, loss, host) if self.confirm else None)
        if len(self.events) < self.max_events:
            self.events.append(self._latest)
        else:
            self.dropped += 1  # counted, not kept (the guard still acts on it and can raise with it)

    def _world(self) -> tuple[int, int]:
        """(rank, size) of the group whose ranks decide together ((0, 1) without torch.distributed)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def _flight_steps(self, t: int) -> list[int]:
        return list(range(max(0, t - self.flight + 1, self._t - self.window), t + 1))

    def _full_fields(self, t: int, steps: list[int]) -> dict:
        """The full flight recorder's fields of the flight record of step ``t``: combined over the ranks
        when the guard's collective decision was taken at ``t``, else this rank's own."""
        rank, size = self._world()
        if self._full is None:
            return {"world_size": size, "rank": rank}
        if self._combined is not None and self._combined[0] == t:
            fields = self._combined[1]
        else:
            fields = self._full.flight(steps, self.n)
            if size > 1:
                # (not combined by the session either: even the weights may differ over the ranks)
                fields["rank_local"] = local_keys(fields, self._full.kinds() if self._combine else {})
        return {**fields, "not_recorded": self._full.not_recorded, "world_size": size, "rank": rank}

    def _flight(self, t: int, host: dict) -> FlightRecord:
        W, L = self.window, self.n
        steps = self._flight_steps(t)
        cols = [s % W for s in steps]
        with np.errstate(over="ignore"):
            v = np.exp(host["hist"][:, cols])  # (C, N)
        v[~np.isfinite(v) | (v == 0)] = np.nan
        band = [self._stats_at(s, host["snap"]) for s in steps]
        med = lambda c: tuple(float(np.exp(b[0][c])) if b[2][c] < _NO_THRESHOLD else math.nan for b in band)  # noqa: E731
        bound = lambda c: tuple(float(np.exp(b[0][c] + b[2][c])) if b[2][c] < _NO_THRESHOLD else math.inf for b in band)  # noqa: E731
        known = [self._max_norms[s - self._t] is not None if -len(self._max_norms) <= s - self._t < 0 else False
                 for s in steps]
        clipped = None
        if any(known):
            clipped = tuple(bool(host["clip"][c]) for c in cols)
        return FlightRecord(
            steps=tuple(self._step0 + s for s in steps), layers=self._names,
            grad_norm=tuple(tuple(float(a) for a in v[:L, i]) for i in range(len(steps))),
            total=tuple(float(a) for a in v[L]), loss=tuple(float(a) for a in v[L + 1]),
            total_median=med(L), total_threshold=bound(L), loss_median=med(L + 1), loss_threshold=bound(L + 1),
            flagged=tuple(bool(host["flags"][c]) for c in cols), clipped=clipped, **self._full_fields(t, steps))

    def _table(self, t: int) -> Table:
        """This step as a table over the channels (the trace's record of a guarded spike step)."""
        col = self._state.cols[t % self.window]
        host = to_host([col[0], col[1]])
        sites = ("total", "loss") + self._names
        order = [self.n, self.n + 1] + list(range(self.n))
        with np.errstate(over="ignore"):
            value = np.exp(host[0][order])
        return Table(sites, ("total", "loss") + tuple(l.kind for l in self._ctx.layers),
                     {"value": value, "spiked": host[1][order] > 0,
                      "skipped": np.full(len(sites), self.skipped)})


def _extend(e: SpikeEvent, step: int, jump: float, skipped: bool) -> SpikeEvent:
    peak = e.peak_jump if not (jump > e.peak_jump) else jump
    return replace(e, last_step=step, flagged_steps=e.flagged_steps + 1, peak_jump=peak,
                   skipped_steps=e.skipped_steps + int(skipped))


def _clip_source(clip):
    """(source, clipper object, fixed threshold) from ``clip=``."""
    if clip is None:
        return None, None, None
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        v = float(clip)
        if not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"SpikeWatch(clip={clip}) must be a positive finite clipping threshold (max_norm)")
        return "threshold", None, v
    try:
        float(clip.max_norm)
    except (AttributeError, TypeError, ValueError):
        raise ConfigError(f"SpikeWatch(clip=...) must be a number (max_norm) or a clipper with a max_norm attribute "
                          f"(gradprobe.remedies.GradClipper, AutoClip); got {type(clip).__name__}") from None
    return "clipper", clip, None
