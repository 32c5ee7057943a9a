#!/usr/bin/env bash
# Register every institution's public key (*.pub in a folder) with the SuperLink. Keys that are
# already registered are left as they are, so this can run on every `docker compose up`.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: register_nodes.sh CONTROL_ADDRESS CA_CERT KEYS_DIR

  CONTROL_ADDRESS  the SuperLink's Control API, host:port
  CA_CERT          the federation's ca.crt
  KEYS_DIR         folder with one NAME.pub per institution (docker/scripts/make_node_keys.sh)
Waits (at most 120 s) for the SuperLink, then registers each key under its NAME.
TXT
}

if [[ $# -ne 3 ]]; then
  usage >&2
  exit 2
fi
address="$1"
ca_cert="$2"
keys="$3"
[[ -f "$ca_cert" ]] || { echo "register_nodes.sh: CA certificate $ca_cert is missing" >&2; exit 1; }
shopt -s nullglob
pubs=("$keys"/*.pub)
if [[ ${#pubs[@]} -eq 0 ]]; then
  echo "register_nodes.sh: no *.pub files in $keys" >&2
  exit 1
fi

export FLWR_HOME="${FLWR_HOME:-$(mktemp -d)}"
mkdir -p "$FLWR_HOME"
printf '[superlink]\ndefault = "federation"\n\n[superlink.federation]\naddress = "%s"\nroot-certificates = "%s"\n' \
  "$address" "$ca_cert" >"$FLWR_HOME/config.toml"

for attempt in $(seq 1 60); do
  if flwr supernode ls federation --format json >/dev/null 2>&1; then
    break
  fi
  if [[ $attempt -eq 60 ]]; then
    echo "register_nodes.sh: the SuperLink at $address did not answer within 120 s" >&2
    exit 1
  fi
  sleep 2
done

for pub in "${pubs[@]}"; do
  name="$(basename "$pub" .pub)"
  out="$(flwr supernode register "$pub" federation --name "$name" 2>&1)" && {
    echo "registered $name"
    continue
  }
  if grep -qi "already" <<<"$out"; then
    echo "$name was already registered"
  else
    echo "register_nodes.sh: registering $name failed: $out" >&2
    exit 1
  fi
done
