"""gcp-storage-emulator, plus the object precondition real GCS enforces.

gcp-storage-emulator (2026.7.19) accepts `ifGenerationMatch` on uploads but
ignores it, so a conditional create (`ifGenerationMatch=0`, what gcsfs sends
for `pipe_file(mode="create")`) always succeeds there. Real GCS answers 412
Precondition Failed when the object's generation differs. This wrapper adds
exactly that check in front of the emulator's own upload handler (the
emulator serves one request at a time, so check-then-write is atomic) and
then runs the emulator unchanged:

    python -m tests.gcs_emulator start --host 127.0.0.1 --port P --in-memory

The tests use it for every gs:// test; `tests/test_store_backends.py` also
checks the plain emulator and records that it does not enforce the condition.
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_emulator_insert = objects.insert


def insert_with_preconditions(request, response, storage, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    if wanted:
        name = request.query.get("name", [None])[0]
        if name is None and request.query.get("uploadType") == ["multipart"]:
            name = request.data["meta"].get("name")
        try:
            current = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
        except NotFound:
            current = "0"
        if current != wanted[0]:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "At least one of the pre-conditions "
                                     "you specified did not hold.",
                                     "errors": [{"reason": "conditionNotMet", "domain": "global",
                                                 "message": "Precondition Failed"}]}})
            return None
    return _emulator_insert(request, response, storage, *args, **kwargs)


if __name__ == "__main__":
    objects.insert = insert_with_preconditions  # before the server module builds its routes
    from gcp_storage_emulator.__main__ import main

    main(sys.argv[1:])
