"""Every file a run writes or reads back, local or on an object store (`gs://`), through etils `epath`.

On a multi-host TPU slice the workdir must be one place every host sees, which means `gs://`; orbax already
reads and writes through `epath`, so the run's own files (metrics, reports, exported policy, progress files)
use it too. On TPU VMs `gs://` needs `gcsfs` (or TensorFlow) installed: epath picks gfile when TensorFlow
is importable, else fsspec's "gcs" filesystem.

Guarantees, and why they differ by place:
- local files: `write_*` and `atomic_open` write a hidden temporary file in the same folder, flush and fsync
  it, then `os.replace` it over the target: a reader (or a resumed run) sees the old file or the new one,
  never half of one, even after a kill or a power cut.
- object stores: GCS makes an object visible only when its upload completes, and whole, so a file is
  written into a local temporary file (or taken from memory) and then uploaded in one call (`put_file` /
  `pipe_file`): the target is always the old object or the complete new one. No upload streams into the
  target itself (gcsfs, as epath opens it, finalises a half-written object when an exception closes the
  stream) and no write goes through a rename (GCS has none: gcsfs's `mv` tries the moveTo API, and
  emulators and older buckets answer it with an error and a retry).
- appends (`append_lines`): local files are appended in place (flush + fsync); an object store has no
  append, so the object is read and uploaded again whole. That costs the file's size per call: fine for
  metrics (kilobytes per step), not for bulk data. Either way a torn last line left by a kill is cut off
  before anything is appended after it, so it can never be glued to the next record.
- folders (`writing_folder`, used for the exported policy): locally the folder is built under a hidden
  name and renamed into place (the old one moved aside first). An object store has no folder rename, so
  there the old folder's marker file (config.json) is deleted first, then the old objects, the files are
  written in place and the marker last: a reader that finds the marker finds every other file of the same
  folder; a writer that dies leaves no marker (readers refuse the folder, `local_folder(marker=...)`).
- listings: gcsfs caches folder listings for the life of the process by default, which hides objects that
  another process (or another host) wrote since; this module turns that cache off for `gs://` unless
  fsspec's configuration already says otherwise (`fsspec.config.conf["gcs"]`).
- against an emulator (`STORAGE_EMULATOR_HOST` set, see `ares_jax.gcs_emulator`) gcsfs's gRPC probe of
  every bucket's type, which waits 60 s per probe there, is turned off unless the environment says otherwise.

Who writes: process 0 (`sharding.is_primary()`), except orbax's own shards; callers decide, this module
does not know about processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Iterable, Iterator

from absl import logging
from etils import epath

PathLike = str | os.PathLike
_CHUNK = 16 << 20

if os.environ.get("STORAGE_EMULATOR_HOST"):  # read when gcsfs is imported (below, through fsspec's registry)
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
try:
  import fsspec  # pylint: disable=g-import-not-at-top
  for _proto in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_proto, {}).setdefault("use_listings_cache", False)
except ImportError:  # epath without fsspec: TensorFlow's gfile serves gs://
  fsspec = None


def is_remote(p: PathLike) -> bool:
  """Whether `p` names an object store (`gs://`, `s3://`, ...) rather than the local filesystem."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an `epath.Path` (`~` expanded for local paths)."""
  s = os.fspath(p)
  return epath.Path(s if is_remote(s) else os.path.expanduser(s))


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def listdir(p: PathLike) -> list[str]:
  """Names in folder `p`, sorted (none when it does not exist)."""
  q = path(p)
  return sorted(c.name for c in q.iterdir()) if q.is_dir() else []


def makedirs(p: PathLike) -> None:
  """Creates folder `p` and its parents (a no-op on object stores, where folders are name prefixes)."""
  path(p).mkdir(parents=True, exist_ok=True)


def remove(p: PathLike) -> None:
  """Deletes file `p` if it exists."""
  q = path(p)
  if q.exists():
    q.unlink()


def rmtree(p: PathLike) -> None:
  """Deletes folder `p` and everything in it, if it exists."""
  q = path(p)
  if q.exists():
    q.rmtree()


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def read_json(p: PathLike) -> Any:
  return json.loads(read_text(p))


def _sibling(q: epath.Path, tag: str) -> epath.Path:
  return q.parent / f".{q.name}.{tag}-{uuid.uuid4().hex[:12]}"


def _fsspec(q: epath.Path) -> tuple[Any, str] | None:
  """The fsspec filesystem epath uses for remote path `q` and the path in its terms (None when epath goes
  through TensorFlow's gfile). The same instance as epath's, so both see one another's writes."""
  backend = getattr(q, "_backend", None)
  if fsspec is None or not isinstance(backend, epath.backend._FileSystemSpecBackend):  # pylint: disable=protected-access
    return None
  return backend.fs(os.fspath(q)), os.fspath(q)


def _upload_file(local: str, dst: epath.Path) -> None:
  """Uploads local file `local` to object `dst` in one call: the object appears whole or not at all."""
  found = _fsspec(dst)
  if found is not None:
    fs, d = found
    fs.put_file(local, d)
    return
  with open(local, "rb") as fin, dst.open("wb") as fout:
    shutil.copyfileobj(fin, fout, _CHUNK)


def move_folder(src: PathLike, dst: PathLike) -> None:
  """Moves folder `src` to `dst` (which must not exist): a rename locally; on an object store a server-side
  copy of every object, then the deletion of `src` (two steps: a reader may meanwhile see both)."""
  src, dst = path(src), path(dst)
  if not is_remote(src) and not is_remote(dst):
    os.rename(src, dst)
    return
  found = _fsspec(src) if is_remote(src) and is_remote(dst) else None
  if found is None:
    src.rename(dst)
    return
  fs, s = found
  fs.copy(s.rstrip("/") + "/", os.fspath(dst).rstrip("/") + "/", recursive=True)
  fs.rm(s, recursive=True)


@contextlib.contextmanager
def atomic_open(p: PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
  """A file to write `p` through: it replaces `p` only when the block ends without an exception (see the
  module docstring for what that guarantees where); after a failure the old `p` is untouched."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes whole files: mode {mode!r}")
  final = path(p)
  if is_remote(final):
    with tempfile.NamedTemporaryFile(prefix="ares_jax_upload.", mode=mode) as f:
      yield f
      f.flush()
      _upload_file(f.name, final)
    return
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = _sibling(final, "tmp")
  try:
    with tmp.open(mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, final)
  except BaseException:
    with contextlib.suppress(OSError):
      if tmp.exists():
        tmp.unlink()
    raise


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes `p` whole and atomically (on an object store: one upload from memory)."""
  found = _fsspec(path(p)) if is_remote(p) else None
  if found is not None:
    fs, q = found
    fs.pipe_file(q, data)
    return
  with atomic_open(p, "wb") as f:
    f.write(data)


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, obj: Any, *, indent: int | None = 1, default: Callable | None = None) -> None:
  write_text(p, json.dumps(obj, indent=indent, default=default, ensure_ascii=False))


def save_figure(fig: Any, p: PathLike, **savefig_kwargs) -> str:
  """A matplotlib figure as a PNG at `p`, atomically (rendered into memory first); returns `p`."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **savefig_kwargs)
  write_bytes(p, buf.getvalue())
  return os.fspath(p)


def _complete_part(data: bytes, where: PathLike) -> bytes:
  """`data` up to and including its last newline: a torn last line (a write cut off by a kill) is dropped."""
  if not data or data.endswith(b"\n"):
    return data
  keep = data.rfind(b"\n") + 1
  logging.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write", where,
                  len(data) - keep)
  return data[:keep]


def append_lines(p: PathLike, lines: Iterable[str]) -> None:
  """Appends `lines` (each gets a newline) to `p`, creating it: in place with flush and fsync locally,
  as a whole-object rewrite on object stores. A torn last line already in `p` is cut off first."""
  payload = "".join(line + "\n" for line in lines).encode("utf-8")
  q = path(p)
  if is_remote(q):
    old = q.read_bytes() if q.exists() else b""
    write_bytes(q, _complete_part(old, q) + payload)
    return
  q.parent.mkdir(parents=True, exist_ok=True)
  with open(q, "ab+") as f:
    size = f.seek(0, os.SEEK_END)
    if size:
      f.seek(size - 1)
      if f.read(1) != b"\n":  # a kill cut the last write short: rare, so reading the file is fine
        f.seek(0)
        f.truncate(len(_complete_part(f.read(), q)))
    f.write(payload)
    f.flush()
    os.fsync(f.fileno())


def read_jsonl(p: PathLike, missing_ok: bool = False) -> list[Any]:
  """The records of JSON-lines file `p`. An unreadable last line (torn by a kill mid-write) is dropped
  with a warning; an unreadable line before it is corruption and raises ValueError naming the line."""
  if missing_ok and not exists(p):
    return []
  lines = read_text(p).splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  out = []
  for k, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      if k == len(lines) - 1:
        logging.warning("%s: dropping a torn last line (%d characters) left by an interrupted write", p,
                        len(line))
        break
      raise ValueError(f"{p}: line {k + 1} is not JSON ({e}); the file is corrupt") from e
  return out


def write_jsonl(p: PathLike, records: Iterable[Any], default: Callable | None = None) -> None:
  """`records` as JSON lines, written whole and atomically."""
  write_text(p, "".join(json.dumps(r, default=default, ensure_ascii=False) + "\n" for r in records))


@contextlib.contextmanager
def local_folder(p: PathLike, include: Callable[[str], bool] = lambda name: True,
                 marker: str | None = None) -> Iterator[str]:
  """A local folder with the files of folder `p` (those whose name passes `include`): `p` itself when
  it is local, else a temporary download, deleted after the block. For readers that need real files
  (safetensors memory maps, transformers' `from_pretrained`). With `marker`, a remote folder without that
  file (one whose writer died, see `writing_folder`) is refused before anything is downloaded."""
  if not is_remote(p):
    yield os.path.expanduser(os.fspath(p))
    return
  src = path(p)
  if not src.is_dir():
    raise FileNotFoundError(f"{p} does not exist")
  if marker is not None and not (src / marker).exists():
    raise FileNotFoundError(f"{p} has no {marker}: not a finished folder (its writer was interrupted, or the "
                            "path is wrong); export it again")
  tmp = tempfile.mkdtemp(prefix="ares_jax_download.")
  try:
    for child in src.iterdir():
      if include(child.name) and not child.is_dir():
        found = _fsspec(child)
        if found is not None:
          found[0].get_file(found[1], os.path.join(tmp, child.name))
          continue
        with child.open("rb") as fin, open(os.path.join(tmp, child.name), "wb") as fout:
          shutil.copyfileobj(fin, fout, _CHUNK)
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def upload_folder(local: str, dst: PathLike) -> None:
  """Copies every file under local folder `local` into folder `dst` (local or remote), keeping subfolders;
  each file is written whole (`atomic_open` / one upload per object)."""
  out = path(dst)
  for root, _, files in os.walk(local):
    rel = os.path.relpath(root, local)
    target = out if rel == "." else out / rel
    for name in files:
      if is_remote(target):
        _upload_file(os.path.join(root, name), target / name)
        continue
      target.mkdir(parents=True, exist_ok=True)
      with open(os.path.join(root, name), "rb") as fin, atomic_open(target / name, "wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)


def _require_marker(folder: epath.Path, marker: str) -> None:
  if not (folder / marker).exists():
    raise RuntimeError(f"writing_folder: the block wrote no {marker} into {folder}, so the folder reads as unfinished")


@contextlib.contextmanager
def writing_folder(final: PathLike, marker: str = "config.json") -> Iterator[epath.Path]:
  """The folder to write the files of folder `final` into; when the block ends without an exception,
  `final` holds exactly those files, `marker` among them (the file a reader checks; write it last).

  Locally the folder is built under a hidden name beside `final` and renamed into place (the old folder
  moved aside first): after a failure the old folder is untouched. On an object store (no folder rename)
  the old folder goes first, its marker before anything else, and the block writes into `final` itself:
  after a failure `final` has no marker, and readers that check it refuse the folder."""
  q = path(final)
  if is_remote(q):
    if q.exists():
      remove(q / marker)  # first: from here on a reader sees no complete folder
      q.rmtree()
    yield q
    _require_marker(q, marker)
    return
  clear_stale(q)
  tmp = _sibling(q, "partial")
  tmp.mkdir(parents=True, exist_ok=True)
  try:
    yield tmp
    _require_marker(tmp, marker)
    old = None
    if q.exists():
      old = _sibling(q, "old")
      os.rename(q, old)
    os.rename(tmp, q)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def clear_stale(final: PathLike) -> None:
  """Deletes leftovers of interrupted `writing_folder` blocks beside local folder `final`."""
  q = path(final)
  if not q.parent.exists():
    return
  for c in q.parent.iterdir():
    if c.name.startswith(f".{q.name}.partial-") or c.name.startswith(f".{q.name}.old-"):
      if c.is_dir():
        c.rmtree()
      else:
        c.unlink()
