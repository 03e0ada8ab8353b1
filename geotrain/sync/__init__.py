"""Cross-site synchronisation: DiLoCo through the run store.

`from geotrain.sync import DiLoCo` wraps a user's own training loop.
"""

from geotrain.sync.diloco import DiLoCo, RoundExchange, RoundResult, SyncError, params_hash

__all__ = ["DiLoCo", "RoundExchange", "RoundResult", "SyncError", "params_hash"]
