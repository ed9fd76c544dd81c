"""Pure tensor math used by the upper floors: norms, products, iterations. No hooks, no state."""
from gradprobe.functional.norms import grouped_norms, segment_sum

__all__ = ["grouped_norms", "segment_sum"]
