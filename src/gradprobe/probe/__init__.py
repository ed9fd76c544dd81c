"""Probe: owns hooks on a model and records gradient flow into a trace."""
from gradprobe.probe.layers import Layer, ModelFacts, find_layers, model_facts
from gradprobe.probe.session import Probe
from gradprobe.probe.temporal import TemporalRecorder, mark_state
from gradprobe.probe.units import UnitRecorder

__all__ = ["Probe", "Layer", "ModelFacts", "find_layers", "model_facts", "TemporalRecorder", "UnitRecorder", "mark_state"]
