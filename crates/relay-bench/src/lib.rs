//! `relay-bench`: throughput, latency and connection-cost workloads for relay-server, built on
//! the `relay-client` library, and the same workloads against a nats-server for comparison.
//!
//! Benchmarks are not tests: nothing here asserts a speed. `bench/compare.sh` runs every
//! workload against both servers and prints the ratios.
#![deny(missing_docs)]

pub mod cli;
pub mod compare;
pub mod nats;
pub mod not_found;
pub mod payload;
pub mod progress;
pub mod store;
pub mod target;
pub mod workloads;
