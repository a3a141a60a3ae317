"""Delivering batches: the `DataLoader` that composes plan -> mix -> batch -> read (in worker
processes) and hands numpy, torch or JAX arrays to the trainer, its checkpointable state, and
`get_loader`, which builds one from a data config.

May import every stage above it: `workers`, `text`, `shards`, `plan`, `mix`, `read`; torch or
JAX only on the path that delivers their arrays.
"""
