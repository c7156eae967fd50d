//! `relay-client`: connects, registers, and runs the session: the chat prompt on a terminal,
//! commands line by line from a pipe, or one command (`send`, `list`, `listen`).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use std::time::Duration;

use std::path::PathBuf;

mod cli;
mod terminal;

use std::sync::Arc;

use cli::{Command, Conversation, Ended, Io, Names, Output};
use relay_client::{Client, ClientConfig, ConnectError, Tls, default_key_path, load_or_create_key};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Notify, mpsc};
use tracing_subscriber::EnvFilter;

/// Interactive client for the relay chat server.
///
/// In a terminal, a chat prompt (type help); from a pipe, commands line by line: /msg NAME
/// [MESSAGE], send <name|ip:port> <message>, list, help, EXIT.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Server as host:port (a host name or address; without a port, 8080).
    #[arg(long, short, default_value = "127.0.0.1:8080", env = "RELAY_SERVER")]
    server: String,
    /// Name to register (needed for everything but `completions` and `man`).
    #[arg(long, short, env = "RELAY_USER")]
    user: Option<String>,
    /// Keep trying to reach the server for this long (e.g. 5s) instead of failing at once.
    #[arg(long, value_parser = parse_seconds)]
    wait: Option<Duration>,
    /// Key file proving the name is yours (created on first use). Default:
    /// $XDG_CONFIG_HOME/relay/keys/NAME.key.
    #[arg(long, env = "RELAY_KEY")]
    key: Option<PathBuf>,
    /// Connect without a key, as a guest: only names no key holds, and only while online.
    #[arg(long, conflicts_with = "key")]
    guest: bool,
    /// Exit when the connection is lost, rather than reconnect.
    #[arg(long)]
    no_reconnect: bool,
    /// Connect over TLS, trusting the certificate authorities this system trusts.
    #[arg(long)]
    tls: bool,
    /// Connect over TLS, trusting the certificate authorities in this PEM file.
    #[arg(long, value_name = "FILE", conflicts_with = "tls_fingerprint")]
    ca: Option<PathBuf>,
    /// Connect over TLS to the server whose certificate has this SHA-256 fingerprint (what a
    /// server with --tls-self-signed logs), whoever signed it.
    #[arg(long, value_name = "SHA256")]
    tls_fingerprint: Option<String>,
    /// One command, then exit (for scripts); without one, commands are read from stdin.
    #[command(subcommand)]
    command: Option<OneShot>,
}

/// Commands run once, for scripts: nothing printed on success but what was asked for, one
/// line on stderr and exit code 1 on failure.
#[derive(Debug, clap::Subcommand)]
enum OneShot {
    /// Sends one message and waits for its answer (not found, not delivered, stored...).
    Send {
        /// Destination: a name, or an address as `list` shows it.
        to: String,
        /// The message (several words are joined by spaces).
        #[arg(required = true, num_args = 1..)]
        message: Vec<String>,
        /// Also wait until the receiver's client has taken it (its `Delivered` receipt; names
        /// bound to a key send them, guests do not), for at most this long (e.g. 10s); no
        /// receipt in time is a failure.
        #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
        receipt: Option<Duration>,
    },
    /// Prints the users online (every page), one `name address` line each.
    List,
    /// Prints a completion script for a shell (e.g. `relay-client completions bash >
    /// ~/.local/share/bash-completion/completions/relay-client`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Prints the manual page (roff; e.g. `relay-client man > relay-client.1`).
    Man,
    /// Prints each message received, one line each, until interrupted or the server shuts down.
    Listen {
        /// One JSON object per line: from, to, time (ms since the Unix epoch), content.
        #[arg(long)]
        json: bool,
    },
}

/// The port a server address without one means.
const DEFAULT_PORT: u16 = 8080;

/// `host:port` for `server`: as given if it has a port, else with [`DEFAULT_PORT`] (an IPv6
/// address gets its brackets).
fn with_port(server: &str) -> String {
    if server.parse::<std::net::SocketAddr>().is_ok() {
        return server.to_string();
    }
    if let Ok(ip) = server.parse::<std::net::IpAddr>() {
        return std::net::SocketAddr::new(ip, DEFAULT_PORT).to_string();
    }
    match server.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => server.to_string(),
        _ => format!("{server}:{DEFAULT_PORT}"),
    }
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let number = text.strip_suffix('s').unwrap_or(text);
    number
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("'{text}' is not a number of seconds like 5s"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match &args.command {
        Some(OneShot::Completions { shell }) => {
            let mut command = <Args as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "relay-client", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(OneShot::Man) => {
            let man = clap_mangen::Man::new(<Args as clap::CommandFactory>::command());
            return match man.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("cannot write the manual page: {e}")),
            };
        }
        _ => {}
    }
    // Library diagnostics only when asked for; the session itself prints plain lines.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(session(args));
    // A read of stdin may still be blocked in a thread; do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

fn fail(message: &str) -> ExitCode {
    // Errors may quote the server (a refusal's detail): shown inert, like everything else.
    eprintln!("relay-client: {}", cli::printable(message.as_bytes()));
    ExitCode::FAILURE
}

async fn session(mut args: Args) -> Result<(), String> {
    args.server = with_port(&args.server);
    let user = args.user.clone().ok_or("which name? give --user NAME (or set RELAY_USER)")?;
    let mut config = ClientConfig::default();
    // A name that cannot be registered gets no key file.
    relay_client::name_key(&user).map_err(|e| format!("invalid name '{user}': {e}"))?;
    if !args.guest {
        let path = match &args.key {
            Some(path) => path.clone(),
            None => default_key_path(&user).map_err(|e| e.to_string())?,
        };
        let (identity, created) = load_or_create_key(&path).map_err(|e| e.to_string())?;
        if created {
            eprintln!(
                "relay-client: created a new key for {} in {} (keep it: it proves the name \
                 is yours)",
                user,
                path.display()
            );
        }
        config.identity = Some(identity);
    }
    config.tls = match (&args.ca, &args.tls_fingerprint) {
        (Some(ca), _) => Some(Tls::ca_file(ca).map_err(|e| e.to_string())?),
        (None, Some(pin)) => Some(Tls::pinned(pin).map_err(|e| e.to_string())?),
        (None, None) if args.tls => Some(Tls::system_roots().map_err(|e| e.to_string())?),
        (None, None) => None,
    };
    let deadline = args.wait.map(|wait| tokio::time::Instant::now() + wait);
    let mut told_waiting = false;
    let (client, events) = loop {
        match Client::connect_with(&args.server, &user, config.clone()).await {
            Ok(connected) => break connected,
            // Only an unreachable server is worth waiting for; a refusal is final.
            Err(ConnectError::Connect { .. } | ConnectError::ConnectTimeout { .. })
                if deadline.is_some_and(|d| tokio::time::Instant::now() < d) =>
            {
                if !std::mem::replace(&mut told_waiting, true) {
                    eprintln!("relay-client: waiting for {} to answer...", args.server);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    match &args.command {
        Some(OneShot::Send { to, message, receipt }) => {
            return cli::send_once(client, events, to, &message.join(" "), *receipt).await;
        }
        Some(OneShot::List) => return cli::list_once(client, events).await,
        Some(OneShot::Listen { json }) => return cli::listen(client, events, *json).await,
        Some(OneShot::Completions { .. } | OneShot::Man) | None => {}
    }
    // A notice, not output: stdout carries only messages and listings (a script reads it).
    let _ = writeln!(
        std::io::stderr(),
        "connected to {} as {} (type help for commands)",
        args.server,
        client.name()
    );
    // A person at a terminal gets the prompt; a pipe or a file is a script, whose failed
    // commands make the exit code non-zero.
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let script = !std::io::stdin().is_terminal();
    let quit = Arc::new(Notify::new());
    let (mut io, terminal) = if interactive {
        let names = Arc::new(Names::default());
        let colour = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let started =
            terminal::start(names.clone(), quit.clone(), terminal::history_path(), colour)?;
        let output = Output::terminal(started.printer, colour);
        (
            Io { commands: started.commands, output, failed: 0, names: Some(names) },
            Some(started.terminal),
        )
    } else {
        (Io { commands: read_stdin(), output: Output::script(), failed: 0, names: None }, None)
    };
    let result = tokio::select! {
        result = converse(client, events, &mut io, &args, &user, &config, &quit) => result,
        // Killed politely (the terminal closed, or `kill`): a way out like the others, so the
        // terminal is given back; the server sees the connection close.
        () = terminated(), if terminal.is_some() => Ok(Ended::Done),
    };
    let failed = io.failed;
    // The printer ends with the last output; then the terminal is given back.
    drop(io);
    if let Some(terminal) = terminal {
        tokio::task::block_in_place(|| terminal.finish());
    }
    match result? {
        Ended::Done => cli::finish(script, failed),
        Ended::Shutdown => Ok(()),
        Ended::Lost(reason) => Err(reason),
    }
}

/// The session across reconnects: until the user is done, the server shuts down, or the
/// connection is lost for good (`--no-reconnect`, or the user quit while it was away).
async fn converse(
    mut client: Client,
    mut events: relay_client::Events,
    io: &mut Io,
    args: &Args,
    user: &str,
    config: &ClientConfig,
    quit: &Notify,
) -> Result<Ended, String> {
    loop {
        match cli::run_connected(client, events, io).await? {
            Ended::Lost(reason) if !args.no_reconnect => {
                // Lines typed meanwhile wait (a bounded number) and go out once it is back.
                io.output.notice(&format!("{reason}; reconnecting...")).await;
                (client, events) = tokio::select! {
                    back = reconnect(&args.server, user, config) => back?,
                    () = quit.notified() => return Ok(Ended::Done),
                };
                io.output
                    .notice(&format!("reconnected to {} as {}", args.server, client.name()))
                    .await;
            }
            ended => return Ok(ended),
        }
    }
}

/// Waits for SIGTERM or SIGHUP (forever if they cannot be listened for).
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::hangup())) {
        (Ok(mut term), Ok(mut hup)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Commands from stdin (a pipe or a file), parsed as they come; end of input is `EXIT`.
fn read_stdin() -> mpsc::Receiver<Command> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut conversation = Conversation::default();
        // Unreadable input ends it as end of input does.
        while let Ok(Some(line)) = lines.next_line().await {
            let command = conversation.command(&line);
            let exit = command == Command::Exit;
            if tx.send(command).await.is_err() || exit {
                return;
            }
        }
        let _ = tx.send(Command::Exit).await;
    });
    rx
}

/// Connects again after a lost connection, with the same name (and key), retrying with
/// backoff (from 0.2 s, doubling, at most 10 s, each wait varied by up to a fifth so that
/// many clients of a restarted server do not come back in step). Gives up only on a refusal
/// that retrying cannot change (the name belongs to another key, say); the user can quit
/// meanwhile.
async fn reconnect(
    server: &str,
    user: &str,
    config: &ClientConfig,
) -> Result<(Client, relay_client::Events), String> {
    let mut wait = Duration::from_millis(200);
    loop {
        match Client::connect_with(server, user, config.clone()).await {
            Ok(connected) => return Ok(connected),
            // What retrying cannot change: the name or the key is refused.
            Err(
                e @ (ConnectError::InvalidName { .. }
                | ConnectError::NameOwned { .. }
                | ConnectError::LooksLike { .. }
                | ConnectError::AuthFailed { .. }
                | ConnectError::AuthRequired
                | ConnectError::NotRelay { .. }
                | ConnectError::Tls { .. }),
            ) => return Err(e.to_string()),
            // Unreachable, restarting (a reset mid-handshake), full, or still holding the old
            // session's name: later.
            Err(_) => {
                tokio::time::sleep(jittered(wait)).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// `wait` varied by up to a fifth either way.
fn jittered(wait: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // 0.8 to 1.2, from the clock's nanoseconds: enough to spread clients out.
    let factor = 0.8 + 0.4 * f64::from(nanos % 1000) / 1000.0;
    wait.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::with_port;

    #[test]
    fn a_server_without_a_port_means_8080() {
        assert_eq!(with_port("127.0.0.1:9000"), "127.0.0.1:9000");
        assert_eq!(with_port("127.0.0.1"), "127.0.0.1:8080");
        assert_eq!(with_port("localhost"), "localhost:8080");
        assert_eq!(with_port("localhost:9000"), "localhost:9000");
        assert_eq!(with_port("::1"), "[::1]:8080");
        assert_eq!(with_port("[::1]:9000"), "[::1]:9000");
        assert_eq!(with_port("chat.example.org"), "chat.example.org:8080");
    }
}
