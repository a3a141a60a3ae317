"""Worker processes: `ProcessMap` (a Grain transform whose map runs in worker processes), the
zygote that forks them, shared-memory result slots, and tying a child's life to its parent.

Process infrastructure for any stage: imports numpy, Grain and the standard library only,
no other `wf_data` stage.
"""
