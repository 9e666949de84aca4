#!/usr/bin/env bash
# Run ares_jax on a Cloud TPU VM slice: create it (or reuse it), copy this checkout to every
# worker, install, and start the entry point on all workers at once (--worker=all). Every worker
# runs the same command; --config.distributed=True makes each call jax.distributed.initialize(),
# which needs no arguments on TPU.
#
#   TPU_NAME=ares-v5p ZONE=us-east5-a ACCELERATOR=v5p-8 launch/gcloud_tpu.sh \
#       --config=configs/aepo_7b.py --config.model.hf_path=/mnt/ckpt/Qwen2.5-VL-7B-Instruct
#
# Environment: TPU_NAME, ZONE (required); ACCELERATOR (default v5p-8), RUNTIME_VERSION
# (default v2-alpha-tpuv5), PROJECT (default: gcloud's), SPOT=1 for spot capacity,
# SKIP_INSTALL=1 to reuse an installed VM, DELETE_AFTER=1 to delete the slice when done.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v5p-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"
REMOTE_DIR="${REMOTE_DIR:-ares_jax}"
if [ "$#" -eq 0 ]; then
  set -- --config=configs/tiny.py
fi

cd "$(dirname "$0")/.."
gc=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [ -n "${PROJECT:-}" ]; then where+=(--project="$PROJECT"); fi

if ! "${gc[@]}" describe "$TPU_NAME" "${where[@]}" >/dev/null 2>&1; then
  echo "creating $ACCELERATOR slice $TPU_NAME in $ZONE"
  create=("${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION")
  if [ "${SPOT:-0}" = "1" ]; then create+=(--spot); fi
  "${create[@]}"
fi

# Ship the committed tree plus local changes (not build outputs) as one tarball.
tarball="$(mktemp -t ares_jax.XXXXXX.tar.gz)"
trap 'rm -f "$tarball"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$tarball"
"${gc[@]}" scp "$tarball" "$TPU_NAME":/tmp/ares_jax.tar.gz --worker=all "${where[@]}"

setup="rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/ares_jax.tar.gz -C ~/$REMOTE_DIR"
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  setup="$setup && cd ~/$REMOTE_DIR && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ."
fi
"${gc[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command="$setup"

args="$(printf ' %q' "$@")"
run="cd ~/$REMOTE_DIR && python3 -m ares_jax.main$args --config.distributed=True"
echo "running on all workers:$args"
status=0
"${gc[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command="$run" || status=$?

if [ "${DELETE_AFTER:-0}" = "1" ]; then
  "${gc[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
fi
exit "$status"
