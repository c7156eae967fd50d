//! Every workload against relay-server and nats-server in one run, and the table of
//! relay/nats ratios (medians over runs) that `bench/compare.sh` prints.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::target::Target;
use crate::workloads::{self, ConnectionsOptions, FlowOptions, FlowReport, LatencyOptions};

/// What to compare and how big.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// The relay-server.
    pub relay: Target,
    /// The nats-server.
    pub nats: Target,
    /// relay-server's pid, for its memory per idle client and CPU time per message.
    pub relay_pid: Option<u32>,
    /// nats-server's pid.
    pub nats_pid: Option<u32>,
    /// Messages per throughput workload (the 1 KiB one sends half as many).
    pub messages: u64,
    /// Length of each latency run.
    pub duration: Duration,
    /// Idle clients for the memory measurement.
    pub clients: usize,
    /// Give-up time for a stalled receiver.
    pub stall: Duration,
}

/// Whether a bigger number is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Better {
    /// Throughput.
    Higher,
    /// Latency, memory.
    Lower,
}

/// One measured line of the comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    /// Workload and metric, e.g. `pairs 16 x 64 B, msgs/s`.
    pub metric: String,
    /// relay-server's figure.
    pub relay: f64,
    /// nats-server's figure.
    pub nats: f64,
    /// Messages relay-server lost in this workload.
    pub relay_lost: u64,
    /// Messages nats-server lost.
    pub nats_lost: u64,
    /// Which way is better.
    pub better: Better,
}

fn flow_row(metric: &str, relay: &FlowReport, nats: &FlowReport) -> Row {
    Row {
        metric: metric.to_string(),
        relay: relay.msgs_per_sec,
        nats: nats.msgs_per_sec,
        relay_lost: relay.lost,
        nats_lost: nats.lost,
        better: Better::Higher,
    }
}

/// Runs every workload once on each server, relay first, and returns the rows.
pub async fn run(options: &CompareOptions) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let both = [&options.relay, &options.nats];
    // Idle clients first, while both servers are fresh, so their memory is what clients cost
    // and not pages freed by earlier workloads.
    let mut per_client = Vec::new();
    for (target, pid) in both.iter().zip([options.relay_pid, options.nats_pid]) {
        let report = workloads::connections(
            target,
            &ConnectionsOptions {
                clients: options.clients,
                server_pid: pid,
                keys: false,
                in_flight: 64,
            },
        )
        .await?;
        eprintln!("{}", report.table().trim_end());
        per_client.push(report);
    }
    if let (Some(relay), Some(nats)) = (per_client[0].kib_per_client, per_client[1].kib_per_client)
    {
        rows.push(Row {
            metric: format!("{} idle clients, server KiB each", options.clients),
            relay,
            nats,
            relay_lost: 0,
            nats_lost: 0,
            better: Better::Lower,
        });
    }
    rows.push(Row {
        metric: format!("{} idle clients, seconds to connect", options.clients),
        relay: per_client[0].seconds,
        nats: per_client[1].seconds,
        relay_lost: 0,
        nats_lost: 0,
        better: Better::Lower,
    });

    let flows = [
        ("pairs 16 x 64 B", "pairs", 16, 16, options.messages, 64),
        ("pairs 16 x 1 KiB", "pairs", 16, 16, options.messages / 2, 1024),
        ("fan-in 64 -> 1, 64 B", "fan-in", 64, 1, options.messages, 64),
        ("pairs 1000 x 64 B", "pairs", 1000, 1000, options.messages, 64),
    ];
    let pids = [options.relay_pid, options.nats_pid];
    // relay's reports of the first three flows, and the minimal NATS client's of the first,
    // for the rows below that compare them with other runs.
    let mut relay_flows = Vec::new();
    for (metric, workload, senders, receivers, messages, size) in flows {
        let flow = FlowOptions::new(senders, receivers, messages, size, options.stall);
        let mut reports = Vec::new();
        // The server's own CPU time per message: on a machine the load generator shares, the
        // throughput of either server is bounded by both, and this separates them.
        let mut cpu_per_msg = Vec::new();
        for (target, pid) in both.iter().zip(pids) {
            let before = pid.map(workloads::cpu_seconds).transpose()?;
            let report = workloads::flow(target, target, workload, &flow).await?;
            let after = pid.map(workloads::cpu_seconds).transpose()?;
            eprintln!("{}", report.table().trim_end());
            if let (Some(before), Some(after)) = (before, after) {
                cpu_per_msg.push((after - before) * 1e9 / report.delivered.max(1) as f64);
            }
            reports.push(report);
        }
        let (relay, nats) = (&reports[0], &reports[1]);
        rows.push(flow_row(&format!("{metric}, msgs/s"), relay, nats));
        if let [relay_ns, nats_ns] = cpu_per_msg[..] {
            rows.push(Row {
                metric: format!("{metric}, server CPU ns/msg"),
                relay: relay_ns,
                nats: nats_ns,
                relay_lost: relay.lost,
                nats_lost: nats.lost,
                better: Better::Lower,
            });
        }
        if relay_flows.len() < 3 {
            let mut reports = reports.into_iter();
            if let (Some(relay), Some(nats)) = (reports.next(), reports.next()) {
                relay_flows.push((metric, workload, flow, relay, nats));
            }
        }
    }

    // Library to library: the minimal NATS client above shows what nats-server alone can do,
    // but a program using NATS runs a client library (a reader task, a hand-off per message
    // to the subscriber), as relay's runs use relay's. The same flows through async-nats.
    let library = options.nats.async_nats();
    let mut library_reports = Vec::new();
    for (metric, workload, flow, relay, _) in &relay_flows {
        let report = workloads::flow(&library, &library, workload, flow).await?;
        eprintln!("{}", report.table().trim_end());
        rows.push(flow_row(&format!("async-nats: {metric}, msgs/s"), relay, &report));
        library_reports.push(report);
    }
    // Receipts on: every relay client holds a key, so receivers acknowledge what they take and
    // senders get delivery receipts. NATS has nothing like it; its rows are the plain flows.
    for ((metric, workload, flow, _, nats), library) in relay_flows.iter().zip(&library_reports) {
        let keyed = FlowOptions { keys: true, ..*flow };
        let relay = workloads::flow(&options.relay, &options.relay, workload, &keyed).await?;
        eprintln!("{}", relay.table().trim_end());
        rows.push(flow_row(&format!("receipts: {metric}, msgs/s"), &relay, nats));
        rows.push(flow_row(&format!("receipts, async-nats: {metric}"), &relay, library));
    }

    for rate in [20_000, 100_000] {
        let latency = LatencyOptions {
            pairs: 16,
            rate,
            duration: options.duration,
            size: 64,
            stall: options.stall,
        };
        let mut reports = Vec::new();
        for target in both {
            let report = workloads::latency(target, target, &latency).await?;
            eprintln!("{}", report.table().trim_end());
            reports.push(report);
        }
        let (relay, nats) = (&reports[0], &reports[1]);
        for (name, r, n) in [
            ("p50", relay.p50_us, nats.p50_us),
            ("p99", relay.p99_us, nats.p99_us),
            ("p99.9", relay.p999_us, nats.p999_us),
        ] {
            rows.push(Row {
                metric: format!("latency at {}k msgs/s, {name} us", rate / 1000),
                relay: r,
                nats: n,
                relay_lost: relay.lost,
                nats_lost: nats.lost,
                better: Better::Lower,
            });
        }
    }
    Ok(rows)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn figure(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2} M", value / 1e6)
    } else if value >= 1e4 {
        format!("{:.0} k", value / 1e3)
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// The comparison table over several runs: per metric the median of each server, the ratio
/// relay/nats of the medians, and the messages lost in all runs. Also the relay's scaling
/// from 16 to 1,000 pairs.
pub fn report(runs: &[Vec<Row>]) -> String {
    let mut out = format!(
        "{:<40} {:>10} {:>10} {:>11} {:>12}\n",
        "metric (median of runs)", "relay", "nats", "relay/nats", "lost r / n"
    );
    let Some(first) = runs.first() else {
        return out;
    };
    let mut medians = Vec::new();
    for (i, row) in first.iter().enumerate() {
        let rows: Vec<&Row> = runs.iter().filter_map(|run| run.get(i)).collect();
        let relay = median(rows.iter().map(|r| r.relay).collect());
        let nats = median(rows.iter().map(|r| r.nats).collect());
        let relay_lost: u64 = rows.iter().map(|r| r.relay_lost).sum();
        let nats_lost: u64 = rows.iter().map(|r| r.nats_lost).sum();
        let ratio = relay / nats;
        let verdict = match row.better {
            Better::Higher => "higher is better",
            Better::Lower => "lower is better",
        };
        out.push_str(&format!(
            "{:<40} {:>10} {:>10} {:>10.2}x {:>5} / {:<5} ({verdict})\n",
            row.metric,
            figure(relay),
            figure(nats),
            ratio,
            relay_lost,
            nats_lost
        ));
        medians.push((row.metric.clone(), relay));
    }
    let find = |prefix: &str| medians.iter().find(|(m, _)| m.starts_with(prefix)).map(|(_, v)| *v);
    if let (Some(many), Some(few)) =
        (find("pairs 1000 x 64 B, msgs/s"), find("pairs 16 x 64 B, msgs/s"))
    {
        out.push_str(&format!(
            "relay scaling: 1000 pairs run at {:.0}% of the 16-pair rate\n",
            100.0 * many / few
        ));
    }
    out.push_str(
        "rows without a prefix drive nats-server through relay-bench's minimal NATS client (the \
         server's own limit); 'async-nats:' rows through async-nats, the official Rust client; \
         'receipts' rows run relay with keys (acknowledgements and delivery receipts on)\n",
    );
    out.push_str(&format!("runs: {}\n", runs.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_takes_medians_and_sums_losses() {
        let row = |relay, nats, lost| Row {
            metric: "pairs 16 x 64 B, msgs/s".into(),
            relay,
            nats,
            relay_lost: lost,
            nats_lost: 0,
            better: Better::Higher,
        };
        let runs = vec![vec![row(3e6, 1e6, 0)], vec![row(1e6, 2e6, 2)], vec![row(2e6, 9e6, 1)]];
        let table = report(&runs);
        // Medians 2 M and 2 M: ratio 1.00; 3 lost in all.
        assert!(table.contains("2.00 M"), "{table}");
        assert!(table.contains("1.00x"), "{table}");
        assert!(table.contains("    3 / 0"), "{table}");
    }
}
