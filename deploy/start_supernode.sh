#!/usr/bin/env bash
# Start one Pollen SuperNode: it connects out to the SuperLink over TLS, proves who it is with its
# private key, and trains on the data named in its node config. Only adapter deltas leave it.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: start_supernode.sh -s SUPERLINK -r CA_CERT -k PRIVATE_KEY [-n NODE_CONFIG] [-p PORT]
                          [-- EXTRA_FLOWER_SUPERNODE_ARGS...]

  -s SUPERLINK    the SuperLink's Fleet API address, host:port (the operator tells you)
  -r CA_CERT      the federation's CA certificate, ca.crt (the operator sends it)
  -k PRIVATE_KEY  this institution's private key (made by docker/scripts/make_node_keys.sh)
  -n NODE_CONFIG  Pollen node config, space-separated key=value pairs, strings quoted:
                    data-path='/data/train.jsonl'  your Alpaca-style file (.json .jsonl .csv .parquet)
                    lora-rank=16                   your adapter rank (0: the server decides)
                    device='cuda:0'                where to train ('' follows the run config)
                    partition-id=0 num-partitions=3  only for demos without your own data
  -p PORT         local port of this SuperNode's app runtime (default 9094; differ per node on one host)
The command runs in the foreground; stop it with Ctrl-C (SIGINT) or SIGTERM.
example: start_supernode.sh -s superlink.example.org:9092 -r ca.crt -k hospital-a \
           -n "data-path='/data/notes.jsonl' lora-rank=8"
TXT
}

superlink=""
ca_cert=""
key=""
node_config=""
port="9094"
while getopts ":s:r:k:n:p:h" opt; do
  case "$opt" in
    s) superlink="$OPTARG" ;;
    r) ca_cert="$OPTARG" ;;
    k) key="$OPTARG" ;;
    n) node_config="$OPTARG" ;;
    p) port="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ "${1:-}" == "--" ]]; then shift; fi

missing=()
[[ -n "$superlink" ]] || missing+=("-s SUPERLINK")
[[ -n "$ca_cert" ]] || missing+=("-r CA_CERT")
[[ -n "$key" ]] || missing+=("-k PRIVATE_KEY")
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "start_supernode.sh: missing ${missing[*]}" >&2
  usage >&2
  exit 2
fi
for file in "$ca_cert" "$key"; do
  if [[ ! -f "$file" ]]; then
    echo "start_supernode.sh: $file does not exist or is not a file" >&2
    exit 1
  fi
done
if ! [[ "$port" =~ ^[0-9]+$ ]]; then
  echo "start_supernode.sh: -p $port is not valid: expected a port number" >&2
  exit 2
fi
command -v flower-supernode >/dev/null || {
  echo "start_supernode.sh: flower-supernode not found; install Pollen (pip install -e .) first" >&2
  exit 1
}

args=(
  --superlink "$superlink"
  --root-certificates "$ca_cert"
  --auth-supernode-private-key "$key"
  --port "$port"
)
if [[ -n "$node_config" ]]; then
  args+=(--node-config "$node_config")
fi
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec flower-supernode "${args[@]}" "$@"
