//! What the server counts, and the endpoint that serves it in the Prometheus (OpenMetrics)
//! text format (`--metrics ADDR`, `GET /metrics`).
//!
//! Counting costs no lock on the message path: every counter is an atomic handle taken once
//! (labelled ones too), and the busiest ones are added to once per socket read or write, not
//! per message. Figures that already exist elsewhere (users online, queued bytes, what the
//! inboxes hold) are read when a scrape asks, not kept up to date on the way.

use std::fmt::Write as _;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use relay_proto::Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::server::ServerHandle;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// How registrations end, as labelled.
const OUTCOMES: [&str; 8] = [
    "registered",
    "taken",
    "owned",
    "looks_like",
    "invalid",
    "auth_failed",
    "auth_required",
    "other",
];

/// Why messages are refused, as labelled.
const REASONS: [&str; 6] =
    ["not_found", "not_delivered", "inbox_full", "expired", "too_large", "invalid"];

/// Every counter and gauge the server keeps; one per server, shared by its connections.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) connections_open: Gauge,
    pub(crate) connections: Counter,
    registrations: [Counter; OUTCOMES.len()],
    pub(crate) routed: Counter,
    refused: [Counter; REASONS.len()],
    pub(crate) stored: Counter,
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) slow_consumers: Counter,
    pub(crate) kicked: Counter,
    // Read at each scrape.
    users_online: Gauge,
    outbox_bytes: Gauge,
    inbox_recipients: Gauge,
    inbox_messages: Gauge,
    inbox_bytes: Gauge,
    store_bytes: Gauge,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("relay");
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let registrations_family = Family::<Outcome, Counter>::default();
        registry.register(
            "registrations",
            "Registrations, by outcome",
            registrations_family.clone(),
        );
        let refused_family = Family::<Reason, Counter>::default();
        registry.register(
            "messages_refused",
            "Messages refused, by reason",
            refused_family.clone(),
        );
        Metrics {
            connections_open: gauge(&mut registry, "connections_open", "Connections open now"),
            connections: counter(&mut registry, "connections", "Connections accepted"),
            // Handles taken once: counting through them takes no lock.
            registrations: OUTCOMES
                .map(|outcome| registrations_family.get_or_create(&Outcome { outcome }).clone()),
            routed: counter(
                &mut registry,
                "messages_routed",
                "Chat messages routed to a receiver online",
            ),
            refused: REASONS.map(|reason| refused_family.get_or_create(&Reason { reason }).clone()),
            stored: counter(
                &mut registry,
                "messages_stored",
                "Messages stored for offline key holders (durable)",
            ),
            bytes_in: counter(&mut registry, "received_bytes", "Bytes of frames received"),
            bytes_out: counter(&mut registry, "sent_bytes", "Bytes written to clients"),
            slow_consumers: counter(
                &mut registry,
                "slow_consumers",
                "Clients disconnected for not reading",
            ),
            kicked: counter(&mut registry, "kicked", "Clients the operator disconnected"),
            users_online: gauge(&mut registry, "users_online", "Names registered now"),
            outbox_bytes: gauge(
                &mut registry,
                "outbox_bytes",
                "Bytes queued for clients, not yet written",
            ),
            inbox_recipients: gauge(
                &mut registry,
                "inbox_recipients",
                "Offline names with stored messages",
            ),
            inbox_messages: gauge(&mut registry, "inbox_messages", "Messages stored"),
            inbox_bytes: gauge(&mut registry, "inbox_bytes", "Bytes of messages stored"),
            store_bytes: gauge(
                &mut registry,
                "store_bytes",
                "Size of the data directory's store files",
            ),
            registry,
        }
    }

    /// Counts a registration that ended with `status` (`Registered`, or why not).
    pub(crate) fn registration(&self, status: Status) {
        let outcome = match status {
            Status::Registered => "registered",
            Status::NameTaken => "taken",
            Status::NameOwned => "owned",
            Status::NameConfusable => "looks_like",
            Status::InvalidName => "invalid",
            Status::AuthFailed => "auth_failed",
            Status::AuthRequired => "auth_required",
            _ => "other",
        };
        self.count(&self.registrations, &OUTCOMES, outcome, 1);
    }

    /// Counts a message refused with `status`.
    pub(crate) fn refused(&self, status: Status) {
        let reason = match status {
            Status::NotFound => "not_found",
            Status::NotDelivered => "not_delivered",
            Status::InboxFull => "inbox_full",
            Status::Expired => "expired",
            Status::FrameTooLarge => "too_large",
            _ => "invalid",
        };
        self.count(&self.refused, &REASONS, reason, 1);
    }

    fn count<const N: usize>(
        &self,
        counters: &[Counter; N],
        labels: &[&str; N],
        label: &str,
        n: u64,
    ) {
        if let Some(at) = labels.iter().position(|l| *l == label) {
            counters[at].inc_by(n);
        }
    }

    /// The figures that are read rather than kept.
    pub(crate) fn set_current(&self, now: Current) {
        let gauge = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        gauge(&self.users_online, now.users_online);
        gauge(&self.outbox_bytes, now.outbox_bytes);
        gauge(&self.inbox_recipients, now.inbox_recipients);
        gauge(&self.inbox_messages, now.inbox_messages);
        gauge(&self.inbox_bytes, now.inbox_bytes);
        gauge(&self.store_bytes, now.store_bytes);
    }

    /// Everything, in the OpenMetrics text format.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
            let _ = writeln!(text, "# EOF");
        }
        text
    }

    /// The counters, for the console's `stats`.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let by = |counters: &[Counter], labels: &[&'static str]| {
            labels.iter().copied().zip(counters.iter().map(Counter::get)).collect()
        };
        Snapshot {
            connections_open: u64::try_from(self.connections_open.get()).unwrap_or(0),
            connections: self.connections.get(),
            registrations: by(&self.registrations, &OUTCOMES),
            routed: self.routed.get(),
            refused: by(&self.refused, &REASONS),
            stored: self.stored.get(),
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
            slow_consumers: self.slow_consumers.get(),
            kicked: self.kicked.get(),
        }
    }
}

/// Figures read at a scrape.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Current {
    pub(crate) users_online: u64,
    pub(crate) outbox_bytes: u64,
    pub(crate) inbox_recipients: u64,
    pub(crate) inbox_messages: u64,
    pub(crate) inbox_bytes: u64,
    pub(crate) store_bytes: u64,
}

/// The server's counters at one moment (the console's `stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Connections open now.
    pub connections_open: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Registrations by outcome.
    pub registrations: Vec<(&'static str, u64)>,
    /// Chat messages routed to a receiver online.
    pub routed: u64,
    /// Messages refused, by reason.
    pub refused: Vec<(&'static str, u64)>,
    /// Messages stored for offline key holders.
    pub stored: u64,
    /// Bytes of frames received.
    pub bytes_in: u64,
    /// Bytes written to clients.
    pub bytes_out: u64,
    /// Clients disconnected for not reading.
    pub slow_consumers: u64,
    /// Clients the operator disconnected.
    pub kicked: u64,
}

/// Serves `GET /metrics` on `listener` until `shutdown`. Anything else gets a 404; a request
/// head over 8 KiB or slower than 5 s is dropped: the endpoint is meant for a scraper on a
/// trusted network, but costs an attacker's connection nothing lasting either.
pub async fn serve_metrics(
    listener: TcpListener,
    server: ServerHandle,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics at http://{addr}/metrics");
    }
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let server = server.clone();
        tokio::spawn(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(5), answer(stream, &server)).await
            {
                debug!(%peer, error = %e, "metrics: request too slow");
            }
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, server: &ServerHandle) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 8 * 1024 {
            return;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, kind, body) = match line.split(|&b| b == b' ').collect::<Vec<_>>()[..] {
        [b"GET", b"/metrics", _] => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            server.metrics_text().await,
        ),
        _ => ("404 Not Found", "text/plain; charset=utf-8", "GET /metrics\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
