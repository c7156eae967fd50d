//! The name table seam: which names are bound to which key, kept in a store that survives
//! restarts. The server talks to it only through [`NameStore`]; the embedded implementation is
//! [`RedbStore`](crate::redb_store::RedbStore), and a cluster implementation (NATS JetStream
//! key-value buckets) fits the same calls: a claim is a compare-and-set create, the others are
//! reads, updates and deletes of one key.

use std::fmt;

use futures_util::future::BoxFuture;
use relay_proto::PublicKey;

/// One bound name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameRecord {
    /// The name as first bound: how it is shown.
    pub display: String,
    /// The canonical form (the table's key).
    pub canonical: String,
    /// The look-alike skeleton of `display`.
    pub skeleton: String,
    /// The key the name belongs to.
    pub key: PublicKey,
    /// When the name was first bound, in ms since the Unix epoch.
    pub bound_at: u64,
    /// When its owner last logged in or out, in ms since the Unix epoch.
    pub last_seen: u64,
    /// How many times its owner has logged in: the high bits of every sequence number it is
    /// given, so those only grow across reconnects and restarts.
    pub epoch: u64,
}

/// A keyed claim of a name: bind it to `key` if nobody holds it, or log in if `key` does.
#[derive(Clone, Debug)]
pub struct KeyClaim {
    /// The name as asked for.
    pub display: String,
    /// Its canonical form.
    pub canonical: String,
    /// Its skeleton.
    pub skeleton: String,
    /// The key the client proved.
    pub key: PublicKey,
    /// Now, in ms since the Unix epoch.
    pub now: u64,
}

/// What became of a [`KeyClaim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// The name is bound to the claimed key (just now if `first`); its epoch was advanced and
    /// the new value stored before this answer.
    Bound {
        /// The record as stored.
        record: NameRecord,
        /// The name was free and is now bound.
        first: bool,
    },
    /// The name is bound to another key.
    Owned {
        /// The name as bound.
        display: String,
    },
    /// Another bound name looks like this one.
    Confusable {
        /// That name.
        display: String,
    },
}

/// Whether a guest may use a name, as far as the table is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestCheck {
    /// No key holds it or anything like it.
    Free,
    /// A key holds this name.
    Owned {
        /// The name as bound.
        display: String,
    },
    /// A key holds a name that looks like this one.
    Confusable {
        /// That name.
        display: String,
    },
}

/// The store failed; the server cannot decide about names now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("name table: {0}")]
pub struct StoreError(pub String);

/// The name table. Every call is async and can fail, because a store on disk or in a broker
/// can; none is on the message path.
pub trait NameStore: Send + Sync + fmt::Debug + 'static {
    /// Binds the name to the key if neither it nor a look-alike is bound, or logs in its
    /// owner; durable before the answer.
    fn claim(&self, claim: KeyClaim) -> BoxFuture<'static, Result<Claimed, StoreError>>;

    /// Whether a guest may use the name with this canonical form and skeleton.
    fn check_guest(
        &self,
        canonical: String,
        skeleton: String,
    ) -> BoxFuture<'static, Result<GuestCheck, StoreError>>;

    /// Records that the owner of `canonical` went offline at `now`.
    fn seen(&self, canonical: String, now: u64) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Unbinds `canonical` (the operator's `release`); returns what was bound.
    fn release(
        &self,
        canonical: String,
    ) -> BoxFuture<'static, Result<Option<NameRecord>, StoreError>>;

    /// The record for `canonical`, if bound.
    fn lookup(
        &self,
        canonical: String,
    ) -> BoxFuture<'static, Result<Option<NameRecord>, StoreError>>;

    /// Finishes what was asked and lets go of the store (a file lock, a broker connection);
    /// later calls fail.
    fn close(&self) -> BoxFuture<'static, ()>;
}
