"""gcp-storage-emulator with the two parts of GCS's contract that tensorstore's conditional writes
rely on and the emulator leaves out: downloads carry `x-goog-generation`, and the
`ifGenerationMatch` / `ifGenerationNotMatch` conditions are honoured (412 / 304), as real GCS
does. Without them tensorstore cannot rewrite an OCDBT manifest ("Malformed StorageGeneration").

`Emulator` runs one on a free loopback port (tests/test_bucket.py, scripts/bench_storage.py);
`python tests/gcs_emulator.py <the emulator's own arguments>` runs it by hand.
"""

import os
import socket
import subprocess
import sys
import time
from http import HTTPStatus
from pathlib import Path


class Emulator:
    """The patched emulator on a free loopback port, its data kept in `directory` across
    restarts; `env` points tensorstore, gcsfs and google-auth at it."""

    def __init__(self, directory, bucket: str = "bkt"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.directory, self.bucket, self.proc = directory, bucket, None
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "EPATH_USE_TF": "false",
                    # a killed run's lease is taken over after 14 s (heartbeat 4 s), not 35 s
                    "INFRA_LEASE_EXPIRY_S": "14"}

    def start(self) -> "Emulator":
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "-d", str(self.directory), "start",
             "--host", "127.0.0.1", "--port", str(self.port), "--default-bucket", self.bucket],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline, "emulator did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _condition_fails(request, storage, bucket: str, name: str, *, download: bool):
    """The status a failed generation condition answers with, or None."""
    from gcp_storage_emulator.exceptions import NotFound

    query = request.query
    if "ifGenerationMatch" not in query and "ifGenerationNotMatch" not in query:
        return None
    try:
        current = int(storage.get_file_obj(bucket, name).get("generation") or 0)
    except NotFound:
        current = 0  # GCS: generation 0 means "no live object"
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"][0]) != current:
        return HTTPStatus.PRECONDITION_FAILED
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"][0]) == current:
        return HTTPStatus.NOT_MODIFIED if download else HTTPStatus.PRECONDITION_FAILED
    return None


def _download(request, response, storage, *args, **kwargs):
    from gcp_storage_emulator.exceptions import NotFound

    bucket, name = request.params["bucket_name"], request.params["object_id"]
    status = _condition_fails(request, storage, bucket, name, download=True)
    if status is not None:
        response.status = status
        return None
    try:
        obj = storage.get_file_obj(bucket, name)
        response["x-goog-generation"] = str(obj.get("generation") or 0)
        response["x-goog-metageneration"] = str(obj.get("metageneration") or 1)
    except NotFound:
        pass
    return _original_download(request, response, storage, *args, **kwargs)


def _insert(request, response, storage, *args, **kwargs):
    name = (request.query.get("name") or [None])[0]
    if name is not None:
        status = _condition_fails(request, storage, request.params["bucket_name"], name,
                                  download=False)
        if status is not None:
            response.status = status
            return None
    return _original_insert(request, response, storage, *args, **kwargs)


def _atomic_write_bytes(store, rel: str, data: bytes) -> None:
    """The emulator's file store rewrites its metadata (`.meta`) in place; killed mid-write
    (as the outage test kills it) it would not start again. Write a temporary file, rename."""
    path = store._disk_path(store._norm(rel)) if store._root is not None else None
    if path is None:
        return _original_write_bytes(store, rel, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


if __name__ == "__main__":
    from gcp_storage_emulator import storage as emulator_storage
    from gcp_storage_emulator.handlers import objects

    _original_write_bytes = emulator_storage._FileStore.write_bytes
    emulator_storage._FileStore.write_bytes = _atomic_write_bytes

    _original_download, _original_insert = objects.download, objects.insert
    objects.download, objects.insert = _download, _insert  # before the server builds its routes
    from gcp_storage_emulator.__main__ import main

    main()
