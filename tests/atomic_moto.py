"""moto's server, with S3's conditional writes made atomic as S3 makes them.

moto (5.2, moto/s3/responses.py) answers a PutObject with `If-None-Match: *`
(or `If-Match`) by looking the key up and then writing it, with no lock in
between, on a threaded server: two writers racing to create one key can both
be told they won. S3 checks and writes as one step, and geotrain's run store
relies on that (`ObjectStore.create`: first writer wins). Here every S3 object
write (PutObject, and CompleteMultipartUpload, which takes the same
condition) holds one lock, so the emulator keeps S3's promise; reads and
every other service stay concurrent.

    python tests/atomic_moto.py -H 127.0.0.1 -p PORT      # moto_server's own arguments

MOTO_WRITE_DELAY_S (tests of this file only) pauses every object write
between moto's condition check and its insert: the window a race needs, wide
open (plain moto 5.2 gave every one of 20 races of 8 writers several winners).
"""

from __future__ import annotations

import functools
import os
import threading
import time

from moto.s3.models import S3Backend
from moto.s3.responses import S3Response
from moto.server import main

_WRITE = threading.Lock()


def _atomic(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with _WRITE:
            return method(self, *args, **kwargs)
    return locked


def _paused(insert, delay_s: float):
    @functools.wraps(insert)
    def slow(self, *args, **kwargs):
        time.sleep(delay_s)
        return insert(self, *args, **kwargs)
    return slow


if float(os.environ.get("MOTO_WRITE_DELAY_S", "0")) > 0:
    S3Backend.put_object = _paused(S3Backend.put_object, float(os.environ["MOTO_WRITE_DELAY_S"]))
S3Response.put_object = _atomic(S3Response.put_object)
S3Response._key_response_post = _atomic(S3Response._key_response_post)

if __name__ == "__main__":
    main()
