"""Slow, obviously-correct twins of gradprobe's measurements (oracles for the tests only)."""
