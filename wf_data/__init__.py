"""wf-data: deterministic, exactly resumable, online-mixed data loading for LLM training."""

__version__ = "0.1.0"
