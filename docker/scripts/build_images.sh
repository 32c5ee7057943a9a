#!/usr/bin/env bash
# Build the Pollen images: stage the Pollen wheel (and, for the CPU variant, every dependency wheel),
# serve them on 127.0.0.1 for the duration of the build, and `docker build --network host` the
# `superlink` and `pollen` targets of docker/Dockerfile. The build context holds the scripts only.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: build_images.sh [-v cpu|cuda] [-b BASE_IMAGE] [-t TAG] [-s SOURCE_DIR] [-c WHEEL_CACHE] [-p PYTHON]

  -v VARIANT     cpu (default): torch 2.13.0 CPU; every wheel is staged here and the build is offline
                 cuda: torch with CUDA from the package index during the build (GPU hosts)
  -b BASE_IMAGE  base image (default python:3.11-slim-bookworm); its python3 must match PYTHON's
                 version for the CPU variant, whose wheels are staged with PYTHON
  -t TAG         image tag (default: VARIANT) -> pollen-superlink:TAG and pollen:TAG
  -s SOURCE_DIR  the Pollen source tree (default: this repository)
  -c WHEEL_CACHE where dependency wheels are kept between builds (default ~/.cache/pollen-docker)
  -p PYTHON      interpreter used to build and download wheels (default: python3)
The CPU variant needs the torch==2.13.0+cpu wheel to be reachable by pip (a find-links folder or
PyTorch's CPU wheel index in your pip configuration, e.g. PIP_EXTRA_INDEX_URL).
example: build_images.sh -v cpu -b pollen-base:bookworm
TXT
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
variant="cpu"
base="python:3.11-slim-bookworm"
tag=""
source_dir="$(cd "$here/../.." && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/pollen-docker"
python="python3"
while getopts ":v:b:t:s:c:p:h" opt; do
  case "$opt" in
    v) variant="$OPTARG" ;;
    b) base="$OPTARG" ;;
    t) tag="$OPTARG" ;;
    s) source_dir="$OPTARG" ;;
    c) cache="$OPTARG" ;;
    p) python="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
if [[ "$variant" != cpu && "$variant" != cuda ]]; then
  echo "build_images.sh: -v $variant is not valid: expected cpu or cuda" >&2
  exit 2
fi
tag="${tag:-$variant}"
if [[ ! -f "$source_dir/tasks/assets/tiny-llama/model.safetensors" ]]; then
  echo "build_images.sh: $source_dir/tasks/assets/tiny-llama/model.safetensors is missing;" \
    "build the embedded model first (scripts/build_base_model.py)" >&2
  exit 1
fi
command -v docker >/dev/null || { echo "build_images.sh: docker is not installed" >&2; exit 1; }

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
context="$work/context"  # what docker build sees: the scripts only
wheels="$work/wheels"    # served over http on 127.0.0.1 during the build
mkdir -p "$context/scripts" "$wheels/deps" "$wheels/pollen"
cp "$here/entrypoint.sh" "$here/healthcheck.py" "$here/register_nodes.sh" "$context/scripts/"

# The Pollen wheel, built from a copy of the source (tracked and untracked files, never ignored ones
# such as outputs/ or caches) so the source tree gets no build/ or egg-info folders.
src="$work/src"
mkdir -p "$src"
if git -C "$source_dir" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$source_dir" && git ls-files -co --exclude-standard -z && printf '%s\0' tasks/assets/tiny-llama/*) |
    (cd "$source_dir" && { xargs -0 cp --parents -t "$src" 2>/dev/null || true; })  # lists deleted files too
else
  cp -r "$source_dir"/. "$src"/
fi
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$wheels/pollen" "$src"
wheel="$(ls "$wheels"/pollen/pollen_fl-*.whl)"

deps_id="none"
if [[ "$variant" == cpu ]]; then
  pyver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
  cache_dir="$cache/wheels-cpu-cp$pyver"
  mkdir -p "$cache_dir"
  echo "torch==2.13.0+cpu" >"$work/constraints.txt"
  echo "staging dependency wheels in $cache_dir (cached between builds)"
  "$python" -m pip download --quiet --dest "$cache_dir" --only-binary=:all: \
    --constraint "$work/constraints.txt" "$wheel" 2> >(grep -v "is ignored: it is neither" >&2)
  # Only what this Pollen needs (the cache may hold older versions too): resolve again, offline.
  "$python" -m pip download --quiet --no-index --find-links "$cache_dir" --dest "$wheels/deps" \
    --constraint "$work/constraints.txt" "$wheel"
  rm -f "$wheels"/deps/pollen_fl-*.whl
  # name==version of every staged wheel: the image installs exactly this set.
  for file in "$wheels"/deps/*.whl; do
    base_name="$(basename "$file")"
    IFS=- read -r name version _ <<<"$base_name"
    echo "$name==$version"
  done | sort >"$wheels/deps/requirements.txt"
  deps_id="$(sha256sum "$wheels/deps/requirements.txt" | cut -c1-16)"
fi
pollen_id="$(sha256sum "$wheel" | cut -c1-16)"

# Serve the wheels on loopback; a fixed port keeps Docker's layer cache valid between builds.
port="${POLLEN_WHEELS_PORT:-8765}"
if ! "$python" -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$port" 2>/dev/null; then
  port="$("$python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")"
  echo "port ${POLLEN_WHEELS_PORT:-8765} is busy; serving wheels on $port (cached layers will be rebuilt)"
fi
"$python" -m http.server "$port" --bind 127.0.0.1 --directory "$wheels" >"$work/http.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 50); do
  if "$python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
    "http://127.0.0.1:$port/" 2>/dev/null; then
    break
  fi
  sleep 0.2
done

build() {
  local target="$1" image="$2"
  echo "building $image (target $target, base $base, variant $variant)"
  docker build --network host -f "$here/../Dockerfile" --target "$target" \
    --build-arg "BASE_IMAGE=$base" --build-arg "VARIANT=$variant" \
    --build-arg "WHEELS_URL=http://127.0.0.1:$port" --build-arg "DEPS_ID=$deps_id" \
    --build-arg "POLLEN_WHEEL=$(basename "$wheel")" --build-arg "POLLEN_ID=$pollen_id" \
    -t "$image" "$context"
}
build superlink "pollen-superlink:$tag"
build pollen "pollen:$tag"
echo "built pollen-superlink:$tag and pollen:$tag"
