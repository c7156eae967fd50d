//! Cluster mode: several relay-server nodes share one namespace through NATS.
//!
//! The design is in `docs/CLUSTER.md`. In short:
//!
//! - **Names and keys** live in the JetStream key-value bucket `relay_names`
//!   (`names::NatsNames`, the second implementation of the [`NameStore`] seam).
//! - **Who is online where** lives in the bucket `relay_online`, one key per name's look-alike
//!   skeleton, claimed with a compare-and-set create. Each node holds a **lease** in the bucket
//!   `relay_nodes` (refreshed every quarter of the lease; the bucket's `max_age` is the lease),
//!   and a claim whose node's lease has lapsed, or whose node restarted, may be taken over.
//! - **Messages** to a name on another node go over core NATS to that node's subject
//!   `relay.node.<node>`, many records per NATS message; each node watches `relay_online` and
//!   `relay_nodes`, so finding a name's node (or that nobody holds it) costs no round trip.
//!
//! [`NameStore`]: crate::names::NameStore

mod inbox;
mod link;
mod names;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};

use crate::inbox::InboxLimits;

pub(crate) use inbox::NatsInbox;
pub(crate) use link::Link;
pub(crate) use names::NatsNames;

/// The buckets and subjects, named once.
pub(crate) mod layout {
    /// The name table.
    pub(crate) const NAMES: &str = "relay_names";
    /// Who is online, on which node.
    pub(crate) const ONLINE: &str = "relay_online";
    /// The nodes' leases.
    pub(crate) const NODES: &str = "relay_nodes";

    /// The subject a node receives its forwarded records on.
    pub(crate) fn node_subject(node: &str) -> String {
        format!("relay.node.{node}")
    }
}

/// How a node joins a cluster.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// The NATS server(s), e.g. `nats://127.0.0.1:4222` (comma-separated for several).
    pub url: String,
    /// This node's name: unique in the cluster, letters, digits, `-` and `_`.
    pub node: String,
    /// How long a node's claims outlive its last lease renewal: names held on a node that died
    /// (or lost NATS) become claimable elsewhere after at most this long.
    pub lease: Duration,
    /// How long a message forwarded to another node may go unacknowledged in all, through an
    /// outage of this node's NATS link, before its sender is told it was not delivered
    /// (default 60 s). While the link is down the wait goes on: what sat in the NATS client's
    /// buffer is sent when the link comes back. The receiving node delivers such a message
    /// only within five sixths of this wait (on its own clock), so a message its sender was
    /// told about is never delivered as well, if the nodes' clocks are that close.
    pub outage_wait: Duration,
}

impl ClusterConfig {
    /// Joins the cluster at `url` as `node`, with the default lease (10 s).
    pub fn new(url: impl Into<String>, node: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            url: url.into(),
            node: node.into(),
            lease: Duration::from_secs(10),
            outage_wait: Duration::from_secs(60),
        }
    }

    /// Sets the outage wait (see [`ClusterConfig::outage_wait`]).
    #[must_use]
    pub fn outage_wait(mut self, wait: Duration) -> ClusterConfig {
        self.outage_wait = wait;
        self
    }

    /// Sets the lease.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> ClusterConfig {
        self.lease = lease;
        self
    }

    /// A node name from the host name and the port: `host-8080`.
    pub fn default_node(port: u16) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
            .take(48)
            .collect();
        let host = if host.is_empty() { "relay".to_string() } else { host };
        format!("{host}-{port}")
    }

    fn validate(&self) -> Result<(), ClusterError> {
        let ok = !self.node.is_empty()
            && self.node.len() <= 64
            && self.node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(ClusterError::Config(format!(
                "node name {:?}: use 1 to 64 letters, digits, '-' or '_'",
                self.node
            )));
        }
        if self.lease < Duration::from_secs(1) {
            return Err(ClusterError::Config("the cluster lease must be at least 1s".into()));
        }
        if self.outage_wait < Duration::from_secs(1) {
            return Err(ClusterError::Config("the outage wait must be at least 1s".into()));
        }
        Ok(())
    }
}

/// The cluster could not be joined.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The configuration was refused.
    #[error("cluster: {0}")]
    Config(String),
    /// NATS could not be reached or refused a request.
    #[error("cluster: NATS at {url}: {error}")]
    Nats {
        /// The address tried.
        url: String,
        /// What went wrong.
        error: String,
    },
}

/// Opens key-value bucket `name`, making it if this is the first node.
///
/// The stream is made here with the key-value layout (`KV_<name>` over `$KV.<name>.>`, one
/// value per key, direct reads) rather than by async-nats's `create_key_value`, which first
/// reads the account's limits in a form that nats-server 2.9 does not send. A bucket made
/// earlier with another `max_age` (another `--cluster-lease`) takes this node's value: the
/// node started last sets the lease, and says so.
async fn bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, String> {
    let config = jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    let stream = js.get_or_create_stream(config.clone()).await.map_err(|e| e.to_string())?;
    if stream.cached_info().config.max_age != max_age {
        tracing::warn!(bucket = name, was = ?stream.cached_info().config.max_age, now = ?max_age, "the bucket's max age changes to this node's setting");
        js.update_stream(config).await.map_err(|e| e.to_string())?;
    }
    js.get_key_value(name).await.map_err(|e| e.to_string())
}

/// A node's connection to the cluster, made before the server starts (so a bad address or a
/// NATS server without JetStream is a clear error at start, not at the first claim).
#[derive(Debug)]
pub struct Cluster {
    pub(crate) names: NatsNames,
    pub(crate) link: Arc<Link>,
    js: jetstream::Context,
    max_payload: usize,
}

impl Cluster {
    /// Connects to NATS, creates the buckets if this is the first node, and starts following
    /// who is online where.
    ///
    /// # Errors
    /// A bad node name, NATS unreachable, or JetStream not enabled on it (`nats-server -js`).
    pub async fn connect(config: ClusterConfig) -> Result<Cluster, ClusterError> {
        config.validate()?;
        let nats = |error: String| ClusterError::Nats { url: config.url.clone(), error };
        let state = Arc::new(link::LinkState::default());
        let events = state.clone();
        let node = config.node.clone();
        let client = async_nats::ConnectOptions::new()
            .name(format!("relay-server {node}"))
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .event_callback(move |event| {
                let events = events.clone();
                async move { events.event(event) }
            })
            .connect(config.url.as_str())
            .await
            .map_err(|e| nats(e.to_string()))?;
        let mut js = jetstream::new(client.clone());
        // A request to a NATS that is down fails in this long, rather than holding a
        // registration for the default 10 s.
        js.set_timeout(Duration::from_secs(3));
        let no_js = |e: String| {
            nats(format!("{e} (is JetStream enabled? start the server with `nats-server -js`)"))
        };
        let names = bucket(&js, layout::NAMES, Duration::ZERO).await.map_err(no_js)?;
        let online = bucket(&js, layout::ONLINE, Duration::ZERO).await.map_err(no_js)?;
        let nodes = bucket(&js, layout::NODES, config.lease).await.map_err(no_js)?;
        let max_payload = client.server_info().max_payload;
        let link = Link::start(link::Parts {
            client,
            online,
            nodes,
            node: config.node,
            lease: config.lease,
            outage_wait: config.outage_wait,
            max_payload,
            state,
        })
        .await
        .map_err(nats)?;
        Ok(Cluster { names: NatsNames::new(names), link, js, max_payload })
    }

    /// Opens the inboxes (the stream `relay_inbox`), making the stream if this is the first
    /// node.
    pub(crate) async fn inbox(&self, limits: InboxLimits) -> Result<NatsInbox, ClusterError> {
        let names = self.names.clone();
        NatsInbox::open(self.js.clone(), names.clone(), names.bucket(), limits, self.max_payload)
            .await
            .map_err(|error| ClusterError::Nats { url: "(connected)".into(), error })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        self.link.node()
    }
}
