"""Checkpoint format versions (train/checkpoint.py `FORMAT_VERSION`): a checkpoint of another version is
refused in one line naming both and what to do, before any array is read (locally and in a bucket on the GCS
emulator); an unversioned one is tried, and refused the same way only when it does not restore."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from ares_jax.train.checkpoint import Checkpointer


def test_a_checkpoint_directory_of_another_format_in_a_bucket_is_refused(bucket, monkeypatch):
  from ares_jax.train import checkpoint as ck_lib  # pylint: disable=g-import-not-at-top
  ck = Checkpointer(f"{bucket}/ck")
  ck.save(1, {"a": jnp.arange(4.0)}, {"data_position": 4})
  ck.close()
  assert ck_lib.storage.read_json(f"{bucket}/ck/format.json") == {"format_version": ck_lib.FORMAT_VERSION}
  monkeypatch.setattr(ck_lib, "FORMAT_VERSION", ck_lib.FORMAT_VERSION + 1)
  with pytest.raises(ck_lib.FormatMismatch, match=rf"{bucket}/ck: checkpoint format version \d+, this ares_jax "
                                                   r"reads version \d+; start fresh"):
    Checkpointer(f"{bucket}/ck")


def test_a_checkpoint_of_another_format_is_refused_in_one_line_before_any_array_is_read(tmp_path, monkeypatch):
  from ares_jax import main
  from ares_jax.train import checkpoint as ck_lib
  state = {"a": jnp.arange(4.0)}
  ck = Checkpointer(str(tmp_path / "ck"))
  ck.save(1, state, {"data_position": 4})
  ck.close()
  assert ck_lib.storage.read_json(tmp_path / "ck" / "format.json") == {"format_version": ck_lib.FORMAT_VERSION}
  _corrupt_arrays = [p for p in (tmp_path / "ck" / "1" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  for p in _corrupt_arrays:  # reading any array now fails with tensorstore's error, not ours
    os.truncate(p, 1)
  now = ck_lib.FORMAT_VERSION
  # A newer ares_jax opening this directory: refused at once, from the directory's record.
  monkeypatch.setattr(ck_lib, "FORMAT_VERSION", now + 1)
  with pytest.raises(ck_lib.FormatMismatch) as e:
    Checkpointer(str(tmp_path / "ck"))
  assert str(e.value) == (f"{tmp_path / 'ck'}: checkpoint format version {now}, this ares_jax reads version "
                          f"{now + 1}; start fresh (a new --config.workdir, or delete its checkpoints/) or resume with "
                          "the ares_jax release that wrote it")
  assert main.is_user_error(e.value)  # main prints it as one FATAL line
  # A step whose own record is of another format (copied in from another run): refused by the step check
  # before its arrays are read, and not taken for damage (no fallback, nothing moved aside).
  ck_lib.storage.write_json(tmp_path / "ck" / "format.json", {"format_version": now + 1})
  with pytest.raises(ck_lib.FormatMismatch, match=f"ck/1: checkpoint format version {now}, this ares_jax reads "
                                                   f"version {now + 1}"):
    Checkpointer(str(tmp_path / "ck")).restore_latest(state)
  assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1", "format.json"]
  # Steps without a version (written before versions were recorded): tried; one that restores onto this
  # version's state is used (with a warning), one that does not is refused in one line.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(ck_lib, "FORMAT_VERSION", now)
  legacy = Checkpointer(str(tmp_path / "legacy"))
  legacy._mgr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave({"data_position": 12})))
  legacy.close()
  restored = Checkpointer(str(tmp_path / "legacy")).restore_latest(state)
  assert restored.step == 3 and restored.meta == {"data_position": 12}
  np.testing.assert_array_equal(restored.state["a"], np.arange(4.0))
  with pytest.raises(ck_lib.FormatMismatch, match=r"legacy/3: checkpoint format version none recorded \(format 1 or "
                                                   r"older\), this ares_jax reads version \d+ and it does not restore "
                                                   r"onto this version's train state \(.+\); start fresh"):
    Checkpointer(str(tmp_path / "legacy")).restore_latest({"a": jnp.arange(4.0), "extra": jnp.ones(2)})
