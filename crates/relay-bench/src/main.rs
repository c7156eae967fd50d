//! `relay-bench`: see the library for the workloads.

fn main() -> std::process::ExitCode {
    relay_bench::cli::main()
}
