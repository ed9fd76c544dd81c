"""Report: figures and one self-contained HTML page, built from saved runs only (never a model).

:func:`build_report` turns :class:`~gradprobe.Run` objects (``probe.run()`` live, or
``gradprobe.load_run(path)``) into ``report.html``; :mod:`gradprobe.report.notes` lists the run-level
notes it reads (a test accuracy, remedy trials, spectra, curvature); :mod:`gradprobe.report.plots`
has the stand-alone matplotlib figures.
"""
from gradprobe.report.build import build_report
from gradprobe.report.notes import NOTE_KEYS

__all__ = ["build_report", "NOTE_KEYS"]
