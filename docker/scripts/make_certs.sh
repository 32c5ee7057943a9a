#!/usr/bin/env bash
# Make a private certificate authority and a SuperLink server certificate for the given host names.
# The CA certificate (ca.crt) is what every institution and every `flwr` user receives; the CA key
# stays with the operator.
set -euo pipefail

usage() {
  cat <<'TXT'
usage: make_certs.sh [-d DAYS] [-f] OUT_DIR [HOST ...]

Writes into OUT_DIR:
  ca.crt ca.key          a new certificate authority (keep ca.key private)
  server.pem server.key  the SuperLink's certificate, valid for every HOST (DNS names or IP addresses)

HOST defaults to: localhost 127.0.0.1
  -d DAYS  validity in days (default 365)
  -f       overwrite existing files in OUT_DIR
example: make_certs.sh certs superlink.example.org 127.0.0.1 localhost
TXT
}

days=365
force=0
while getopts ":d:fh" opt; do
  case "$opt" in
    d) days="$OPTARG" ;;
    f) force=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
out="$1"
shift
hosts=("$@")
if [[ ${#hosts[@]} -eq 0 ]]; then
  hosts=(localhost 127.0.0.1)
fi
if ! [[ "$days" =~ ^[0-9]+$ ]] || [[ "$days" -lt 1 ]]; then
  echo "make_certs.sh: -d $days is not valid: expected a whole number of days >= 1" >&2
  exit 2
fi
command -v openssl >/dev/null || { echo "make_certs.sh: openssl is not installed" >&2; exit 1; }

mkdir -p "$out"
if [[ $force -eq 0 && ( -e "$out/ca.key" || -e "$out/server.key" ) ]]; then
  echo "make_certs.sh: $out already holds keys; pass -f to replace them" >&2
  exit 1
fi

# subjectAltName: IP:... for addresses, DNS:... for names.
san=""
for host in "${hosts[@]}"; do
  if [[ "$host" =~ ^[0-9]+(\.[0-9]+){3}$ || "$host" == *:* ]]; then
    entry="IP:$host"
  else
    entry="DNS:$host"
  fi
  san="${san:+$san,}$entry"
done

umask 077
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT

openssl req -x509 -new -newkey rsa:4096 -nodes -sha256 -days "$days" \
  -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=Pollen federation CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null

openssl req -new -newkey rsa:4096 -nodes -sha256 \
  -keyout "$out/server.key" -out "$workdir/server.csr" -subj "/CN=${hosts[0]}" 2>/dev/null

cat >"$workdir/ext.cnf" <<CNF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
CNF

openssl x509 -req -in "$workdir/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -out "$out/server.pem" -days "$days" -sha256 -extfile "$workdir/ext.cnf" 2>/dev/null
rm -f "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"
# The server key must be readable by the SuperLink's user inside containers too.
chmod 640 "$out/server.key"

echo "CA certificate:     $out/ca.crt (give this to every institution and flwr user)"
echo "CA key:             $out/ca.key (keep private; needed only to issue new server certificates)"
echo "server certificate: $out/server.pem for $san"
echo "server key:         $out/server.key"
