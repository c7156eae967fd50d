//! Command-line interface: parses arguments, runs one workload, prints its report.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::store::StoreOptions;
use relay_server::parse_duration;

use crate::compare;
use crate::target::Target;
use crate::workloads::{self, ConnectionsOptions, FlowOptions, LatencyOptions};

/// Load generator for relay-server; `--target nats://HOST:PORT` runs the same workloads against
/// a nats-server (`async-nats://HOST:PORT`: through async-nats, the official client).
#[derive(Debug, Parser)]
#[command(name = "relay-bench", version)]
pub struct Cli {
    /// Server to drive: HOST:PORT or relay://HOST:PORT for relay-server, nats://HOST:PORT for
    /// nats-server through relay-bench's minimal client, async-nats://HOST:PORT for nats-server
    /// through async-nats.
    #[arg(long, global = true, default_value = "127.0.0.1:8080", value_parser = Target::parse)]
    pub target: Target,
    /// Connect the senders here instead of --target (the receivers stay on --target): with
    /// two nodes of a cluster, every message crosses between them.
    #[arg(long, global = true, value_name = "HOST:PORT", value_parser = Target::parse)]
    pub senders_target: Option<Target>,
    /// Print the report as one JSON object instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Connect to relay over TLS, pinning the server's certificate by this SHA-256
    /// fingerprint (what `relay-server --tls-self-signed` logs).
    #[arg(long, global = true, value_name = "SHA256")]
    pub tls_fingerprint: Option<String>,
    /// A receiver that hears nothing for this long gives up and counts the rest as lost.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub stall: Duration,
    /// What to run.
    #[command(subcommand)]
    pub workload: Workload,
}

/// The workloads.
#[derive(Debug, Subcommand)]
pub enum Workload {
    /// P senders, each to its own receiver, as fast as the server takes them.
    Pairs {
        /// Sender/receiver pairs.
        #[arg(long, default_value_t = 16)]
        pairs: usize,
        /// How many messages, how big.
        #[command(flatten)]
        flow: FlowArgs,
    },
    /// N senders to one receiver, as fast as the server takes them.
    FanIn {
        /// Senders.
        #[arg(long, default_value_t = 64)]
        senders: usize,
        /// How many messages, how big.
        #[command(flatten)]
        flow: FlowArgs,
    },
    /// P pairs paced to a total rate; one-way latency percentiles.
    Latency {
        /// Sender/receiver pairs.
        #[arg(long, default_value_t = 16)]
        pairs: usize,
        /// Messages per second, all pairs together.
        #[arg(long, default_value_t = 20_000)]
        rate: u64,
        /// How long to send.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// Payload bytes per message (at least 20).
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Every workload on a relay-server and a nats-server, once each; prints the rows (JSON
    /// with --json, which `report` reads).
    Compare {
        /// The relay-server, HOST:PORT.
        #[arg(long, default_value = "127.0.0.1:8080", value_parser = Target::parse)]
        relay: Target,
        /// The nats-server, nats://HOST:PORT (driven through both the minimal client and
        /// async-nats).
        #[arg(long, default_value = "nats://127.0.0.1:4222", value_parser = Target::parse)]
        nats: Target,
        /// relay-server's process id, for its memory per idle client.
        #[arg(long)]
        relay_pid: Option<u32>,
        /// nats-server's process id.
        #[arg(long)]
        nats_pid: Option<u32>,
        /// Messages per throughput workload (the 1 KiB one sends half as many).
        #[arg(long, default_value_t = 2_000_000)]
        messages: u64,
        /// Length of each latency run.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// Idle clients for the memory measurement.
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
    },
    /// Reads the JSON lines of several `compare --json` runs and prints medians and ratios.
    Report {
        /// Files with one `compare --json` line per run.
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
    /// Relay only: S senders store N messages for R offline recipients (each acknowledged as
    /// stored, at most a window unacknowledged per sender), then the recipients log in and
    /// drain: store rate, store-ack latency, drain rate, lost, duplicated, out of order.
    Store {
        /// Senders.
        #[arg(long, default_value_t = 16)]
        senders: usize,
        /// Offline recipients.
        #[arg(long, default_value_t = 16)]
        recipients: usize,
        /// Messages in all.
        #[arg(long, default_value_t = 200_000)]
        messages: u64,
        /// Payload bytes per message (at least 20).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Messages a sender may have waiting for `Stored`.
        #[arg(long, default_value_t = 1000)]
        window: usize,
        /// Messages per second, all senders together (0: as fast as the server stores).
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Relay only: C clients send, paced, to names nobody holds; time to each `NotFound`
    /// (in a cluster, answered from the node's view of who is online where).
    NotFound {
        /// Sending clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Messages per second, all clients together.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        /// How long to send.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
    },
    /// C idle registered clients: time to connect them, and the server's memory per client.
    Connections {
        /// Clients to open (raise `ulimit -n` for many).
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// The server's process id, to read its memory (Linux).
        #[arg(long)]
        server_pid: Option<u32>,
        /// Relay only: register each client with a new key (signed login, name bound and
        /// stored), to measure the registration rate with signatures.
        #[arg(long)]
        keys: bool,
        /// Registrations in flight at once (1: one at a time, each one's own latency).
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
    },
}

/// Size of a flow.
#[derive(Debug, Args)]
pub struct FlowArgs {
    /// Messages in all.
    #[arg(long, default_value_t = 2_000_000)]
    pub messages: u64,
    /// Payload bytes per message (at least 20).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Relay only: every client registers with a new key, so receivers acknowledge what they
    /// take and senders get delivery receipts.
    #[arg(long)]
    pub keys: bool,
    /// Relay only: receivers take each message as an event (`Events::next`) rather than in
    /// place (`Events::drain`, the default).
    #[arg(long)]
    pub one_at_a_time: bool,
}

/// Runs the workload the arguments name and prints its report.
pub async fn run(cli: Cli) -> Result<String, String> {
    if let Some(pin) = &cli.tls_fingerprint {
        crate::target::use_tls(relay_client::Tls::pinned(pin).map_err(|e| e.to_string())?);
    }
    let target = &cli.target;
    let senders_at = cli.senders_target.as_ref().unwrap_or(target);
    let (table, json) = match cli.workload {
        Workload::Pairs { pairs, flow } => {
            let options = FlowOptions {
                keys: flow.keys,
                one_at_a_time: flow.one_at_a_time,
                ..FlowOptions::new(pairs, pairs, flow.messages, flow.size, cli.stall)
            };
            let report = workloads::flow(target, senders_at, "pairs", &options).await?;
            (report.table(), serde_json::to_string(&report))
        }
        Workload::FanIn { senders, flow } => {
            let options = FlowOptions {
                keys: flow.keys,
                one_at_a_time: flow.one_at_a_time,
                ..FlowOptions::new(senders, 1, flow.messages, flow.size, cli.stall)
            };
            let report = workloads::flow(target, senders_at, "fan-in", &options).await?;
            (report.table(), serde_json::to_string(&report))
        }
        Workload::Latency { pairs, rate, duration, size } => {
            let options = LatencyOptions { pairs, rate, duration, size, stall: cli.stall };
            let report = workloads::latency(target, senders_at, &options).await?;
            (report.table(), serde_json::to_string(&report))
        }
        Workload::Compare { relay, nats, relay_pid, nats_pid, messages, duration, clients } => {
            let options = compare::CompareOptions {
                relay,
                nats,
                relay_pid,
                nats_pid,
                messages,
                duration,
                clients,
                stall: cli.stall,
            };
            let rows = compare::run(&options).await?;
            let table = compare::report(std::slice::from_ref(&rows));
            (table, serde_json::to_string(&rows))
        }
        Workload::Report { files } => {
            let mut runs = Vec::new();
            for file in &files {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let rows: Vec<compare::Row> = serde_json::from_str(line).map_err(|e| {
                        format!("{}: not a compare --json line: {e}", file.display())
                    })?;
                    runs.push(rows);
                }
            }
            return Ok(compare::report(&runs));
        }
        Workload::Store { senders, recipients, messages, size, window, rate } => {
            let options = StoreOptions {
                senders,
                recipients,
                messages,
                size,
                window,
                rate,
                stall: cli.stall,
            };
            let report = crate::store::store(target, &options).await?;
            (report.table(), serde_json::to_string(&report))
        }
        Workload::NotFound { clients, rate, duration } => {
            let options =
                crate::not_found::NotFoundOptions { clients, rate, duration, stall: cli.stall };
            let report = crate::not_found::not_found(target, &options).await?;
            (report.table(), serde_json::to_string(&report))
        }
        Workload::Connections { clients, server_pid, keys, in_flight } => {
            let options = ConnectionsOptions { clients, server_pid, keys, in_flight };
            let report = workloads::connections(target, &options).await?;
            (report.table(), serde_json::to_string(&report))
        }
    };
    if cli.json { json.map_err(|e| e.to_string()) } else { Ok(table) }
}

/// The whole program: parse, run on a multi-threaded runtime, print; one line on error.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("relay-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Connections still open are simply dropped.
    runtime.shutdown_background();
    match result {
        Ok(report) => {
            println!("{}", report.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
