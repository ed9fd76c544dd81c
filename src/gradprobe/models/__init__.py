"""Plain ``nn.Module``s from the seeds and the classic experiments; they work without gradprobe."""
from gradprobe.models.mlp import DeepMLP

__all__ = ["DeepMLP"]
