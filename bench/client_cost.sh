#!/usr/bin/env bash
# The load generator's CPU per message (send plus receive, user + system, from /usr/bin/time)
# and the server's (from /proc), for pairs 16 x 64 B: relay taking messages in place
# (`Events::drain`), relay taking each as an event (`--one-at-a-time`), relay with keys and
# receipts, and nats-server through relay-bench's minimal NATS client. Fresh servers each
# run, ROUNDS rounds interleaved. Not a test: nothing here passes or fails on speed.
#
#   bash bench/client_cost.sh              # 3 rounds
#   ROUNDS=1 M=1000000 bash bench/client_cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
M=${M:-3000000}
PORT=${PORT:-18091}
NATS_PORT=${NATS_PORT:-14299}
W=(pairs --pairs 16)

. bench/lib.sh
ensure_nats_server
cargo build --release -q -p relay-server -p relay-bench
bench=target/release/relay-bench
server=target/release/relay-server
tck=$(getconf CLK_TCK)

# Runs relay-bench with the given arguments against the server with pid $1 and prints a line
# named $2.
measure() {
    local pid=$1 name=$2 s0 s1 out rate cpu
    shift 2
    s0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    out=$( { /usr/bin/time -f "CPU %U %S" "$bench" "$@" --messages "$M"; } 2>&1 )
    s1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    rate=$(echo "$out" | awk '/msgs\/s/ {print $2 $3}')
    cpu=$(echo "$out" | awk '/^CPU/ {print $2, $3}')
    awk -v n="$name" -v r="$rate" -v s=$((s1 - s0)) -v c="$cpu" -v t="$tck" -v m="$M" 'BEGIN {
        split(c, u, " ");
        printf "%-22s %8s  server %4.0f ns  client user %4.0f + system %4.0f = %4.0f ns/msg\n",
            n, r, s / t * 1e9 / m, u[1] * 1e9 / m, u[2] * 1e9 / m, (u[1] + u[2]) * 1e9 / m }'
}

relay() {
    local name=$1 dir pid
    shift
    dir=$(mktemp -d)
    "$server" --host 127.0.0.1 --port "$PORT" --data-dir "$dir" </dev/null >/dev/null 2>&1 &
    pid=$!
    sleep 0.4
    measure "$pid" "$name" --target "127.0.0.1:$PORT" "${W[@]}" "$@"
    kill "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$dir"
}

nats() {
    local pid
    nats-server -a 127.0.0.1 -p "$NATS_PORT" >/dev/null 2>&1 &
    pid=$!
    sleep 0.4
    measure "$pid" "nats (minimal client)" --target "nats://127.0.0.1:$NATS_PORT" "${W[@]}"
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

for round in $(seq "$ROUNDS"); do
    echo "== round $round"
    relay "relay, in place"
    relay "relay, one at a time" --one-at-a-time
    relay "relay, keys" --keys
    nats
done
