"""Adapters to training frameworks (Hugging Face Trainer, torchtitan), imported on demand.

Nothing in ``wf_data.data`` imports these modules; each imports its framework when imported.
"""
