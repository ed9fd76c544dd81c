"""Experiments: classic tasks, data and training loops built on the probe (the suite grows here)."""
