//! `relay-server`: parses flags, sets up logging, binds, and runs the server with the console
//! and signals wired to shutdown.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use std::path::PathBuf;

use clap::Parser;
use relay_server::cluster::{Cluster, ClusterConfig};
use relay_server::{
    AuthMode, Config, InboxLimits, Server, Tls, parse_duration, run_console, serve_metrics,
};
use std::io::Write;
use tokio_util::sync::CancellationToken;

use tracing_appender::non_blocking::{ErrorCounter, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Relay chat server: clients register a name and message each other through it.
/// Type EXIT on the console to tell every client to shut down and stop.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address or host name to listen on (all interfaces by default).
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// Port to listen on; 0 picks a free one.
    #[arg(long, short, default_value_t = 8080)]
    port: u16,
    /// More logging: -v for debug, -vv for trace. RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Less logging: warnings and errors only. RUST_LOG overrides.
    #[arg(short, long)]
    quiet: bool,
    /// Print a completion script for this shell (bash, zsh, fish, elvish, powershell) and exit.
    #[arg(long, value_name = "SHELL")]
    completions: Option<clap_complete::Shell>,
    /// Print the manual page (roff) and exit: `relay-server --man > relay-server.1`.
    #[arg(long)]
    man: bool,
    /// Write the log to this file (appended to) instead of standard error, which then gets one
    /// line saying where the server listens and where its log goes: for running the server in
    /// the background of a terminal where a client is used.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Largest frame in bytes (a power of two, 256 to 16777216).
    #[arg(long, default_value_t = Config::default().max_frame_len)]
    max_frame: usize,
    /// Most connections at once.
    #[arg(long, default_value_t = Config::default().max_clients)]
    max_clients: usize,
    /// Bytes that may wait to be written to one client.
    #[arg(long, default_value_t = Config::default().outbox_bytes)]
    outbox_bytes: usize,
    /// How long a message waits for room when its receiver's outbox is full (slowing its
    /// sender down) before it is refused as not delivered.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    send_wait: Duration,
    /// Time a new connection has to register (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    register_timeout: Duration,
    /// Quiet time after which a client is pinged.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    ping_interval: Duration,
    /// Silence after which a client is disconnected and its name freed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Time a client may accept no bytes while data waits for it before it is dropped.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    write_timeout: Duration,
    /// Time a client has to finish a frame it has started (bytes trickled slower are dropped).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    frame_timeout: Duration,
    /// On shutdown, time clients get to receive what is queued and the shutdown notice.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// Most connections one address (IPv4, or IPv6 /64) may hold open.
    #[arg(long, default_value_t = Config::default().max_per_address)]
    max_per_address: usize,
    /// New connections one address may open per second.
    #[arg(long, default_value_t = Config::default().connects_per_sec)]
    connects_per_sec: u32,
    /// Apply the per-address limits to loopback too (exempt by default).
    #[arg(long)]
    limit_loopback: bool,
    /// Most users one listing gives; longer listings are paged.
    #[arg(long, default_value_t = Config::default().list_page)]
    list_page: usize,
    /// User listings a client may ask for in a burst...
    #[arg(long, default_value_t = Config::default().list_burst)]
    list_burst: u32,
    /// ...and then one more each this often (more are refused with RateLimited).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    list_interval: Duration,
    /// Names and keys: `optional` binds a name to the key that first claims it and lets
    /// clients without a key (guests) use names no key holds; `required` refuses guests;
    /// `none` stores nothing and serves every name first come, first served.
    #[arg(long, default_value = "optional")]
    auth: AuthMode,
    /// Directory of the name table (created on start; unused with --auth none).
    #[arg(long, default_value = "relay-data")]
    data_dir: PathBuf,
    /// Most messages stored for one offline user; over it, senders get InboxFull.
    #[arg(long, default_value_t = InboxLimits::default().messages)]
    inbox_messages: u64,
    /// Most bytes stored for one offline user.
    #[arg(long, default_value_t = InboxLimits::default().bytes)]
    inbox_bytes: u64,
    /// Most bytes stored for all offline users together.
    #[arg(long, default_value_t = InboxLimits::default().store_bytes)]
    store_bytes: u64,
    /// How long a stored message is kept for a user who does not log in (senders online
    /// are told when it expires).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    inbox_max_age: Duration,
    /// Bytes held for messages delivered to a keyed client and not yet acknowledged (with
    /// whatever was written to it in the same batches); past it, messages for it wait as for
    /// a full outbox.
    #[arg(long, default_value_t = Config::default().unacked_window)]
    unacked_window: usize,
    /// Bytes the kernel may hold unsent for one client (TCP_NOTSENT_LOWAT; 0: the kernel's
    /// own sizing, up to 4 MiB). Caps a non-reading client's kernel memory; a saturated
    /// server pays about 20 ns of CPU per message for it.
    #[arg(long, default_value_t = Config::default().kernel_unsent)]
    kernel_unsent: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9090; a host name
    /// works too). Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key for --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve TLS with a self-signed certificate, made at the first start and kept in the data
    /// directory; its fingerprint is logged for clients to pin (--tls-fingerprint).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    tls_self_signed: bool,
    /// Serve TLS on this port beside plain TCP on --port; without it, --port serves TLS only.
    #[arg(long, value_name = "PORT")]
    tls_port: Option<u16>,
    /// Join a cluster through the NATS server at URL (with JetStream: `nats-server -js`).
    /// Names, keys and who is online are then kept in NATS, shared by every node; the data
    /// directory holds no names or messages. See docs/CLUSTER.md.
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,
    /// This node's name in the cluster (letters, digits, '-', '_'); default HOST-PORT.
    #[arg(long, value_name = "NAME", requires = "cluster")]
    node: Option<String>,
    /// How long a node's names outlive its last lease renewal: after a node dies, its users'
    /// names become claimable on other nodes within this long. Every node must use the same.
    #[arg(long, default_value = "10s", value_parser = parse_duration, requires = "cluster")]
    cluster_lease: Duration,
}

impl Args {
    fn config(&self) -> Config {
        Config {
            max_frame_len: self.max_frame,
            max_clients: self.max_clients,
            outbox_bytes: self.outbox_bytes,
            send_wait: self.send_wait,
            register_timeout: self.register_timeout,
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            write_timeout: self.write_timeout,
            frame_timeout: self.frame_timeout,
            shutdown_timeout: self.shutdown_timeout,
            max_per_address: self.max_per_address,
            connects_per_sec: self.connects_per_sec,
            loopback_exempt: !self.limit_loopback,
            list_page: self.list_page,
            list_burst: self.list_burst,
            list_interval: self.list_interval,
            auth: self.auth,
            data_dir: self.data_dir.clone(),
            inbox: InboxLimits {
                messages: self.inbox_messages,
                bytes: self.inbox_bytes,
                store_bytes: self.store_bytes,
                max_age_ms: u64::try_from(self.inbox_max_age.as_millis()).unwrap_or(u64::MAX),
            },
            unacked_window: self.unacked_window,
            kernel_unsent: self.kernel_unsent,
            ..Config::default()
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(shell) = args.completions {
        let mut command = <Args as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut command, "relay-server", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    if args.man {
        let man = clap_mangen::Man::new(<Args as clap::CommandFactory>::command());
        return match man.render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&format!("cannot write the manual page: {e}")),
        };
    }
    let (log_guard, dropped) = match init_logging(&args) {
        Ok(logging) => logging,
        Err(message) => return fail(&message),
    };
    keep_serving_in_the_background();
    raise_open_file_limit(args.max_clients);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    runtime.spawn(report_dropped_log_lines(dropped));
    let result = runtime.block_on(serve(args));
    // The console's stdin read may still be blocked in a thread; do not wait for it.
    runtime.shutdown_background();
    // Flush what is queued for stderr (bounded: the guard gives up after a moment).
    drop(log_guard);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

fn fail(message: &str) -> ExitCode {
    // Not `eprintln!`, which panics if stderr is gone.
    let _ = writeln!(std::io::stderr(), "relay-server: {message}");
    ExitCode::FAILURE
}

async fn serve(args: Args) -> Result<(), String> {
    let config = args.config();
    config.validate()?;
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|e| format!("cannot listen on {}:{}: {e}", args.host, args.port))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut server = match &args.cluster {
        Some(url) => {
            let node =
                args.node.clone().unwrap_or_else(|| ClusterConfig::default_node(addr.port()));
            let cluster = ClusterConfig::new(url.clone(), node).lease(args.cluster_lease);
            let cluster = Cluster::connect(cluster).await.map_err(|e| e.to_string())?;
            Server::in_cluster(listener, config, cluster).await.map_err(|e| e.to_string())?
        }
        None => Server::new(listener, config).map_err(|e| e.to_string())?,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Tls::from_pem_files(cert, key)?),
        _ if args.tls_self_signed => {
            let names = self_signed_names(&args.host);
            let (tls, made) = Tls::self_signed(&args.data_dir, &names)?;
            let file = args.data_dir.join(relay_server::SELF_SIGNED_CERT);
            match made {
                true => tracing::info!("made a self-signed certificate in {}", file.display()),
                false => tracing::info!("using the self-signed certificate in {}", file.display()),
            }
            Some(tls)
        }
        _ => None,
    };
    let mut tls_addr = None;
    match (tls, args.tls_port) {
        (Some(tls), Some(port)) => {
            let listener = tokio::net::TcpListener::bind((args.host.as_str(), port))
                .await
                .map_err(|e| format!("cannot listen on {}:{port}: {e}", args.host))?;
            let at = listener.local_addr().map_err(|e| e.to_string())?;
            tls_addr = Some((at, tls.fingerprint().to_string()));
            server = server.with_tls_listener(listener, tls);
        }
        (Some(tls), None) => {
            tls_addr = Some((addr, tls.fingerprint().to_string()));
            server = server.with_tls(tls);
        }
        (None, Some(_)) => {
            return Err("--tls-port needs --tls-cert and --tls-key, or --tls-self-signed".into());
        }
        (None, None) => {}
    }
    match config_auth(&args) {
        AuthMode::None => tracing::info!("auth none: names are not bound to keys, nothing stored"),
        auth if args.cluster.is_some() => {
            tracing::info!("auth {}; name table in the cluster's NATS", auth.as_str())
        }
        auth => tracing::info!("auth {}; name table in {}", auth.as_str(), args.data_dir.display()),
    }
    tracing::info!("listening on {addr}");
    if let Some((at, fingerprint)) = &tls_addr {
        let plain = if *at == addr { " (TLS only)" } else { "" };
        tracing::info!(
            "serving TLS on {at}{plain}; certificate fingerprint (SHA-256) {fingerprint}"
        );
    }
    if let Some(path) = &args.log_file {
        // The log is elsewhere: say where, and where the server is, in one line.
        let _ = writeln!(
            std::io::stderr(),
            "relay-server: log in {}; listening on {addr}",
            path.display()
        );
    }

    let shutdown = CancellationToken::new();
    if let Some(at) = &args.metrics {
        let metrics = tokio::net::TcpListener::bind(at.as_str())
            .await
            .map_err(|e| format!("cannot serve metrics on {at}: {e}"))?;
        tokio::spawn(serve_metrics(metrics, server.handle(), shutdown.clone()));
    }
    let console = tokio::spawn(run_console(
        tokio::io::BufReader::new(tokio::io::stdin()),
        tokio::io::stdout(),
        server.handle(),
        shutdown.clone(),
    ));
    tokio::spawn(on_signal(shutdown.clone()));
    server.run(shutdown).await;
    console.abort();
    Ok(())
}

/// The names a self-signed certificate is made for: the listening host (unless it is every
/// address), this machine's name, and loopback.
fn self_signed_names(host: &str) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if host.parse::<std::net::IpAddr>().map_or(true, |ip| !ip.is_unspecified()) {
        names.push(host.to_string());
    }
    if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(name.trim().to_string());
    }
    names.retain(|n| !n.is_empty());
    names.sort();
    names.dedup();
    names
}

fn config_auth(args: &Args) -> AuthMode {
    args.auth
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; watching SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
}

/// A process started with `&` from an interactive shell is stopped (SIGTTIN) when it reads
/// the terminal. Ignoring SIGTTIN turns that read into an error instead, which the console
/// treats as "no input for now", so the server keeps serving in the background and the console
/// works again after `fg`.
fn keep_serving_in_the_background() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code; it is done
    // before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGTTIN, libc::SIG_IGN);
    }
}

/// Descriptors the server needs besides its clients: the listener, the name table, standard
/// streams, the runtime's own, with room to spare.
const RESERVED_FDS: u64 = 64;

/// Raises the soft open-file limit to the hard one (each client is a descriptor), and if
/// `--max-clients` still needs more than that allows, says so in one line with the numbers:
/// past the limit, connections would fail to be accepted at all, not even get `ServerFull`.
fn raise_open_file_limit(max_clients: usize) {
    #[cfg(unix)]
    #[allow(unsafe_code)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit only writes the struct passed, which lives on this stack.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return;
        }
        // An unlimited hard limit is still capped by the kernel's nr_open: ask for a million.
        let want = if limit.rlim_max == libc::RLIM_INFINITY { 1 << 20 } else { limit.rlim_max };
        if limit.rlim_cur < want {
            let raised = libc::rlimit { rlim_cur: want, rlim_max: limit.rlim_max };
            // SAFETY: setrlimit only reads the struct passed.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                tracing::debug!(from = limit.rlim_cur, to = want, "raised the open-file limit");
                limit = raised;
            }
        }
        let clients = limit.rlim_cur.saturating_sub(RESERVED_FDS);
        if max_clients as u64 > clients {
            tracing::warn!(
                "--max-clients {max_clients} is more than the open-file limit of {} allows \
                 (about {clients} clients); raise it (ulimit -n) or lower --max-clients",
                limit.rlim_cur
            );
        }
    }
    #[cfg(not(unix))]
    let _ = max_clients;
}

/// Sets up logging to stderr (or `--log-file`) through a thread of its own: serving never
/// waits for a log line to be written. If stderr is not being read (a full pipe, a reader that
/// went away), lines are dropped, not queued without end, and counted in the returned
/// counter. The guard flushes what is queued when dropped.
///
/// # Errors
/// A log file that cannot be opened, as one line.
fn init_logging(args: &Args) -> Result<(WorkerGuard, ErrorCounter), String> {
    let default = match (args.quiet, args.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(10_000)
        .thread_name("relay-log");
    let (writer, guard, ansi) = match &args.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
            let (writer, guard) = builder.finish(file);
            (writer, guard, false)
        }
        None => {
            let (writer, guard) = builder.finish(std::io::stderr());
            (writer, guard, std::io::stderr().is_terminal())
        }
    };
    let dropped = writer.error_counter();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi).init();
    Ok((guard, dropped))
}

/// Says, once logging flows again, how many lines were dropped while it did not.
async fn report_dropped_log_lines(dropped: ErrorCounter) {
    let mut reported = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = dropped.dropped_lines();
        if now > reported {
            tracing::warn!(
                dropped = now - reported,
                "log lines were dropped: standard error was not being read"
            );
            reported = now;
        }
    }
}
