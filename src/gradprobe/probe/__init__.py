"""Probe floor: recorders (what is measured, one class per quantity family) and the session that owns them."""
from gradprobe._deprecation import module_getattr
from gradprobe.probe.layers import Layer, find_layers, mlp_facts, model_facts
from gradprobe.probe.outputs import OrderRecorder, OutputRecorder
from gradprobe.probe.params import GradRecorder, WeightRecorder
from gradprobe.probe.schedule import BudgetSchedule, FixedSchedule, Schedule
from gradprobe.probe.recorder import NORM_KINDS, Context, Contribution, Deferred, LayerOrder, Recorder, eager_hook
from gradprobe.probe.session import DEFAULT_BUDGET, Session, default_recorders
from gradprobe.probe.spikes import SpikeWarning, SpikeWatch
from gradprobe.probe.temporal import TemporalRecorder, mark_state
from gradprobe.probe.units import UnitRecorder

__all__ = [
    "Session",
    "default_recorders",
    "Recorder",
    "Context",
    "Contribution",
    "Deferred",
    "LayerOrder",
    "GradRecorder",
    "WeightRecorder",
    "Schedule",
    "FixedSchedule",
    "BudgetSchedule",
    "DEFAULT_BUDGET",
    "NORM_KINDS",
    "eager_hook",
    "OutputRecorder",
    "OrderRecorder",
    "UnitRecorder",
    "SpikeWatch",
    "SpikeWarning",
    "TemporalRecorder",
    "mark_state",
    "Layer",
    "find_layers",
    "model_facts",
    "mlp_facts",
]

# gradprobe 0.1 exported the user-facing probe here; it is gradprobe.Probe now (a Session that also
# diagnoses). The old name gives the Session, with a DeprecationWarning, for one release.
__getattr__ = module_getattr(__name__, {"Probe": Session})
