"""Cross-site synchronisation: DiLoCo through the run store.

`from geotrain.sync import DiLoCo` wraps a user's own training loop;
`RoundExchange` is its store side (membership, rejection, commits) and
`make_codec` picks how pseudo-gradients travel (none, int8, int4, topk).
"""

from geotrain.sync.compression import CODECS, make_codec
from geotrain.sync.diloco import DiLoCo, RoundExchange, RoundResult, SyncError, params_hash

__all__ = ["CODECS", "DiLoCo", "RoundExchange", "RoundResult", "SyncError", "make_codec", "params_hash"]
