//! The workloads against an in-process relay server on loopback: small runs that check the
//! counting (everything delivered, in order, nothing lost), not the speed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use relay_bench::target::Target;
use relay_bench::workloads::{self, ConnectionsOptions, FlowOptions, LatencyOptions};
use relay_server::{Config, Server};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn server() -> (Target, CancellationToken) {
    let config = Config { auth: relay_server::AuthMode::None, ..Config::default() };
    server_with(config).await
}

async fn server_with(config: Config) -> (Target, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::new(listener, config).unwrap();
    let target = Target::Relay(server.local_addr().unwrap().to_string());
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    (target, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_deliver_everything_in_order() {
    let (target, shutdown) = server().await;
    let stall = Duration::from_secs(20);
    let pairs = FlowOptions::new(4, 4, 4_001, 64, stall);
    let report = workloads::flow(&target, &target, "pairs", &pairs).await.unwrap();
    assert_eq!((report.delivered, report.lost, report.out_of_order), (4_001, 0, 0));
    // Receivers taking each message as an event count the same.
    let one_at_a_time = FlowOptions { one_at_a_time: true, ..pairs };
    let report = workloads::flow(&target, &target, "pairs", &one_at_a_time).await.unwrap();
    assert_eq!((report.delivered, report.lost, report.out_of_order), (4_001, 0, 0));
    let fan_in = FlowOptions::new(8, 1, 4_000, 1024, stall);
    let report = workloads::flow(&target, &target, "fan-in", &fan_in).await.unwrap();
    assert_eq!((report.delivered, report.lost, report.out_of_order), (4_000, 0, 0));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_and_connections_report_what_they_measured() {
    let (target, shutdown) = server().await;
    let options = LatencyOptions {
        pairs: 2,
        rate: 2_000,
        duration: Duration::from_millis(500),
        size: 64,
        stall: Duration::from_secs(20),
    };
    let report = workloads::latency(&target, &target, &options).await.unwrap();
    assert!(report.sent > 0 && report.lost == 0, "{report:?}");
    assert!(
        report.p50_us > 0.0 && report.p50_us <= report.p99_us && report.p99_us <= report.max_us
    );
    let pid = std::process::id();
    let options =
        ConnectionsOptions { clients: 50, server_pid: Some(pid), keys: false, in_flight: 8 };
    let report = workloads::connections(&target, &options).await.unwrap();
    assert_eq!(report.clients, 50);
    assert!(report.kib_per_client.is_some());
    assert!(report.register_p50_ms > 0.0 && report.register_p50_ms <= report.register_p99_ms);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_keys_bind_every_name() {
    let data = tempfile::tempdir().unwrap();
    let config = Config { data_dir: data.path().to_path_buf(), ..Config::default() };
    let (target, shutdown) = server_with(config).await;
    let options = ConnectionsOptions { clients: 40, server_pid: None, keys: true, in_flight: 1 };
    let report = workloads::connections(&target, &options).await.unwrap();
    assert_eq!((report.clients, report.keys, report.in_flight), (40, true, 1));
    assert!(report.register_p50_ms > 0.0 && report.register_p50_ms <= report.register_p99_ms);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_flows_with_receipts_and_the_store_workload_count_everything() {
    let data = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: data.path().to_path_buf(),
        inbox: relay_server::InboxLimits { messages: 100_000, ..Default::default() },
        ..Config::default()
    };
    let (target, shutdown) = server_with(config).await;
    let stall = Duration::from_secs(20);
    let pairs = FlowOptions { keys: true, ..FlowOptions::new(4, 4, 4_000, 64, stall) };
    let report = workloads::flow(&target, &target, "pairs", &pairs).await.unwrap();
    assert_eq!((report.delivered, report.lost, report.out_of_order), (4_000, 0, 0));
    let options = relay_bench::store::StoreOptions {
        senders: 4,
        recipients: 3,
        messages: 3_000,
        size: 64,
        window: 100,
        rate: 0,
        stall,
    };
    let report = relay_bench::store::store(&target, &options).await.unwrap();
    assert_eq!((report.stored, report.delivered, report.refused), (3_000, 3_000, 0));
    assert_eq!((report.lost, report.duplicated, report.out_of_order), (0, 0, 0));
    assert!(report.ack_p50_us > 0.0 && report.ack_p50_us <= report.ack_p99_us);
    shutdown.cancel();
}

#[test]
fn targets_parse() {
    assert_eq!(Target::parse("127.0.0.1:8080"), Ok(Target::Relay("127.0.0.1:8080".into())));
    assert_eq!(Target::parse("nats://h:4222"), Ok(Target::Nats("h:4222".into())));
    assert_eq!(Target::parse("async-nats://h:4222"), Ok(Target::AsyncNats("h:4222".into())));
    assert_eq!(Target::Nats("h:1".into()).async_nats(), Target::AsyncNats("h:1".into()));
    assert!(Target::parse("http://h:1").is_err());
    assert!(Target::parse("nohost").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_times_an_answer_for_every_message() {
    let (target, shutdown) = server().await;
    let options = relay_bench::not_found::NotFoundOptions {
        clients: 2,
        rate: 400,
        duration: Duration::from_millis(500),
        stall: Duration::from_secs(20),
    };
    let report = relay_bench::not_found::not_found(&target, &options).await.unwrap();
    assert!(report.sent >= 100, "{report:?}");
    assert_eq!((report.answered, report.other), (report.sent, 0));
    assert!(report.max_us > 0.0 && report.p50_us <= report.p99_us);
    shutdown.cancel();
}
