"""Prepared datasets on disk: the manifest, ArrayRecord shard and record encoding, and
`DocumentSource`, random access over every record of a dataset directory.

May import `workers` and `text`.
"""
