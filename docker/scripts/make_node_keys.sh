#!/usr/bin/env bash
# Make one SuperNode authentication key pair (ECDSA P-384, OpenSSH format) per institution.
# The private key stays at the institution; the public key is registered with the SuperLink
# (`flwr supernode register <name>.pub <connection>`).
set -euo pipefail

usage() {
  cat <<'TXT'
usage: make_node_keys.sh [-f] OUT_DIR NAME [NAME ...]

For every NAME (letters, digits, '-', '_') writes into OUT_DIR:
  NAME      the institution's private key (send it to that institution only)
  NAME.pub  its public key (the operator registers it with the SuperLink)
  -f  overwrite existing keys
example: make_node_keys.sh keys hospital-a hospital-b
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
if [[ $# -lt 2 ]]; then
  usage >&2
  exit 2
fi
out="$1"
shift
command -v ssh-keygen >/dev/null || {
  echo "make_node_keys.sh: ssh-keygen is not installed (Debian: apt-get install openssh-client)" >&2
  exit 1
}
mkdir -p "$out"
for name in "$@"; do
  if ! [[ "$name" =~ ^[A-Za-z0-9_-]+$ ]]; then
    echo "make_node_keys.sh: name '$name' is not valid: use letters, digits, '-' and '_' only" >&2
    exit 2
  fi
  key="$out/$name"
  if [[ -e "$key" && $force -eq 0 ]]; then
    echo "make_node_keys.sh: $key exists; pass -f to replace it" >&2
    exit 1
  fi
  rm -f "$key" "$key.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "pollen-$name" -f "$key"
  chmod 600 "$key"
  echo "$name: private key $key, public key $key.pub"
done
