"""Every file a run writes or reads back, local or on an object store (`gs://`), through etils `epath`.

On a multi-host TPU slice the workdir must be one place every host sees, which means `gs://`; orbax already
reads and writes through `epath`, so the run's own files (metrics, reports, exported policy, progress files)
use it too. On TPU VMs `gs://` needs `gcsfs` (or TensorFlow) installed: epath picks gfile when TensorFlow
is importable, else fsspec's "gcs" filesystem.

Guarantees, and why they differ by place:
- local files: `write_*` and `atomic_open` write a hidden temporary file in the same folder, flush and fsync
  it, then `os.replace` it over the target: a reader (or a resumed run) sees the old file or the new one,
  never half of one, even after a kill or a power cut.
- object stores: an object is replaced whole when its upload finishes (GCS has no partial objects), but a
  client may still finalise a half-written object when an exception closes the stream, so the data goes to
  a temporary object first and is then moved (a server-side copy, then a delete) over the target. The
  target is always the old object or the complete new one; a kill between the two steps can leave a
  `.tmp-*` object behind, which nothing reads.
- appends (`append_lines`): local files are appended in place (flush + fsync); an object store has no
  append, so the object is read and rewritten whole (atomically, as above). That costs the file's size per
  call: fine for metrics (kilobytes per step), not for bulk data. Either way a torn last line left by a kill
  is cut off before anything is appended after it, so it can never be glued to the next record.
- folders (`replace_folder`, used for the exported policy): locally a complete folder is renamed into
  place (the old one moved aside first); on an object store, where a folder is only a name prefix and
  cannot be renamed at once, the old folder's marker file (config.json) is removed first and the new
  marker is moved in last, so a reader that finds the marker finds every other file of the same folder.

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


def move(src: PathLike, dst: PathLike) -> None:
  """Moves file `src` over `dst` (replacing it): `os.replace` locally; on an object store a server-side
  copy then a delete where fsspec can do it, else a streamed copy then a delete."""
  src, dst = path(src), path(dst)
  if not is_remote(src) and not is_remote(dst):
    os.replace(src, dst)
    return
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    (fs, s), (_, d) = fsspec.core.url_to_fs(str(src)), fsspec.core.url_to_fs(str(dst))
  except (ImportError, ValueError):  # no fsspec implementation for the scheme (e.g. gfile only)
    fs = None
  if fs is not None:
    fs.mv(s, d)
    return
  with src.open("rb") as fin, dst.open("wb") as fout:
    shutil.copyfileobj(fin, fout, _CHUNK)
  src.unlink()


@contextlib.contextmanager
def atomic_open(p: PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
  """A file to write `p` through: it replaces `p` only when the block ends without an exception (see the
  module docstring for what that guarantees where); after a failure the old `p` is untouched."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes whole files: mode {mode!r}")
  final = path(p)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = _sibling(final, "tmp")
  try:
    with tmp.open(mode) as f:
      yield f
      if not is_remote(final):
        f.flush()
        os.fsync(f.fileno())
    move(tmp, final)
  except BaseException:
    with contextlib.suppress(OSError):
      if tmp.exists():
        tmp.unlink()
    raise


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes `p` whole and atomically."""
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
def local_folder(p: PathLike, include: Callable[[str], bool] = lambda name: True) -> Iterator[str]:
  """A local folder with the files of folder `p` (those whose name passes `include`): `p` itself when
  it is local, else a temporary download, deleted after the block. For readers that need real files
  (safetensors memory maps, transformers' `from_pretrained`)."""
  if not is_remote(p):
    yield os.path.expanduser(os.fspath(p))
    return
  src = path(p)
  if not src.is_dir():
    raise FileNotFoundError(f"{p} does not exist")
  tmp = tempfile.mkdtemp(prefix="ares_jax_download.")
  try:
    for child in src.iterdir():
      if include(child.name) and not child.is_dir():
        with child.open("rb") as fin, open(os.path.join(tmp, child.name), "wb") as fout:
          shutil.copyfileobj(fin, fout, _CHUNK)
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def upload_folder(local: str, dst: PathLike) -> None:
  """Copies every file under local folder `local` into folder `dst` (local or remote), keeping subfolders."""
  out = path(dst)
  for root, _, files in os.walk(local):
    rel = os.path.relpath(root, local)
    target = out if rel == "." else out / rel
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
      with open(os.path.join(root, name), "rb") as fin, (target / name).open("wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)


def temp_folder_for(final: PathLike) -> epath.Path:
  """A fresh hidden folder beside `final` to build it in before `replace_folder`."""
  q = _sibling(path(final), "partial")
  q.mkdir(parents=True, exist_ok=True)
  return q


def replace_folder(tmp: PathLike, final: PathLike, marker: str = "config.json") -> None:
  """Puts the complete folder `tmp` in the place of `final` (see the module docstring for what a reader
  can see meanwhile). `marker` is the file a reader checks to know the folder is complete."""
  tmp, final = path(tmp), path(final)
  if not is_remote(final):
    old = None
    if final.exists():
      old = _sibling(final, "old")
      os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    return
  if final.exists():
    remove(final / marker)  # first: from here on a reader sees no complete folder
    final.rmtree()
  files, todo = [], [epath.Path()]
  while todo:  # every file under `tmp`, by relative path (subfolders are rare: a tokenizer's)
    rel = todo.pop()
    for c in (tmp / rel).iterdir():
      (todo if c.is_dir() else files).append(rel / c.name)
  files.sort(key=lambda rel: (str(rel) == marker, str(rel)))  # the marker last
  for rel in files:
    move(tmp / rel, final / rel)
  rmtree(tmp)


def clear_stale(final: PathLike) -> None:
  """Deletes leftovers of interrupted `temp_folder_for` / `replace_folder` calls beside `final`."""
  q = path(final)
  if not q.parent.exists():
    return
  for c in q.parent.iterdir():
    if c.name.startswith(f".{q.name}.partial-") or c.name.startswith(f".{q.name}.old-"):
      if c.is_dir():
        c.rmtree()
      else:
        c.unlink()
