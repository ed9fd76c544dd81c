"""The data contract: what one recorded step holds, the bounded history, model facts and sinks.

Everything above this floor (analysis, diagnosis, report) reads these objects or the run log they
are saved to, never the model, so a trace can be rebuilt from a run log without the model.

* :class:`LayerFlow`: one step's per-layer quantities (any recorder's) and :class:`Table` s;
* :class:`UnitStats`, :class:`TemporalFlow`: typed views of the unit-statistics and BPTT tables;
* :class:`Trace`: the bounded history (an in-memory :class:`Sink`);
* :class:`ModelFacts`: what the model is made of; :class:`RunHeader`: what a sink receives first;
* :class:`SpikeLog`, :class:`SpikeEvent`, :class:`FlightRecord`: gradient spikes found during training.
"""
from gradprobe.trace.facts import LinearStats, MLPFacts, ModelFacts
from gradprobe.trace.history import Trace
from gradprobe.trace.records import LABELS, MASK_OF, MASKS, QUANTITIES, LayerFlow
from gradprobe.trace.sink import RunHeader, Sink
from gradprobe.trace.spikes import ChannelJump, FlightRecord, FlightTable, SpikeEvent, SpikeLog
from gradprobe.trace.table import Table
from gradprobe.trace.views import TemporalFlow, UnitStats

__all__ = [
    "LayerFlow",
    "Table",
    "UnitStats",
    "TemporalFlow",
    "Trace",
    "ModelFacts",
    "MLPFacts",
    "LinearStats",
    "Sink",
    "RunHeader",
    "SpikeLog",
    "SpikeEvent",
    "FlightRecord",
    "FlightTable",
    "ChannelJump",
    "QUANTITIES",
    "MASKS",
    "MASK_OF",
    "LABELS",
]
