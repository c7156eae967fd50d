//! The relay server: clients connect over TCP, claim a unique name, and send messages to each
//! other by name or address; the server forwards each one, tells the sender when the
//! receiver is not online, forgets clients that leave or vanish, and on shutdown tells every
//! client to exit.
//!
//! The pieces, one job each:
//! - [`Server`] (`server.rs`): the accept loop, the connection cap, graceful shutdown;
//! - `admission.rs`: per-address limits (connections held, connections opened per second);
//! - `connection.rs`: one task per client, registration then its messages (read with
//!   `relay_proto::FrameReader`: many frames per read, no buffer while idle);
//! - `writer.rs`: the task that writes a client's outbox in batches;
//! - [`Tls`] (`tls.rs`): TLS settings, from PEM files or self-signed in the data directory;
//! - `outbox.rs`: a client's queue of outgoing frames, encoded as they are queued, bounded by
//!   bytes;
//! - `router.rs`: the routing seam (the `Routing` trait: name claims and delivery, with a
//!   per-connection cache of the last destination) and its local implementation, over
//!   `registry.rs` (who is online) and the name table;
//! - [`NameStore`] (`names.rs`): the name table seam (name → key, durable), with
//!   [`RedbStore`] (`redb_store.rs`) as the embedded implementation, its inboxes in
//!   `redb_inbox.rs` and its write-ahead log in `journal.rs`;
//! - [`Config`] (`config.rs`): every limit, with its default;
//! - [`run_console`] (`console.rs`): the operator's commands on stdin;
//! - `metrics.rs`: the counters (no lock on the message path) and [`serve_metrics`], the
//!   Prometheus endpoint.
//!
//! The binary `relay-server` only parses flags, sets up logging, binds, and wires the console
//! and signals to the shutdown token.
#![deny(missing_docs)]

mod admission;
pub mod cluster;
mod config;
mod connection;
mod console;
mod inbox;
mod journal;
mod keepalive;
mod metrics;
mod names;
mod outbox;
mod redb_inbox;
mod redb_store;
mod registry;
mod router;
mod server;
mod tls;
mod writer;

pub use config::{Config, parse_duration};
pub use console::run_console;
pub use inbox::{
    AppendDone, Appended, Envelope, ExpiredMessage, Full, InboxLimits, InboxStore, Page, SenderRef,
    Stored, Totals,
};
pub use journal::JOURNAL_FILES;
pub use metrics::{Snapshot, serve_metrics};
pub use names::{Claimed, GuestCheck, KeyClaim, NameRecord, NameStore, StoreError};
pub use redb_store::{DB_FILE, OpenError, RedbStore};
pub use relay_proto::AuthMode;
pub use router::Who;
pub use server::{Server, ServerHandle, StartError};
pub use tls::{SELF_SIGNED_CERT, SELF_SIGNED_KEY, Tls, fingerprint};

/// Entry points for the criterion benchmarks (`benches/routing.rs`); not a stable API.
#[doc(hidden)]
pub mod bench_support {
    use std::net::SocketAddr;

    use crate::outbox::Outbox;
    use crate::registry::{Entry, Registry};

    /// A name registry filled with `user0` .. `user{n-1}`.
    #[derive(Debug, Default)]
    pub struct Names {
        registry: Registry,
    }

    impl Names {
        /// A registry holding `n` names.
        pub fn new(n: usize) -> Names {
            let names = Names::default();
            for i in 0..n {
                names.register(&format!("user{i}"), i);
            }
            names
        }

        /// Registers `name` (as a client at port `i`); returns its token if it was free.
        pub fn register(&self, name: &str, i: usize) -> Option<u64> {
            let addr = SocketAddr::from(([127, 0, 0, 1], (i % 65536) as u16));
            let key = relay_proto::name_key(name).ok()?;
            let entry =
                Entry { key: &key, display: name, addr, outbox: Outbox::new(1024), guest: true };
            let (_, token) = self.registry.insert(entry).ok()?;
            self.registry.open(&key.canonical, token).then_some(token)
        }

        /// Unregisters `name` if `token` still owns it.
        pub fn unregister(&self, name: &str, token: u64) {
            self.registry.remove(name, token);
        }

        /// What routing does per message: finds `name` and takes a handle to its outbox.
        pub fn lookup(&self, name: &str) -> bool {
            self.registry.with_name(name, |e| e.outbox.clone()).is_some()
        }
    }
}
