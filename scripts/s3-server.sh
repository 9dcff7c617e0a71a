#!/usr/bin/env bash
# Start or stop a real S3-compatible server on loopback, on a free port, with a bucket.
#
#   scripts/s3-server.sh start [moto|s3s-fs]   prints `export AWS_...` lines for eval, e.g.
#       eval "$(scripts/s3-server.sh start)"; sae dataset info s3://$SAE_S3_BUCKET/ds
#   scripts/s3-server.sh stop
#
# moto_server (default) keeps objects in memory and does not check signatures; s3s-fs keeps them
# in a directory and checks SigV4 against the keys it was started with. The store's own tests
# start their own servers; this script is for manual runs, demos and benchmarks.
#
# Environment: SAE_S3_STATE (default ${TMPDIR:-/tmp}/sae-s3-server), SAE_VENV (default
# $SAE_CACHE/venv, SAE_CACHE defaulting to ~/.cache/sae-pipeline; for moto_server), SAE_S3S_FS
# (default ~/.cargo/bin/s3s-fs).
set -euo pipefail

STATE=${SAE_S3_STATE:-${TMPDIR:-/tmp}/sae-s3-server}
VENV=${SAE_VENV:-${SAE_CACHE:-$HOME/.cache/sae-pipeline}/venv}
BUCKET=sae
PY=$VENV/bin/python3
[ -x "$PY" ] || PY=python3

cmd=${1:-}
kind=${2:-moto}

stop() {
  if [ -f "$STATE/pid" ]; then
    pid=$(cat "$STATE/pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$STATE/pid"
  fi
  rm -rf "$STATE"
}

case "$cmd" in
  start)
    stop
    mkdir -p "$STATE"
    port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    case "$kind" in
      moto)
        bin=$VENV/bin/moto_server
        [ -x "$bin" ] || bin=$(command -v moto_server || true)
        [ -n "$bin" ] || { echo "s3-server.sh: moto_server not found (pip install 'moto[server]' into $VENV)" >&2; exit 1; }
        "$bin" -H 127.0.0.1 -p "$port" >"$STATE/log" 2>&1 &
        echo $! >"$STATE/pid"
        ak=test; sk=test
        ;;
      s3s-fs)
        bin=${SAE_S3S_FS:-$HOME/.cargo/bin/s3s-fs}
        [ -x "$bin" ] || bin=$(command -v s3s-fs || true)
        [ -n "$bin" ] || { echo "s3-server.sh: s3s-fs not found (cargo install s3s-fs --version 0.14.1 --features binary)" >&2; exit 1; }
        mkdir -p "$STATE/data/$BUCKET"
        ak=saelocal; sk=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')
        "$bin" --host 127.0.0.1 --port "$port" --access-key "$ak" --secret-key "$sk" "$STATE/data" >"$STATE/log" 2>&1 &
        echo $! >"$STATE/pid"
        ;;
      *) echo "s3-server.sh: unknown server $kind (moto or s3s-fs)" >&2; exit 2 ;;
    esac
    for _ in $(seq 100); do
      if "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then break; fi
      kill -0 "$(cat "$STATE/pid")" 2>/dev/null || { echo "s3-server.sh: $kind exited; see $STATE/log" >&2; cat "$STATE/log" >&2; exit 1; }
      sleep 0.2
    done
    if [ "$kind" = moto ]; then
      "$PY" -c "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:$port/$BUCKET', method='PUT'))"
    fi
    {
      echo "export AWS_ENDPOINT=http://127.0.0.1:$port"
      echo "export AWS_ALLOW_HTTP=true"
      echo "export AWS_REGION=us-east-1"
      echo "export AWS_ACCESS_KEY_ID=$ak"
      echo "export AWS_SECRET_ACCESS_KEY=$sk"
      echo "export SAE_S3_BUCKET=$BUCKET"
    } >"$STATE/env"
    cat "$STATE/env"
    echo "s3-server.sh: $kind on 127.0.0.1:$port, bucket $BUCKET (state in $STATE)" >&2
    ;;
  stop) stop ;;
  *) echo "usage: s3-server.sh start [moto|s3s-fs] | stop" >&2; exit 2 ;;
esac
