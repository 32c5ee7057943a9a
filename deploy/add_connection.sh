#!/usr/bin/env bash
# Add a named SuperLink connection (address + CA certificate) to the Flower CLI configuration, so that
# `flwr run . NAME` and `flwr supernode register KEY.pub NAME` reach that SuperLink over TLS.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: add_connection.sh [-f] NAME ADDRESS CA_CERT

  NAME     connection name, e.g. pollen (letters, digits, '-', '_')
  ADDRESS  the SuperLink's Control API, host:port (start_superlink.sh -H/-p; default 127.0.0.1:9093)
  CA_CERT  the federation's ca.crt
  -f       replace an existing connection of that name
Writes $FLWR_HOME/config.toml (FLWR_HOME defaults to ~/.flwr).
example: add_connection.sh pollen 127.0.0.1:9093 certs/ca.crt
TXT
}

force=0
while getopts ":fh" opt; do
  case "$opt" in
    f) force=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -ne 3 ]]; then
  usage >&2
  exit 2
fi
name="$1"
address="$2"
ca_cert="$3"
if ! [[ "$name" =~ ^[A-Za-z0-9_-]+$ ]]; then
  echo "add_connection.sh: name '$name' is not valid: use letters, digits, '-' and '_' only" >&2
  exit 2
fi
if ! [[ "$address" =~ ^[^:]+:[0-9]+$ ]]; then
  echo "add_connection.sh: address '$address' is not valid: expected host:port" >&2
  exit 2
fi
if [[ ! -f "$ca_cert" ]]; then
  echo "add_connection.sh: CA certificate $ca_cert does not exist" >&2
  exit 1
fi
ca_cert="$(cd "$(dirname "$ca_cert")" && pwd)/$(basename "$ca_cert")"
home="${FLWR_HOME:-$HOME/.flwr}"
config="$home/config.toml"
mkdir -p "$home"
if [[ ! -f "$config" ]]; then
  printf '[superlink]\ndefault = "%s"\n' "$name" >"$config"
fi
if grep -q "^\[superlink\.$name\]" "$config"; then
  if [[ $force -eq 0 ]]; then
    echo "add_connection.sh: $config already has a connection '$name'; pass -f to replace it" >&2
    exit 1
  fi
  # Drop the old table: from its header up to the next table header.
  awk -v header="[superlink.$name]" '
    $0 == header { skip = 1; next }
    /^\[/ { skip = 0 }
    !skip { print }
  ' "$config" | cat -s >"$config.tmp"
  mv "$config.tmp" "$config"
fi
printf '\n[superlink.%s]\naddress = "%s"\nroot-certificates = "%s"\n' "$name" "$address" "$ca_cert" >>"$config"
echo "connection '$name' -> $address (CA $ca_cert) added to $config"
