#!/usr/bin/env bash
# Container entry point: turns a role and POLLEN_* environment variables into the Flower command.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: entrypoint.sh ROLE | COMMAND...

ROLE is one of
  superlink   flower-superlink (process isolation: the ServerApp runs in the serverapp container)
  serverapp   flower-superexec for ServerApps, connected to the SuperLink's Runtime API
  supernode   flower-supernode with its ClientApps in subprocesses
  register    register every /keys/*.pub with the SuperLink (TLS overlay), then exit
Anything else is run as a command (e.g. `bash`, `pollen-check`).

Environment (defaults in brackets):
  POLLEN_TLS [0]            1: TLS on every API, certificates in POLLEN_CERTS [/certs]
  POLLEN_NODE_AUTH [=TLS]   1: the SuperLink accepts registered SuperNodes only
  POLLEN_SUPERLINK_HOST [superlink]  POLLEN_FLEET_PORT [9092]  POLLEN_API_PORT [9093]
  POLLEN_BIND_HOST [0.0.0.0]  superlink: the interface its Fleet and Control APIs listen on
  POLLEN_HEALTH_PORT        gRPC health port of this container [superlink 9190, serverapp 9191,
                            supernode 9192], bound to 127.0.0.1
  POLLEN_NODE_CONFIG        supernode: Pollen node config, e.g. "data-path='/data/train.jsonl' lora-rank=8"
  POLLEN_NODE_KEY [/run/secrets/node-key]  supernode: private key when POLLEN_NODE_AUTH=1
  POLLEN_NODE_PORT [9094]   supernode: local port of its ClientApp runtime
TXT
}

tls="${POLLEN_TLS:-0}"
certs="${POLLEN_CERTS:-/certs}"
node_auth="${POLLEN_NODE_AUTH:-$tls}"
link_host="${POLLEN_SUPERLINK_HOST:-superlink}"
fleet_port="${POLLEN_FLEET_PORT:-9092}"
api_port="${POLLEN_API_PORT:-9093}"
bind="${POLLEN_BIND_HOST:-0.0.0.0}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

need_file() {
  if [[ ! -f "$1" ]]; then
    echo "entrypoint: $1 is missing ($2)" >&2
    exit 1
  fi
}

client_tls() {
  if [[ "$tls" == "1" ]]; then
    need_file "$certs/ca.crt" "mount the federation's certificates at $certs"
    echo "--root-certificates $certs/ca.crt"
  else
    echo "--insecure"
  fi
}

role="${1:-}"
case "$role" in
  superlink)
    args=(--isolation process --database /state/link.db
      --fleet-api-address "$bind:$fleet_port" --host "$bind" --port "$api_port"
      --disable-runtime-dependency-installation
      --health-server-address "127.0.0.1:${POLLEN_HEALTH_PORT:-9190}")
    if [[ "$tls" == "1" ]]; then
      for file in ca.crt server.pem server.key; do
        need_file "$certs/$file" "make it with docker/scripts/make_certs.sh"
      done
      args+=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem"
        --ssl-keyfile "$certs/server.key")
      if [[ "$node_auth" == "1" ]]; then
        args+=(--enable-supernode-auth)
      fi
    else
      args+=(--insecure)
    fi
    exec flower-superlink "${args[@]}"
    ;;
  serverapp)
    # shellcheck disable=SC2046  # client_tls prints whole flags
    exec flower-superexec --runtime-api-address "$link_host:$api_port" $(client_tls) \
      --health-server-address "127.0.0.1:${POLLEN_HEALTH_PORT:-9191}"
    ;;
  supernode)
    args=(--superlink "$link_host:$fleet_port" --port "${POLLEN_NODE_PORT:-9094}"
      --health-server-address "127.0.0.1:${POLLEN_HEALTH_PORT:-9192}")
    # shellcheck disable=SC2207
    args+=($(client_tls))
    if [[ "$node_auth" == "1" ]]; then
      key="${POLLEN_NODE_KEY:-/run/secrets/node-key}"
      need_file "$key" "mount this node's private key (docker/scripts/make_node_keys.sh)"
      args+=(--auth-supernode-private-key "$key")
    fi
    if [[ -n "${POLLEN_NODE_CONFIG:-}" ]]; then
      args+=(--node-config "$POLLEN_NODE_CONFIG")
    fi
    exec flower-supernode "${args[@]}"
    ;;
  register)
    exec /opt/pollen/bin/register_nodes.sh "$link_host:$api_port" "$certs/ca.crt" /keys
    ;;
  -h | --help | "")
    usage
    ;;
  *)
    exec "$@"
    ;;
esac
