"""A local stand-in for Google Cloud Storage behind `gs://` paths, for tests without network.

epath sends `gs://` to fsspec's "gcs" filesystem when TensorFlow is absent (gcsfs in production). This
registers, in its place, a filesystem that keeps `gs://bucket/key` in `{root}/bucket/key` and keeps the
object-store rules the code must live with:
- no append: an object is written whole (`open(..., "a")` raises, as gcsfs does);
- no real directories: a write creates its parents, and a "folder" exists while an object is under it;
- rename is copy then delete (two steps, not atomic), as on GCS;
- an object becomes visible only when its writer closes (written to a hidden file, then moved).

Use `with fake_gcs(tmp_path) as root:`; inside, `epath.Path("gs://bucket/x")` and everything built on
`ares_jax.storage` read and write under `root`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import uuid

import fsspec
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

_ROOT_ENV = "ARES_JAX_FAKE_GCS_ROOT"


class _Upload:
  """A file object that writes to a hidden local file and moves it into place on a clean close."""

  def __init__(self, target: str, mode: str):
    self._target = target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    self._tmp = os.path.join(os.path.dirname(target), f".upload-{uuid.uuid4().hex}")
    self._f = open(self._tmp, mode)  # pylint: disable=consider-using-with

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      self.close()
    else:  # an upload that failed is never finalised: the old object stays
      self._f.close()
      os.remove(self._tmp)

  def close(self):
    if not self._f.closed:
      self._f.close()
      os.replace(self._tmp, self._target)


class FakeGCS(DirFileSystem):
  """`gs://bucket/key` -> `$ARES_JAX_FAKE_GCS_ROOT/bucket/key` with the rules in the module docstring."""

  protocol = ("gs", "gcs")
  cachable = False

  def __init__(self, *args, **kwargs):  # epath passes gcsfs's options (finalize_on_close=True): ignored
    del args, kwargs
    super().__init__(path=os.environ[_ROOT_ENV], fs=LocalFileSystem(auto_mkdir=True))

  @classmethod
  def _strip_protocol(cls, path):
    path = path if isinstance(path, str) else os.fspath(path)
    for p in ("gs://", "gcs://"):
      if path.startswith(p):
        path = path[len(p):]
    return path.rstrip("/")

  def open(self, path, mode="rb", *args, **kwargs):
    if "a" in mode or "+" in mode:
      raise NotImplementedError(f"object stores have no append or update mode ({mode!r}): {path}")
    if "w" in mode or "x" in mode:
      return _Upload(self._join(path), mode)
    return super().open(path, mode, *args, **kwargs)

  def mv(self, path1, path2, recursive=False, **kwargs):  # copy, then delete: two steps, as on GCS
    del kwargs
    src, dst = self._join(path1), self._join(path2)
    if os.path.isdir(src):
      shutil.copytree(src, dst, dirs_exist_ok=True)
      shutil.rmtree(src)
    else:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.copyfile(src, dst)
      os.remove(src)

  rename = mv

  def makedirs(self, path, exist_ok=False):  # folders are implicit
    del path, exist_ok

  def mkdir(self, path, create_parents=True, **kwargs):
    del path, create_parents, kwargs


@contextlib.contextmanager
def fake_gcs(root):
  """Routes `gs://` to folders under `root` for the duration of the block."""
  root = os.fspath(root)
  os.makedirs(root, exist_ok=True)
  old = os.environ.get(_ROOT_ENV)
  os.environ[_ROOT_ENV] = root
  saved = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
  for p in ("gs", "gcs"):
    fsspec.register_implementation(p, FakeGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  try:
    yield root
  finally:
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    for p, cls in saved.items():
      if cls is not None:
        fsspec.register_implementation(p, cls, clobber=True)
      else:
        importlib.import_module("fsspec.registry")._registry.pop(p, None)  # pylint: disable=protected-access
    if old is None:
      os.environ.pop(_ROOT_ENV, None)
    else:
      os.environ[_ROOT_ENV] = old
