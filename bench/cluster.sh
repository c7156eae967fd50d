#!/usr/bin/env bash
# Measures cluster mode against the targets in docs/CLUSTER.md ("Speed"): starts nats-server
# with JetStream and two relay-server nodes (default auth, so the name table and the inboxes
# are in NATS) plus one plain relay-server, all on loopback, then ROUNDS times: same-node
# pairs against the plain server, cross-node pairs (every message from node a to node b),
# cross-node latency at 20,000 msgs/s, and `NotFound` on the plain server and on a node; then
# registration one at a time on a node. Not a test: nothing here passes or fails on speed.
#
#   bash bench/cluster.sh            # 3 rounds, about a minute each
#   ROUNDS=1 bash bench/cluster.sh   # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
NATS_PORT=${NATS_PORT:-14230}
A=${A:-18101} B=${B:-18102} PLAIN=${PLAIN:-18103}

. bench/lib.sh
ensure_nats_server
cargo build --release -q -p relay-server -p relay-bench
bench=target/release/relay-bench
server=target/release/relay-server

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$work/js" >"$work/nats.log" 2>&1 &
pids+=($!)
sleep 0.5
for node in a b; do
    port=$A
    [ "$node" = b ] && port=$B
    "$server" --host 127.0.0.1 --port "$port" --data-dir "$work/$node" \
        --cluster "nats://127.0.0.1:$NATS_PORT" --node "$node" </dev/null >"$work/$node.log" 2>&1 &
    pids+=($!)
done
"$server" --host 127.0.0.1 --port "$PLAIN" --data-dir "$work/plain" </dev/null >"$work/plain.log" 2>&1 &
pids+=($!)
sleep 1.5

# The lines of a report that matter here, on one line (progress lines, on stderr, dropped).
brief() { grep -E "$1" | tr -s ' ' | tr '\n' ' '; echo; }
run() { "$bench" "$@" 2>/dev/null; }

for round in $(seq "$ROUNDS"); do
    echo "== round $round"
    echo -n "pairs, one server:           "
    run --target "127.0.0.1:$PLAIN" pairs --messages 2000000 | brief "msgs/s|lost"
    echo -n "pairs, same node:            "
    run --target "127.0.0.1:$A" pairs --messages 2000000 | brief "msgs/s|lost"
    echo -n "pairs, node a -> node b:     "
    run --target "127.0.0.1:$B" --senders-target "127.0.0.1:$A" pairs --messages 2000000 \
        | brief "msgs/s|lost|refused"
    echo -n "latency 20k, node a -> b:    "
    run --target "127.0.0.1:$B" --senders-target "127.0.0.1:$A" latency --rate 20000 \
        --duration 8s | brief "p50|p99 |lost"
    echo -n "NotFound, one server:        "
    run --target "127.0.0.1:$PLAIN" not-found --duration 5s | brief "p50|p99 "
    echo -n "NotFound, cluster node:      "
    run --target "127.0.0.1:$A" not-found --duration 5s | brief "p50|p99 "
done
echo -n "register one at a time, node, guests:   "
run --target "127.0.0.1:$A" connections --clients 1000 --in-flight 1 | brief "register"
echo -n "register one at a time, node, new keys: "
run --target "127.0.0.1:$A" connections --clients 1000 --in-flight 1 --keys | brief "register"
