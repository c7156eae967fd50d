#!/usr/bin/env bash
# Compares relay-server with nats-server on this machine: installs nats-server from Debian if it
# is missing, then RUNS times starts both servers fresh on loopback, runs every relay-bench
# workload on each (`relay-bench compare`), and stops them. Prints the medians and the
# relay/nats ratios at the end. Not a test: nothing here passes or fails on speed.
#
#   bash bench/compare.sh                 # 3 runs, about 3 minutes each
#   RUNS=1 MESSAGES=500000 DURATION=3s CLIENTS=2000 bash bench/compare.sh   # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
MESSAGES=${MESSAGES:-2000000}
DURATION=${DURATION:-10s}
CLIENTS=${CLIENTS:-10000}
RELAY_PORT=${RELAY_PORT:-18080}
NATS_PORT=${NATS_PORT:-14222}
OUT=${OUT:-target/bench/compare-$(date +%Y%m%d-%H%M%S).jsonl}

. bench/lib.sh
ensure_nats_server

cargo build --release -q -p relay-server -p relay-bench
# 10,000 idle clients on each side of loopback need that many descriptors and more.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((CLIENTS + 2200)) ]; then
    echo "ulimit -n is $(ulimit -n); CLIENTS=$CLIENTS needs about $((CLIENTS + 2200))" >&2
    exit 1
fi

mkdir -p "$(dirname "$OUT")"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

wait_for_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listening on port $1" >&2
    return 1
}

for run in $(seq "$RUNS"); do
    echo "== run $run of $RUNS" >&2
    # A fresh name table each run, outside the repository.
    data_dir=$(mktemp -d)
    target/release/relay-server --host 127.0.0.1 --port "$RELAY_PORT" --data-dir "$data_dir" \
        --max-clients $((CLIENTS + 2200)) </dev/null >/dev/null 2>&1 &
    relay_pid=$!
    nats-server -a 127.0.0.1 -p "$NATS_PORT" >/dev/null 2>&1 &
    nats_pid=$!
    pids=("$relay_pid" "$nats_pid")
    wait_for_port "$RELAY_PORT"
    wait_for_port "$NATS_PORT"
    target/release/relay-bench compare --json \
        --relay "127.0.0.1:$RELAY_PORT" --nats "nats://127.0.0.1:$NATS_PORT" \
        --relay-pid "$relay_pid" --nats-pid "$nats_pid" \
        --messages "$MESSAGES" --duration "$DURATION" --clients "$CLIENTS" >>"$OUT"
    cleanup
    rm -rf "$data_dir"
    pids=()
done

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "nats-server $(nats-server --version | awk '{print $2}'), results in $OUT"
target/release/relay-bench report "$OUT"
