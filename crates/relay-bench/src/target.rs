//! The server under test, and the two ends of a flow on it: a sender that addresses a receiver
//! by index, and a receiver that yields payloads. Relay and NATS look the same to workloads.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use relay_client::{Batch, Client, ClientConfig, Event, Events, Identity, Received};

use crate::nats;

/// TLS for every relay client this run makes (`--tls-fingerprint`), if set.
static TLS: std::sync::OnceLock<relay_client::Tls> = std::sync::OnceLock::new();

/// Makes every relay client of this run connect over TLS.
pub fn use_tls(tls: relay_client::Tls) {
    let _ = TLS.set(tls);
}

/// The configuration every relay client of this run starts from.
fn base_config() -> ClientConfig {
    ClientConfig { tls: TLS.get().cloned(), ..ClientConfig::default() }
}

/// Which server to drive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A relay-server at `host:port`.
    Relay(String),
    /// A nats-server at `host:port`, driven by this crate's minimal client ([`nats`]): receiver
    /// `i` subscribes to a subject of its own, senders publish to it. It does the least a
    /// client can per message, so it shows what the server alone can do.
    Nats(String),
    /// The same nats-server driven through async-nats, the official Rust client: what a
    /// program using NATS runs, to compare with relay through its own client library.
    AsyncNats(String),
}

impl Target {
    /// Parses `HOST:PORT` or `relay://HOST:PORT` (a relay-server), `nats://HOST:PORT` (a
    /// nats-server, minimal client) or `async-nats://HOST:PORT` (a nats-server, async-nats).
    pub fn parse(s: &str) -> Result<Target, String> {
        let (kind, addr) = match s.split_once("://") {
            Some(("relay", addr)) => ("relay", addr),
            Some(("nats", addr)) => ("nats", addr),
            Some(("async-nats", addr)) => ("async-nats", addr),
            Some((scheme, _)) => {
                return Err(format!(
                    "unknown scheme {scheme}://; use relay://, nats:// or async-nats://"
                ));
            }
            None => ("relay", s),
        };
        if addr.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.is_empty()) {
            return Err(format!("{s}: expected HOST:PORT"));
        }
        Ok(match kind {
            "nats" => Target::Nats(addr.to_string()),
            "async-nats" => Target::AsyncNats(addr.to_string()),
            _ => Target::Relay(addr.to_string()),
        })
    }

    /// The same nats-server through async-nats (itself for anything else).
    pub fn async_nats(&self) -> Target {
        match self {
            Target::Nats(addr) => Target::AsyncNats(addr.clone()),
            other => other.clone(),
        }
    }

    /// `relay`, `nats` or `async-nats`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Relay(_) => "relay",
            Target::Nats(_) => "nats",
            Target::AsyncNats(_) => "async-nats",
        }
    }

    /// Connects receiver number `index` (`run` keeps names apart between runs on one server),
    /// with a new key if `keys` (relay only).
    pub async fn receiver(&self, run: &str, index: usize, keys: bool) -> Result<Receiver, String> {
        match self {
            Target::Relay(addr) => {
                let name = receiver_name(run, index);
                let mut config = base_config();
                if keys {
                    config.identity = Some(Identity::generate().map_err(|e| e.to_string())?);
                }
                let (client, events) =
                    Client::connect_with(addr, &name, config).await.map_err(|e| e.to_string())?;
                Ok(Receiver::Relay { _client: client, events })
            }
            Target::Nats(addr) => {
                let subject = receiver_name(run, index);
                let sub = nats::Subscriber::connect(addr, &subject)
                    .await
                    .map_err(|e| format!("nats {addr}: {e}"))?;
                Ok(Receiver::Nats(sub))
            }
            Target::AsyncNats(addr) => {
                let client = async_nats_client(addr).await?;
                let subject = receiver_name(run, index);
                let sub = client
                    .subscribe(subject)
                    .await
                    .map_err(|e| format!("async-nats {addr}: {e}"))?;
                // The subscription is in place once the server has answered a round trip.
                client.flush().await.map_err(|e| format!("async-nats {addr}: {e}"))?;
                Ok(Receiver::AsyncNats { _client: client, sub })
            }
        }
    }

    /// Connects sender number `index`, which will address receivers of the same `run`, with
    /// a new key if `keys` (relay only). `refused` counts messages the server reported as not
    /// delivered.
    pub async fn sender(
        &self,
        run: &str,
        index: usize,
        refused: Arc<AtomicU64>,
        keys: bool,
    ) -> Result<Sender, String> {
        match self {
            Target::Relay(addr) => {
                let name = format!("{run}.s{index}");
                let mut config = base_config();
                if keys {
                    config.identity = Some(Identity::generate().map_err(|e| e.to_string())?);
                }
                let (client, mut events) =
                    Client::connect_with(addr, &name, config).await.map_err(|e| e.to_string())?;
                // A sender hears only about refused messages; count them.
                tokio::spawn(async move {
                    while let Some(event) = events.next().await {
                        if matches!(event, Event::NotFound { .. } | Event::Rejected { .. }) {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                Ok(Sender::Relay(client.batch()))
            }
            Target::Nats(addr) => Ok(Sender::Nats(
                nats::Publisher::connect(addr).await.map_err(|e| format!("nats {addr}: {e}"))?,
            )),
            Target::AsyncNats(addr) => Ok(Sender::AsyncNats(async_nats_client(addr).await?)),
        }
    }
}

/// A connection through async-nats with its defaults.
async fn async_nats_client(addr: &str) -> Result<async_nats::Client, String> {
    async_nats::connect(addr).await.map_err(|e| format!("async-nats {addr}: {e}"))
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Relay(addr) => write!(f, "relay://{addr}"),
            Target::Nats(addr) => write!(f, "nats://{addr}"),
            Target::AsyncNats(addr) => write!(f, "async-nats://{addr}"),
        }
    }
}

/// The name (relay) or subject (NATS) of receiver `index` in `run`.
pub fn receiver_name(run: &str, index: usize) -> String {
    format!("{run}.r{index}")
}

/// The receiving end of a flow.
pub enum Receiver {
    /// A relay client; its handle is kept so the connection stays open.
    Relay {
        /// Keeps the connection registered.
        _client: Client,
        /// Where messages arrive.
        events: Events,
    },
    /// A NATS subscription.
    Nats(nats::Subscriber),
    /// A NATS subscription through async-nats.
    AsyncNats {
        /// Keeps the connection open.
        _client: async_nats::Client,
        /// Where messages arrive.
        sub: async_nats::Subscriber,
    },
}

impl Receiver {
    /// The next payload, or an error saying why the connection ended.
    pub async fn next(&mut self) -> Result<Bytes, String> {
        loop {
            if let Some(payload) = self.try_next()? {
                return Ok(payload);
            }
            match self {
                Receiver::Relay { events, .. } => match events.next().await {
                    Some(event) => {
                        if let Some(payload) = relay_payload(event)? {
                            return Ok(payload);
                        }
                    }
                    None => return Err("connection ended".into()),
                },
                Receiver::Nats(sub) => {
                    return match sub.next().await {
                        Ok(Some(payload)) => Ok(payload),
                        Ok(None) => Err("the server closed the connection".into()),
                        Err(e) => Err(e.to_string()),
                    };
                }
                Receiver::AsyncNats { sub, .. } => {
                    return match futures_util::StreamExt::next(sub).await {
                        Some(msg) => Ok(msg.payload),
                        None => Err("the subscription ended".into()),
                    };
                }
            }
        }
    }

    /// The next payload if one has already arrived; never waits. Lets a receiver skip
    /// arming a timeout (a clock read) for every message of a busy flow.
    pub fn try_next(&mut self) -> Result<Option<Bytes>, String> {
        match self {
            Receiver::Relay { events, .. } => {
                while let Some(event) = events.try_next() {
                    if let Some(payload) = relay_payload(event)? {
                        return Ok(Some(payload));
                    }
                }
                Ok(None)
            }
            Receiver::Nats(sub) => sub.try_next().map_err(|e| e.to_string()),
            Receiver::AsyncNats { sub, .. } => {
                use futures_util::FutureExt;
                match futures_util::StreamExt::next(sub).now_or_never() {
                    Some(Some(msg)) => Ok(Some(msg.payload)),
                    Some(None) => Err("the subscription ended".into()),
                    None => Ok(None),
                }
            }
        }
    }

    /// Waits up to `stall` for payloads, then hands `f` every one that has arrived (relay:
    /// in place, through [`Events::drain`](relay_client::Events::drain), unless
    /// `one_at_a_time`; NATS: one at a time, as its clients hand them). `Ok(0)` if none came
    /// within `stall`.
    pub async fn drain_within(
        &mut self,
        stall: Duration,
        one_at_a_time: bool,
        mut f: impl FnMut(&[u8]),
    ) -> Result<usize, String> {
        if let Receiver::Relay { events, .. } = self
            && !one_at_a_time
        {
            let (mut handed, mut ended) = (0, None);
            let mut take = |events: &mut Events, handed: &mut usize, ended: &mut Option<String>| {
                events.drain(|received| match received {
                    Received::Message(msg) => {
                        f(msg.content);
                        *handed += 1;
                    }
                    Received::Event(event) => {
                        if let Err(e) = relay_payload(event) {
                            ended.get_or_insert(e);
                        }
                    }
                    _ => {}
                });
            };
            take(events, &mut handed, &mut ended);
            // Events a receiver ignores do not count as progress: wait on until a message
            // comes, or `stall` has passed without one.
            // The clock is read only when nothing was there: not once per busy read.
            let deadline =
                (handed == 0 && ended.is_none()).then(|| tokio::time::Instant::now() + stall);
            while let Some(deadline) = deadline
                && handed == 0
                && ended.is_none()
            {
                match tokio::time::timeout_at(deadline, events.ready()).await {
                    Ok(true) => take(events, &mut handed, &mut ended),
                    Ok(false) => return Err("connection ended".into()),
                    Err(_) => return Ok(0),
                }
            }
            return match ended {
                Some(e) if handed == 0 => Err(e),
                _ => Ok(handed),
            };
        }
        let mut handed = 0;
        while let Some(payload) = self.try_next()? {
            f(&payload);
            handed += 1;
        }
        if handed == 0
            && let Some(payload) = self.next_within(stall).await?
        {
            f(&payload);
            handed += 1;
        }
        Ok(handed)
    }

    /// The next payload, giving up after `stall` without one (`Ok(None)`).
    pub async fn next_within(&mut self, stall: Duration) -> Result<Option<Bytes>, String> {
        if let Some(payload) = self.try_next()? {
            return Ok(Some(payload));
        }
        match tokio::time::timeout(stall, self.next()).await {
            Ok(payload) => payload.map(Some),
            Err(_) => Ok(None),
        }
    }
}

/// The payload of a relay event, `None` for events a receiver ignores, or why the connection
/// ended.
fn relay_payload(event: Event) -> Result<Option<Bytes>, String> {
    match event {
        Event::Message { content, .. } => Ok(Some(content)),
        Event::NotFound { .. }
        | Event::Rejected { .. }
        | Event::Users { .. }
        | Event::Stored { .. }
        | Event::Delivered { .. } => Ok(None),
        other => Err(format!("connection ended: {other:?}")),
    }
}

/// Messages a relay sender hands to its connection at once; the NATS publisher likewise
/// writes its `PUB`s in 32 KiB batches.
const RELAY_BATCH: usize = 64;

/// The sending end of a flow.
pub enum Sender {
    /// A relay client, sending through a [`Batch`].
    Relay(Batch),
    /// A NATS publisher.
    Nats(nats::Publisher),
    /// A NATS connection through async-nats (which batches its own writes).
    AsyncNats(async_nats::Client),
}

impl Sender {
    /// Sends `payload` to the receiver called `to` (see [`receiver_name`]). Waits only when the
    /// connection is pushing back.
    pub async fn send(&mut self, to: &str, payload: &[u8]) -> Result<(), String> {
        match self {
            Sender::Relay(batch) => {
                batch.add(to, payload).map_err(|e| e.to_string())?;
                if batch.len() >= RELAY_BATCH {
                    batch.send().await.map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Sender::Nats(publisher) => {
                publisher.publish(to, payload).await.map_err(|e| e.to_string())
            }
            Sender::AsyncNats(client) => client
                .publish(to.to_string(), Bytes::copy_from_slice(payload))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Pushes out anything buffered.
    pub async fn flush(&mut self) -> Result<(), String> {
        match self {
            Sender::Relay(batch) => batch.send().await.map_err(|e| e.to_string()),
            Sender::Nats(publisher) => publisher.flush().await.map_err(|e| e.to_string()),
            Sender::AsyncNats(client) => client.flush().await.map_err(|e| e.to_string()),
        }
    }

    /// Sends what is left and closes the connection.
    pub async fn close(self) -> Result<(), String> {
        match self {
            Sender::Relay(mut batch) => {
                batch.send().await.map_err(|e| e.to_string())?;
                batch.client().offline().await.map_err(|e| e.to_string())
            }
            Sender::Nats(publisher) => publisher.close().await.map_err(|e| e.to_string()),
            Sender::AsyncNats(client) => {
                // Everything published has reached the server once it answers a round trip.
                client.flush().await.map_err(|e| e.to_string())?;
                client.drain().await.map_err(|e| e.to_string())
            }
        }
    }
}
