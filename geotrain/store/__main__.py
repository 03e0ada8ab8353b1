"""`python -m geotrain.store URL`: a run store's summary (run id, committed rounds, final)."""

import json
import sys

from geotrain.store import RunStore

s = RunStore(sys.argv[1])
info = s.read_run()
print(json.dumps({"run": info.get("id"), "committed": s.committed_rounds(),
                  "final": s.read_final()}, indent=2))
