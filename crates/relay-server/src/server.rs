//! The accept loop: admits connections up to the cap, spawns a task for each, and on
//! shutdown lets every client receive what is queued plus the shutdown notice, for a bounded
//! time.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use relay_proto::{AuthMode, Message, MessageCodec, Status};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admission::{self, Admission, Limits, LogNow, Refusal};
use crate::cluster::{Cluster, ClusterError};
use crate::config::Config;
use crate::connection::{self, Shared};
use crate::inbox::{InboxStore, Totals};
use crate::metrics::{Current, Metrics, Snapshot};
use crate::names::{NameRecord, NameStore, StoreError};
use crate::redb_store::{OpenError, RedbStore};
use crate::router::{LocalRouter, Peers, RouterLimits, Stores, Who};
use crate::tls::Tls;

/// A relay server bound to a listener, ready to [`run`](Server::run).
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use relay_server::{Config, Server};
/// use tokio_util::sync::CancellationToken;
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let server = Server::new(listener, Config::default())?;
/// println!("listening on {}", server.local_addr()?);
/// let shutdown = CancellationToken::new();
/// server.run(shutdown).await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    /// TLS on the main listener (`--tls-*` without `--tls-port`).
    tls: Option<Tls>,
    /// A second listener, serving TLS (`--tls-port`), beside the plain one.
    tls_listener: Option<(TcpListener, Tls)>,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    admission: Arc<Admission>,
}

/// A cheap handle for looking at a running server (the console and tests use it).
#[derive(Clone, Debug)]
pub struct ServerHandle {
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
}

impl ServerHandle {
    /// The registered users, as `(name, address)`, sorted by name.
    pub fn users(&self) -> Vec<(String, SocketAddr)> {
        self.shared.router.users().into_iter().map(|(n, a)| (n.to_string(), a)).collect()
    }

    /// How many names are registered.
    pub fn online(&self) -> usize {
        self.shared.router.online()
    }

    /// How many connections are open (registered or not).
    pub fn connections(&self) -> usize {
        self.shared.config.max_clients - self.slots.available_permits()
    }

    /// Unbinds `name` from its key (the console's `release`, for a user who lost their key):
    /// anyone may claim it afterwards. Its holder, if online, is disconnected. Returns what
    /// was bound, or `None` if the name was not bound.
    ///
    /// # Errors
    /// If the name table fails, or the server stores no names (`--auth none`).
    pub async fn release(&self, name: &str) -> Result<Option<NameRecord>, StoreError> {
        self.shared.router.unbind(name).await
    }

    /// What the inboxes hold: recipients, messages, bytes (the console's `inboxes`).
    ///
    /// # Errors
    /// If the store fails.
    pub async fn inboxes(&self) -> Result<Totals, StoreError> {
        self.shared.router.inbox_totals().await
    }

    /// Disconnects `name`'s holder with `reason` (the console's `kick`): its client shows the
    /// reason and does not reconnect by itself. `false` if nobody by that name is online.
    pub fn kick(&self, name: &str, reason: &str) -> bool {
        self.shared.router.kick(name, reason)
    }

    /// What is known of `name`'s holder, if online (the console's `who`).
    pub fn who(&self, name: &str) -> Option<Who> {
        self.shared.router.who(name)
    }

    /// In cluster mode, whether this node is connected to NATS now (the console's `stats`
    /// shows it); `None` for a server alone.
    pub fn cluster_connected(&self) -> Option<bool> {
        self.shared.router.cluster_connected()
    }

    /// The server's counters (the console's `stats`; the metrics endpoint serves the same).
    pub fn stats(&self) -> Snapshot {
        self.shared.metrics.snapshot()
    }

    /// Every metric, in the OpenMetrics text format (what `GET /metrics` serves).
    pub async fn metrics_text(&self) -> String {
        let totals = self.inboxes().await.unwrap_or_default();
        let store_bytes = match self.shared.config.auth {
            AuthMode::None => 0,
            _ => store_files(&self.shared.config.data_dir),
        };
        self.shared.metrics.set_current(Current {
            users_online: self.online() as u64,
            outbox_bytes: self.shared.router.queued_bytes(),
            inbox_recipients: totals.recipients,
            inbox_messages: totals.messages,
            inbox_bytes: totals.bytes,
            store_bytes,
        });
        self.shared.metrics.encode()
    }

    /// Empties `name`'s inbox (the console's `purge`); returns how many messages it held.
    ///
    /// # Errors
    /// If the store fails, or the server stores nothing (`--auth none`).
    pub async fn purge(&self, name: &str) -> Result<u64, StoreError> {
        self.shared.router.purge(name).await
    }
}

/// Bytes in the data directory's store files (the database and its journal).
fn store_files(dir: &std::path::Path) -> u64 {
    std::iter::once(crate::redb_store::DB_FILE)
        .chain(crate::journal::JOURNAL_FILES.iter().copied())
        .filter_map(|file| std::fs::metadata(dir.join(file)).ok())
        .map(|meta| meta.len())
        .sum()
}

/// The server could not start: one line for a person, each naming what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration was refused.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The name table in the data directory could not be opened.
    #[error(transparent)]
    Store(#[from] OpenError),
    /// The cluster could not be joined.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl Server {
    /// Wraps an already-bound listener (bind port 0 in tests), opening the name table in
    /// [`Config::data_dir`] unless [`Config::auth`] is [`AuthMode::None`].
    ///
    /// # Errors
    /// [`StartError::Config`] if `config` fails [`Config::validate`]; [`StartError::Store`] if
    /// the data directory cannot be used, its store is locked by another server, or damaged.
    pub fn new(listener: TcpListener, config: Config) -> Result<Server, StartError> {
        config.validate().map_err(StartError::Config)?;
        let stores = match config.auth {
            AuthMode::None => Stores::default(),
            _ => {
                let store = Arc::new(RedbStore::open_with(&config.data_dir, config.inbox)?);
                Stores {
                    names: Some(store.clone() as Arc<dyn NameStore>),
                    inbox: Some(store as Arc<dyn InboxStore>),
                    ..Stores::default()
                }
            }
        };
        Ok(Server::build(listener, config, stores).0)
    }

    /// Like [`Server::new`], as a node of a cluster: names, keys and who is online are kept
    /// in NATS (see [`Cluster`]), not in the data directory, and messages for names on other
    /// nodes are forwarded to them.
    ///
    /// Durable delivery does not yet span the cluster: a message for a name that is offline
    /// everywhere is refused as `NotFound`, as for a guest name.
    ///
    /// # Errors
    /// [`StartError::Config`] if `config` fails [`Config::validate`]; [`StartError::Cluster`]
    /// if the link to NATS cannot take messages for this node.
    pub async fn in_cluster(
        listener: TcpListener,
        config: Config,
        cluster: Cluster,
    ) -> Result<Server, StartError> {
        config.validate().map_err(StartError::Config)?;
        let link = cluster.link.clone();
        let inbox = match config.auth {
            AuthMode::None => None,
            _ => Some(Arc::new(cluster.inbox(config.inbox).await?) as Arc<dyn InboxStore>),
        };
        let stores = Stores {
            names: match config.auth {
                AuthMode::None => None,
                _ => Some(Arc::new(cluster.names) as Arc<dyn NameStore>),
            },
            inbox,
            peers: Some(link.clone() as Arc<dyn Peers>),
            node: Some(link.node().to_owned()),
        };
        let send_wait = config.send_wait;
        let (server, router) = Server::build(listener, config, stores);
        link.attach(&router, send_wait).await.map_err(|error| {
            StartError::Cluster(ClusterError::Nats { url: "(connected)".into(), error })
        })?;
        Ok(server)
    }

    fn build(listener: TcpListener, config: Config, stores: Stores) -> (Server, Arc<LocalRouter>) {
        let slots = Arc::new(Semaphore::new(config.max_clients));
        let admission = Admission::new(Limits {
            per_address: config.max_per_address,
            new_per_sec: config.connects_per_sec,
            loopback_exempt: config.loopback_exempt,
        });
        let metrics = Arc::new(Metrics::new());
        let limits = RouterLimits {
            auth: config.auth,
            max_frame_len: config.max_frame_len,
            send_wait: config.send_wait,
            unacked_window: config.unacked_window,
        };
        let router = LocalRouter::new(stores, limits, metrics.clone());
        let shared = Arc::new(Shared {
            router: router.clone(),
            config,
            hard_stop: CancellationToken::new(),
            told_shutdown: std::sync::atomic::AtomicUsize::new(0),
            metrics,
        });
        (Server { listener, tls: None, tls_listener: None, shared, slots, admission }, router)
    }

    /// The address the server listens on.
    ///
    /// # Errors
    /// If the socket cannot report it.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves TLS on the main listener instead of plain TCP.
    #[must_use]
    pub fn with_tls(mut self, tls: Tls) -> Server {
        self.tls = Some(tls);
        self
    }

    /// Serves TLS on `listener` too, beside the main listener.
    #[must_use]
    pub fn with_tls_listener(mut self, listener: TcpListener, tls: Tls) -> Server {
        self.tls_listener = Some((listener, tls));
        self
    }

    /// The address of the second, TLS listener, if any.
    ///
    /// # Errors
    /// If the socket cannot report it.
    pub fn tls_local_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.tls_listener.as_ref().map(|(listener, _)| listener.local_addr())
    }

    /// A handle for inspecting the server while it runs.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle { shared: self.shared.clone(), slots: self.slots.clone() }
    }

    /// Serves clients until `shutdown` is cancelled, then tells every client the server is
    /// shutting down, gives them [`Config::shutdown_timeout`] to receive it, closes the name
    /// table (so another server may open the same data directory), and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let mut backoff = Duration::from_millis(10);
        // Stored messages past the age limit are removed (and their senders told) this often.
        let sweeper = {
            let (router, every, stop) =
                (self.shared.router.clone(), self.shared.config.inbox_sweep, shutdown.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => router.expire().await,
                    }
                }
            })
        };
        loop {
            let (accepted, tls) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => (accepted, self.tls.clone()),
                (accepted, tls) = accept_tls(self.tls_listener.as_ref()) => (accepted, Some(tls)),
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    self.admit(&tracker, stream, peer, tls, &shutdown);
                }
                Err(e) if is_per_connection(&e) => {
                    debug!(error = %e, "accept failed for one connection")
                }
                Err(e) => {
                    // Typically out of file descriptors: wait for some to be released rather
                    // than spin or exit.
                    warn!(error = %e, retry_in = ?backoff, "accept failed");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        let handle = self.handle();
        // Stop accepting: new connections are refused by the OS from here on.
        drop(self.listener);
        drop(self.tls_listener);
        let open = handle.connections();
        info!(connections = open, "shutting down; telling every client");
        tracker.close();
        if tokio::time::timeout(self.shared.config.shutdown_timeout, tracker.wait()).await.is_err()
        {
            warn!(
                remaining = handle.connections(),
                "clients did not finish in time; dropping their connections"
            );
            self.shared.hard_stop.cancel();
            tracker.wait().await;
        }
        let _ = sweeper.await;
        // Every connection has released its name; the store can let go of the data dir.
        self.shared.router.close().await;
        // Counted as each notice was written out, not guessed from who was connected when the
        // shutdown began (which raced to 0 once).
        let told = self.shared.told_shutdown.load(std::sync::atomic::Ordering::Relaxed);
        info!(clients_told = told, "shut down");
    }

    fn admit(
        &self,
        tracker: &TaskTracker,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<Tls>,
        shutdown: &CancellationToken,
    ) {
        let admitted = match self.admission.admit(peer.ip(), std::time::Instant::now()) {
            Ok(admitted) => admitted,
            Err((why, log)) => {
                let (detail, max) = match why {
                    Refusal::TooMany => (
                        "too many connections from your address",
                        self.shared.config.max_per_address,
                    ),
                    Refusal::TooFast => (
                        "too many new connections from your address; slow down",
                        self.shared.config.connects_per_sec as usize,
                    ),
                };
                if let Some(LogNow(count)) = log {
                    warn!(address = %admission::key_of(peer.ip()), max, refused = count,
                        "{detail}; refusing (logged at most once every 10 s per address)");
                }
                // A TLS client cannot read a plain refusal: it sees the connection close.
                if tls.is_none() {
                    tracker.spawn(refuse_full(stream, detail));
                }
                return;
            }
        };
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let shared = self.shared.clone();
                let shutdown = shutdown.clone();
                // Two kinds of task, not one that could be either: a task is as large as its
                // largest state, and a plain connection must not carry a TLS session's.
                match tls {
                    None => tracker.spawn(async move {
                        connection::serve(stream, peer, shared, shutdown).await;
                        drop((slot, admitted));
                    }),
                    Some(tls) => tracker.spawn(async move {
                        serve_tls(stream, peer, tls, shared, shutdown).await;
                        drop((slot, admitted));
                    }),
                };
            }
            Err(_) => {
                warn!(%peer, max = self.shared.config.max_clients, "server full; refusing connection");
                if tls.is_none() {
                    tracker.spawn(refuse_full(stream, "the server is at its connection limit"));
                }
            }
        }
    }
}

/// The next connection on the TLS listener, if there is one (never, if not).
async fn accept_tls(
    listener: Option<&(TcpListener, Tls)>,
) -> (io::Result<(TcpStream, SocketAddr)>, Tls) {
    match listener {
        Some((listener, tls)) => (listener.accept().await, tls.clone()),
        None => std::future::pending().await,
    }
}

/// Serves one client over TLS: the handshake, within the registration timeout (a handshake
/// that never finishes is dropped then), then the session as over plain TCP.
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Tls,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    connection::prepare(&stream, &shared, peer);
    let handshake = tls.acceptor().accept(stream);
    let stream = tokio::select! {
        () = shutdown.cancelled() => return,
        done = tokio::time::timeout(shared.config.register_timeout, handshake) => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                // A plain client at the TLS port, a client that does not trust the
                // certificate, or garbage: one line, nothing kept.
                info!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                info!(%peer, "TLS handshake not finished in time; disconnecting");
                return;
            }
        },
    };
    // What a key's signature must cover on this session (see relay_proto's `auth`).
    let mut binding = [0u8; relay_proto::TLS_BINDING_LEN];
    let exported = stream.get_ref().1.export_keying_material(
        &mut binding,
        relay_proto::TLS_EXPORTER_LABEL,
        None,
    );
    if let Err(e) = exported {
        info!(%peer, error = %e, "TLS: no exporter value; disconnecting");
        return;
    }
    let (read, write) = tokio::io::split(stream);
    let read = relay_proto::Stream::new(read);
    connection::serve_halves(read, write, Some(binding), peer, shared, shutdown).await;
}

/// Errors from `accept` that concern one connection only, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Tells a connection over the cap why it is refused, briefly, and closes it.
async fn refuse_full(mut stream: TcpStream, detail: &'static str) {
    let msg = Message::reply(0, Status::ServerFull, "", detail).closing();
    let mut buf = BytesMut::new();
    if MessageCodec::new(relay_proto::PRE_REGISTER_MAX_FRAME_LEN).encode(&msg, &mut buf).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(&buf).await?;
            stream.shutdown().await
        })
        .await;
    }
}
