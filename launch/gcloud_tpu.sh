#!/usr/bin/env bash
# Run ares_jax on a Cloud TPU VM slice: get the slice (reuse it, create it, or queue for it), copy this
# checkout to every worker, install, and start the entry point on all workers at once (--worker=all).
# Every worker runs the same command; --config.distributed=True makes each call
# jax.distributed.initialize(), which needs no arguments on TPU.
#
#   TPU_NAME=ares-v5p ZONE=us-east5-a ACCELERATOR=v5p-8 WORKDIR=gs://my-bucket/aepo_7b \
#       launch/gcloud_tpu.sh --config=configs/aepo_7b.py --config.model.hf_path=/mnt/ckpt/policy \
#       --config.data.paths="('/mnt/data/ViRL39K',)"
#
# Code and outputs never share a folder: the code goes to ~/ares_jax_code/<version> on each worker (a new
# folder per version; nothing is deleted), the run writes to WORKDIR (gs:// is shared by all workers; the
# default ~/ares_jax_runs/<config name> is local to each worker, fine for one-host slices). Launching again
# with the same WORKDIR resumes from the newest checkpoint; a preempted spot slice checkpoints on SIGTERM
# and exits 0, so relaunching after preemption continues where it stopped.
#
# Environment: TPU_NAME, ZONE (required); ACCELERATOR (default v5p-8), RUNTIME_VERSION (default: the TPU
# software version of ACCELERATOR's family, below), PROJECT (default: gcloud's), WORKDIR (see above), SPOT=1
# for spot capacity, QUEUED=1 to request the slice as a queued resource and wait until it is ACTIVE (what spot
# and large slices usually need), SKIP_INSTALL=1 to reuse an installed VM, DELETE_AFTER=1 to delete the slice
# when done, DRY_RUN=1 to print the gcloud commands instead of running them (nothing is created or copied).
#
#   ACCELERATOR=v6e-8 launch/gcloud_tpu.sh --print-runtime   # the TPU software version it would create with
#
# Each worker installs jax[tpu] at the version in launch/jax_version.txt, the one the tests run with
# (tests/test_launch.py checks it against the installed jax), so the slice runs what was tested.
set -euo pipefail

cd "$(dirname "$0")/.."
JAX_VERSION="$(cat launch/jax_version.txt)"

# The TPU VM software version for JAX of each accelerator family, from Cloud TPU's "TPU software versions"
# page (https://cloud.google.com/tpu/docs/runtimes, "PyTorch and JAX"): Trillium (v6e) v2-alpha-tpuv6e,
# v5p v2-alpha-tpuv5, v5e (accelerator type v5litepod-N) v2-alpha-tpuv5-lite, v4 and older
# tpu-ubuntu2204-base. A family missing here is an error rather than a guess: an image of another
# generation creates a slice whose TPU runtime does not match its chips.
runtime_for() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

ACCELERATOR="${ACCELERATOR:-v5p-8}"
if [ -z "${RUNTIME_VERSION:-}" ] && ! RUNTIME_VERSION="$(runtime_for "$ACCELERATOR")"; then
  echo "ACCELERATOR=$ACCELERATOR: no TPU software version known for this accelerator family (known: v2-N to v4-N," \
    "v5litepod-N (v5e), v5p-N, v6e-N; see https://cloud.google.com/tpu/docs/runtimes); set RUNTIME_VERSION" >&2
  exit 2
fi
if [ "${1:-}" = "--print-runtime" ]; then
  echo "$RUNTIME_VERSION"
  exit 0
fi

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
if [ "$#" -eq 0 ]; then
  set -- --config=configs/tiny.py
fi

run() {  # a gcloud command, or with DRY_RUN=1 its printed form
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
exists() {  # whether a gcloud resource exists (never, in a dry run: print the commands that create it)
  [ "${DRY_RUN:-0}" != "1" ] && "$@" >/dev/null 2>&1
}

gc=(gcloud compute tpus tpu-vm)
qr=(gcloud compute tpus queued-resources)
where=(--zone="$ZONE")
if [ -n "${PROJECT:-}" ]; then where+=(--project="$PROJECT"); fi
spot=()
if [ "${SPOT:-0}" = "1" ]; then spot=(--spot); fi

if ! exists "${gc[@]}" describe "$TPU_NAME" "${where[@]}"; then
  if [ "${QUEUED:-0}" = "1" ]; then
    echo "queueing for a $ACCELERATOR slice $TPU_NAME in $ZONE"
    if ! exists "${qr[@]}" describe "$TPU_NAME" "${where[@]}"; then
      run "${qr[@]}" create "$TPU_NAME" --node-id="$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" \
        --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
    fi
    if [ "${DRY_RUN:-0}" != "1" ]; then
      until [ "$("${qr[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state.state)')" = "ACTIVE" ]; do
        sleep 60
      done
    fi
  else
    echo "creating $ACCELERATOR slice $TPU_NAME in $ZONE"
    run "${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION" \
      "${spot[@]}"
  fi
fi

# Ship the committed tree plus local changes (not build outputs) as one tarball, into a folder of its version.
version="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unversioned)"
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then version="$version-$(date +%Y%m%d%H%M%S)"; fi
code_dir="ares_jax_code/$version"
tarball="$(mktemp -t ares_jax.XXXXXX.tar.gz)"
trap 'rm -f "$tarball"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$tarball"
run "${gc[@]}" scp "$tarball" "$TPU_NAME":/tmp/ares_jax.tar.gz --worker=all "${where[@]}"

setup="mkdir -p ~/$code_dir && tar -xzf /tmp/ares_jax.tar.gz -C ~/$code_dir"
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  setup="$setup && cd ~/$code_dir && python3 -m pip install -q 'jax[tpu]==$JAX_VERSION'"
  setup="$setup && python3 -m pip install -q -e '.[gcs]'"
fi
run "${gc[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command="$setup"

config_name="$(printf '%s\n' "$@" | sed -n 's|^--config=\(.*/\)\{0,1\}\([^/]*\)\.py$|\2|p' | head -n 1)"
workdir="${WORKDIR:-\$HOME/ares_jax_runs/${config_name:-run}}"
args="$(printf ' %q' "$@")"
case " $* " in
  *" --config.workdir="*) ;;  # the caller named the workdir
  *) args="$args --config.workdir=$workdir" ;;
esac
run_cmd="cd ~/$code_dir && python3 -m ares_jax.main$args --config.distributed=True"
echo "running on all workers:$args"
status=0
run "${gc[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command="$run_cmd" || status=$?

if [ "${DELETE_AFTER:-0}" = "1" ]; then
  if [ "${QUEUED:-0}" = "1" ]; then
    run "${qr[@]}" delete "$TPU_NAME" "${where[@]}" --force --quiet
  else
    run "${gc[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
  fi
fi
exit "$status"
