//! Errors of the client library, one type per operation.

use std::io;
use std::time::Duration;

use relay_proto::Status;

/// Why [`Client::connect`](crate::Client::connect) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The server address did not resolve, or the TCP connection failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address as given.
        addr: String,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The TCP connection did not complete in time.
    #[error("timed out connecting to {addr}")]
    ConnectTimeout {
        /// The address as given.
        addr: String,
    },
    /// The name breaks the naming rules (checked before anything is sent).
    #[error("invalid name '{name}': {reason}")]
    InvalidName {
        /// The name asked for.
        name: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// Another client holds the name.
    #[error("the name '{name}' is taken")]
    NameTaken {
        /// The name asked for.
        name: String,
    },
    /// The name belongs to a key this client did not prove (another key's, or any key's for
    /// a client without one). The detail, from the server, says what to do.
    #[error("{detail}")]
    NameOwned {
        /// The name asked for.
        name: String,
        /// The server's explanation.
        detail: String,
    },
    /// The name looks like (has the same look-alike skeleton as) a name that is taken.
    #[error("{detail}")]
    LooksLike {
        /// The name asked for.
        name: String,
        /// The server's explanation, naming the other name.
        detail: String,
    },
    /// The server did not accept the key's signature.
    #[error("the server refused the key: {detail}")]
    AuthFailed {
        /// The server's explanation.
        detail: String,
    },
    /// The server only accepts clients with a key.
    #[error("the server only accepts clients with a key")]
    AuthRequired,
    /// The server refused the registration for another reason (server full, version...).
    #[error("the server refused the registration: {status} ({detail})")]
    Refused {
        /// The typed reason.
        status: Status,
        /// The server's explanation.
        detail: String,
    },
    /// The server did not answer the registration in time.
    #[error("the server did not answer the registration within {0:?}")]
    RegisterTimeout(Duration),
    /// The server closed the connection without answering the registration.
    #[error("the server closed the connection before answering the registration")]
    Closed,
    /// The server sent something that is not valid protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The TLS handshake failed: the certificate did not verify, or the server does not
    /// speak TLS there. Nothing was sent.
    #[error("TLS with {addr} failed: {reason}")]
    Tls {
        /// The address as given.
        addr: String,
        /// Why, for a person.
        reason: String,
    },
    /// What answered at the address is not a relay server: its first bytes are no relay
    /// greeting (a web server answering `HTTP/1.1 400`, say).
    #[error("{addr} is not a relay server (it answered {answered})")]
    NotRelay {
        /// The address as given.
        addr: String,
        /// What it sent first, shown safely.
        answered: String,
    },
}

/// Why a message could not be handed to the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The connection is closed; nothing more can be sent.
    #[error("not connected: the connection to the server is closed")]
    Closed,
    /// The message does not fit in one frame.
    #[error("message of {len} bytes is over the frame limit of {max} bytes")]
    TooLarge {
        /// Encoded length of the message.
        len: usize,
        /// The frame limit.
        max: usize,
    },
    /// The destination is neither a valid name nor an `ip:port` address.
    #[error("invalid destination '{to}': {reason}")]
    InvalidDestination {
        /// The destination as given.
        to: String,
        /// Which rule it breaks.
        reason: String,
    },
}
