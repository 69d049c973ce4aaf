#!/usr/bin/env bash
# Builds the CPU image with podman, starts it on a fresh volume, waits for health SERVING, sends one
# Generate with chunk retrieval from a second container (the image's own client), stops the server
# with SIGTERM and checks that it drained and exited 0 without a traceback. Prints the figures that
# deploy/README.md gives: build time, image size, time to SERVING (first start: prepares the model
# and the default datastore on the volume), time to SERVING again (second start, volume kept).
#
#   bash deploy/image_check.sh            # CPU image only
#   BUILD_CUDA=1 bash deploy/image_check.sh   # also builds (does not run) the CUDA image
#
# Needs podman and runc; where no container registry is reachable, mmdebstrap makes a Debian base
# (BASE_IMAGE unset). Where PyTorch's CPU index is out of reach, WHEELS names a folder holding the
# torch CPU wheel (default /opt/wheels if it exists), mounted into the build.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TAG:-localhost/retroserve:cpu}
CUDA_TAG=${CUDA_TAG:-localhost/retroserve:cuda}
PORT=${PORT:-50551}
METRICS_PORT=${METRICS_PORT:-9451}
NAME=retroserve-image-check
VOLUME=retroserve-image-check-data
SERVING_TIMEOUT_S=${SERVING_TIMEOUT_S:-1800}
# Explicit ulimits (runc refuses the defaults here): 16384 each, or this shell's hard limit if lower.
capped() { local hard=$1; { [ "$hard" = unlimited ] || [ "$hard" -gt 16384 ]; } && echo 16384 || echo "$hard"; }
NOFILE=$(capped "$(ulimit -Hn)"); NPROC=$(capped "$(ulimit -Hu)")
# --shm-size: vLLM's engine processes need more shared memory than the default 64 MiB.
RUN_FLAGS=(--runtime "${RUNTIME:-/usr/sbin/runc}" --network host --shm-size 1g
           --ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

for tool in podman; do
  command -v "$tool" >/dev/null || { echo "image_check: $tool not found (Debian: apt-get install podman runc mmdebstrap)" >&2; exit 2; }
done

log() { echo "image_check: $*"; }
seconds_since() { echo $(( $(date +%s) - $1 )); }

if [ -z "${BASE_IMAGE:-}" ]; then
  BASE_IMAGE=localhost/retroserve-base:bookworm
  if ! podman image exists "$BASE_IMAGE"; then
    command -v mmdebstrap >/dev/null || { echo "image_check: set BASE_IMAGE, or install mmdebstrap to make one" >&2; exit 2; }
    log "making $BASE_IMAGE with mmdebstrap (Debian bookworm, python3.11)"
    tarball=$(mktemp --suffix=.tar)
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$tarball"
    podman import --quiet "$tarball" "$BASE_IMAGE" >/dev/null
    rm -f "$tarball"
  fi
fi

WHEELS=${WHEELS:-$( [ -d /opt/wheels ] && echo /opt/wheels || true )}
BUILD_FLAGS=(--isolation chroot --network host --build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ -n "$WHEELS" ]; then
  BUILD_FLAGS+=(--volume "$WHEELS:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_EXTRA_INDEX_URL=)
fi

# Networks that re-sign TLS: pip on this host trusts a CA bundle (PIP_CERT); the builds get the same.
CERT_FLAGS=()
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
  CERT_FLAGS=(--volume "$PIP_CERT:/etc/retroserve-build-ca.crt:ro" --build-arg PIP_CERT=/etc/retroserve-build-ca.crt)
fi
BUILD_FLAGS+=("${CERT_FLAGS[@]}")

cleanup() {
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  [ -n "${KEEP_VOLUME:-}" ] || podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

start=$(date +%s)
log "building $TAG from $BASE_IMAGE"
podman build "${BUILD_FLAGS[@]}" -f deploy/Dockerfile.cpu -t "$TAG" . >/tmp/retroserve-image-build.log 2>&1 \
  || { tail -40 /tmp/retroserve-image-build.log; echo "image_check: build failed (log: /tmp/retroserve-image-build.log)" >&2; exit 1; }
BUILD_S=$(seconds_since "$start")
SIZE_MB=$(( $(podman image inspect --format '{{.Size}}' "$TAG") / 1000000 ))
log "built in ${BUILD_S} s, ${SIZE_MB} MB"

health_status() {
  podman exec "$NAME" /opt/retroserve/.venv/bin/python -c '
import sys, grpc
from server.client import RetroserveClient
try:
    with RetroserveClient(sys.argv[1]) as client:
        print(client.health("retroserve.v1.Retroserve", timeout=5))
except grpc.RpcError as error:
    print(error.code().name)
' "127.0.0.1:$PORT" 2>/dev/null || echo "NO_CONTAINER"
}

serve_until_serving() {
  local begin=$(date +%s)
  podman run -d --name "$NAME" "${RUN_FLAGS[@]}" -v "$VOLUME:/data" "$TAG" \
    serve --address "127.0.0.1:$PORT" --metrics-address "127.0.0.1:$METRICS_PORT" --grace-period-s 30 >/dev/null
  while true; do
    local status
    status=$(health_status)
    [ "$status" = "SERVING" ] && break
    if [ "$(podman inspect --format '{{.State.Running}}' "$NAME")" != "true" ]; then
      podman logs "$NAME" 2>&1 | tail -40 >&2
      echo "image_check: the server exited before SERVING" >&2; exit 1
    fi
    if [ "$(seconds_since "$begin")" -gt "$SERVING_TIMEOUT_S" ]; then
      podman logs "$NAME" 2>&1 | tail -40 >&2
      echo "image_check: not SERVING after ${SERVING_TIMEOUT_S} s (last status $status)" >&2; exit 1
    fi
    sleep 5
  done
  seconds_since "$begin"
}

stop_and_check() {
  podman stop -t 45 "$NAME" >/dev/null
  local code
  code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
  podman logs "$NAME" >/tmp/retroserve-image-serve.log 2>&1
  podman rm "$NAME" >/dev/null
  if [ "$code" != "0" ] || grep -q "Traceback" /tmp/retroserve-image-serve.log; then
    tail -40 /tmp/retroserve-image-serve.log
    echo "image_check: the server exited $code or logged a traceback on SIGTERM (log: /tmp/retroserve-image-serve.log)" >&2
    exit 1
  fi
}

podman volume create "$VOLUME" >/dev/null
log "first start on an empty volume (prepares the model and the default datastore)"
FIRST_S=$(serve_until_serving)
log "SERVING after ${FIRST_S} s"

log "Generate with chunk retrieval from a client container"
podman run --rm "${RUN_FLAGS[@]}" "$TAG" generate --address "127.0.0.1:$PORT" --json \
  --mode chunk --max-new-tokens 24 --provenance "The with statement in Python" >/tmp/retroserve-image-generate.json
/usr/bin/env python3 - /tmp/retroserve-image-generate.json <<'EOF'
import json, sys
reply = json.load(open(sys.argv[1]))
assert reply.get("text"), f"no text in {reply}"
assert reply.get("retrievals"), f"no retrieval in {reply}"
print("image_check: generated", repr(reply["text"][:60]), "with", len(reply["retrievals"]), "retrievals")
EOF
stop_and_check

log "second start, volume kept"
SECOND_S=$(serve_until_serving)
log "SERVING after ${SECOND_S} s"
stop_and_check

CUDA_LINE=""
if [ -n "${BUILD_CUDA:-}" ]; then
  start=$(date +%s)
  log "building $CUDA_TAG (not run: needs a GPU)"
  CUDA_FLAGS=(--isolation chroot --network host --build-arg "BASE_IMAGE=${CUDA_BASE_IMAGE:-$BASE_IMAGE}" "${CERT_FLAGS[@]}")
  podman build "${CUDA_FLAGS[@]}" -f deploy/Dockerfile.cuda -t "$CUDA_TAG" . >/tmp/retroserve-image-build-cuda.log 2>&1 \
    || { tail -40 /tmp/retroserve-image-build-cuda.log; echo "image_check: CUDA build failed" >&2; exit 1; }
  CUDA_LINE="cuda image: built in $(seconds_since "$start") s, $(( $(podman image inspect --format '{{.Size}}' "$CUDA_TAG") / 1000000 )) MB"
fi

echo
echo "cpu image: built in ${BUILD_S} s, ${SIZE_MB} MB; SERVING ${FIRST_S} s after the first start (empty volume), ${SECOND_S} s after the second"
[ -z "$CUDA_LINE" ] || echo "$CUDA_LINE"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs"
