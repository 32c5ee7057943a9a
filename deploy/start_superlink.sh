#!/usr/bin/env bash
# Start a Flower SuperLink for Pollen: TLS on every API, SuperNode authentication on, state in a
# database file (so registered nodes and runs survive a restart), no per-run dependency installs.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: start_superlink.sh -c CERT_DIR [-d STATE_DIR] [-f FLEET_ADDRESS] [-H API_HOST] [-p API_PORT]
                          [-- EXTRA_FLOWER_SUPERLINK_ARGS...]

  -c CERT_DIR       folder with ca.crt, server.pem, server.key (docker/scripts/make_certs.sh makes them)
  -d STATE_DIR      folder of the SuperLink database link.db (default: ./superlink-state)
  -f FLEET_ADDRESS  where SuperNodes connect, host:port (default: 0.0.0.0:9092)
  -H API_HOST       interface of the Control/Runtime HTTPS API used by `flwr` (default: 127.0.0.1)
  -p API_PORT       its port (default: 9093)
The command runs in the foreground; stop it with Ctrl-C (SIGINT) or SIGTERM.
example: start_superlink.sh -c certs -d state -f 0.0.0.0:9092
TXT
}

cert_dir=""
state_dir="./superlink-state"
fleet="0.0.0.0:9092"
api_host="127.0.0.1"
api_port="9093"
while getopts ":c:d:f:H:p:h" opt; do
  case "$opt" in
    c) cert_dir="$OPTARG" ;;
    d) state_dir="$OPTARG" ;;
    f) fleet="$OPTARG" ;;
    H) api_host="$OPTARG" ;;
    p) api_port="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ "${1:-}" == "--" ]]; then shift; fi

if [[ -z "$cert_dir" ]]; then
  echo "start_superlink.sh: -c CERT_DIR is required (TLS is always on)" >&2
  usage >&2
  exit 2
fi
for file in ca.crt server.pem server.key; do
  if [[ ! -f "$cert_dir/$file" ]]; then
    echo "start_superlink.sh: $cert_dir/$file is missing; make it with docker/scripts/make_certs.sh" >&2
    exit 1
  fi
done
if ! [[ "$api_port" =~ ^[0-9]+$ ]]; then
  echo "start_superlink.sh: -p $api_port is not valid: expected a port number" >&2
  exit 2
fi
command -v flower-superlink >/dev/null || {
  echo "start_superlink.sh: flower-superlink not found; install Pollen (pip install -e .) first" >&2
  exit 1
}
mkdir -p "$state_dir"
cert_dir="$(cd "$cert_dir" && pwd)"
state_dir="$(cd "$state_dir" && pwd)"

# Apps run with the packages already installed here; nothing is pip-installed per run.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec flower-superlink \
  --ssl-ca-certfile "$cert_dir/ca.crt" \
  --ssl-certfile "$cert_dir/server.pem" \
  --ssl-keyfile "$cert_dir/server.key" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --database "$state_dir/link.db" \
  --fleet-api-address "$fleet" \
  --host "$api_host" \
  --port "$api_port" \
  "$@"
