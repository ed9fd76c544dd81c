"""Report: plots and a self-contained HTML page. Reads saved data only (traces, run logs), never a model."""
