//! The relay server: clients connect over TCP, claim a unique name, and send messages to each
//! other by name or address; the server forwards each one, tells the sender when the
//! receiver is not online, forgets clients that leave or vanish, and on shutdown tells every
//! client to exit.
//!
//! The pieces, one job each:
//! - [`Server`] (`server.rs`): the accept loop, the connection cap, graceful shutdown;
//! - `connection.rs`: one task per client, registration then its messages (read with
//!   `relay_proto::FrameReader`: many frames per read, no buffer while idle);
//! - `writer.rs`: the task that writes a client's outbox in batches;
//! - `outbox.rs`: a client's queue of outgoing frames, bounded by bytes;
//! - `router.rs`: the routing seam (name claims and delivery), over `registry.rs`;
//! - [`Config`] (`config.rs`): every limit, with its default;
//! - [`run_console`] (`console.rs`): the operator's commands on stdin.
//!
//! The binary `relay-server` only parses flags, sets up logging, binds, and wires the console
//! and signals to the shutdown token.
#![deny(missing_docs)]

mod config;
mod connection;
mod console;
mod outbox;
mod registry;
mod router;
mod server;
mod writer;

pub use config::{Config, parse_duration};
pub use console::run_console;
pub use server::{ConfigError, Server, ServerHandle};
