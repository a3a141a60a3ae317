"""Deprecated alias of `wf_data.data.mix.feedback` (the mixture feedback lives with mixing).

Kept for one release: import `MixtureFeedback` and the row-loss functions from
`wf_data.data.mix.feedback` (or `MixtureFeedback` from `wf_data.data`).
"""

import warnings

from wf_data.data.mix.feedback import (
    MixtureFeedback,
    masked_row_loss,
    per_domain_loss,
    row_loss_from_logits,
)

warnings.warn(
    "wf_data.influence is deprecated: import from wf_data.data.mix.feedback",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["MixtureFeedback", "masked_row_loss", "per_domain_loss", "row_loss_from_logits"]
