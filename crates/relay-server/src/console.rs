//! The operator console: commands typed on the server's standard input.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::metrics::Snapshot;
use crate::router::{Who, now_ms};
use crate::server::ServerHandle;

const HELP: &str = "commands:
  EXIT                 tell every client to shut down, then stop
  list                 the users online
  who NAME             a user's address, node, time online and queue
  kick NAME [REASON]   disconnect a user, who is shown the reason (and does not reconnect)
  stats                what the server has counted (the metrics endpoint has the same)
  inboxes              messages stored for offline users
  purge NAME           delete the messages stored for NAME
  release NAME         unbind a name from its key, for a user who lost it
  help                 this list";

/// The argument of `cmd` if it is `command` followed by whitespace and a name.
fn argument<'a>(cmd: &'a str, command: &str) -> Option<&'a str> {
    let rest = cmd.strip_prefix(command)?;
    let name = rest.trim();
    (rest.starts_with(char::is_whitespace) && !name.is_empty()).then_some(name)
}

/// The console's `stats`: the counters in a few lines.
fn stats(s: &Snapshot, online: usize) -> String {
    let pairs = |counts: &[(&str, u64)]| {
        let shown: Vec<String> = counts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(what, n)| format!("{} {n}", what.replace('_', " ")))
            .collect();
        if shown.is_empty() { "none".to_string() } else { shown.join(", ") }
    };
    format!(
        "connections: {} open, {} since start; {online} users online\n\
         registrations: {}\n\
         messages: {} routed, {} stored; refused: {}\n\
         bytes: {} received, {} sent\n\
         disconnected: {} slow consumers, {} kicked\n",
        s.connections_open,
        s.connections,
        pairs(&s.registrations),
        s.routed,
        s.stored,
        pairs(&s.refused),
        s.bytes_in,
        s.bytes_out,
        s.slow_consumers,
        s.kicked,
    )
}

/// The console's `who`: one line.
fn who_line(who: &Who) -> String {
    let online = std::time::Duration::from_secs(now_ms().saturating_sub(who.since) / 1000);
    let kind = if who.version >= 2 { "" } else { ", protocol version 1" };
    format!(
        "{} at {} on {}, online for {}; {} bytes queued, {} unacknowledged{kind}\n",
        who.name,
        who.addr,
        who.node,
        humantime(online),
        who.queued_bytes,
        who.unacked,
    )
}

/// `1h 2m 3s`, largest units first, zeros left out.
fn humantime(d: std::time::Duration) -> String {
    let s = d.as_secs();
    let parts = [(s / 86_400, "d"), (s / 3600 % 24, "h"), (s / 60 % 60, "m"), (s % 60, "s")];
    let shown: Vec<String> =
        parts.iter().filter(|(n, _)| *n > 0).map(|(n, unit)| format!("{n}{unit}")).collect();
    if shown.is_empty() { "0s".into() } else { shown.join(" ") }
}

/// Reads operator commands from `input` until `EXIT`, the end of input, or shutdown.
///
/// `EXIT` cancels `shutdown`, which makes the server tell every client to shut down and stop.
/// The end of input (stdin closed, or not attached to anything) only ends the console: the
/// server keeps serving, as it must under a service manager or in the background.
///
/// # Errors
/// Only if writing to `output` fails.
pub async fn run_console<R, W>(
    input: R,
    mut output: W,
    server: ServerHandle,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut lines = input.lines();
    loop {
        let line = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            line = lines.next_line() => line,
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => {
                tracing::info!("console input closed; serving until SIGINT or SIGTERM");
                return Ok(());
            }
            Err(e) => {
                // Typically EIO: the server was started in the background of a shell (`&`)
                // and may be brought to the foreground later. Serve on and try again.
                tracing::debug!(error = %e, "console input unreadable for now");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                }
            }
        };
        let command = line.trim();
        if !command.is_empty() {
            // What the operator did is on record (kicks and releases also log their effect).
            tracing::info!(command = %relay_proto::printable(command.as_bytes()), "console");
        }
        let reply = match command {
            "" => continue,
            cmd if cmd.eq_ignore_ascii_case("exit") => {
                let clients = server.online();
                output
                    .write_all(format!("shutting down; telling {clients} clients\n").as_bytes())
                    .await?;
                output.flush().await?;
                shutdown.cancel();
                return Ok(());
            }
            "list" | "users" => {
                let users = server.users();
                let mut text = format!("{} online\n", users.len());
                for (name, addr) in users {
                    text.push_str(&format!("{name} {addr}\n"));
                }
                text
            }
            "help" | "?" => format!("{HELP}\n"),
            "stats" => {
                let mut out = stats(&server.stats(), server.online());
                match server.cluster_connected() {
                    Some(true) => out.push_str("cluster: connected to NATS\n"),
                    Some(false) => out
                        .push_str("cluster: NATS unreachable; serving this node's clients only\n"),
                    None => {}
                }
                out
            }
            cmd if cmd.starts_with("who") => match argument(cmd, "who") {
                None => format!("usage: who NAME\n{HELP}\n"),
                Some(name) => match server.who(name) {
                    None => format!("{name} is not online\n"),
                    Some(who) => who_line(&who),
                },
            },
            cmd if cmd.starts_with("kick") => match argument(cmd, "kick") {
                None => format!("usage: kick NAME [REASON]\n{HELP}\n"),
                Some(rest) => {
                    let (name, reason) = match rest.split_once(char::is_whitespace) {
                        Some((name, reason)) => (name, reason.trim()),
                        None => (rest, ""),
                    };
                    let reason = if reason.is_empty() { "no reason given" } else { reason };
                    if server.kick(name, reason) {
                        tracing::info!(%name, %reason, "operator disconnected the user");
                        format!("disconnected {name} ({reason})\n")
                    } else {
                        format!("{name} is not online\n")
                    }
                }
            },
            "inboxes" => match server.inboxes().await {
                Ok(t) => format!(
                    "{} recipients, {} messages, {} bytes stored\n",
                    t.recipients, t.messages, t.bytes
                ),
                Err(e) => format!("cannot read the inboxes: {e}\n"),
            },
            cmd if cmd.starts_with("purge") => match argument(cmd, "purge") {
                None => format!("usage: purge NAME; {HELP}\n"),
                Some(name) => match server.purge(name).await {
                    Ok(count) => {
                        tracing::info!(%name, count, "operator purged the inbox");
                        format!("purged {count} messages stored for {name}\n")
                    }
                    Err(e) => format!("cannot purge {name}: {e}\n"),
                },
            },
            cmd if cmd.starts_with("release") => {
                if let Some(name) = argument(cmd, "release") {
                    match server.release(name).await {
                        Ok(Some(record)) => {
                            tracing::info!(name = %record.display, key = %record.key.fingerprint(),
                                "operator released the name");
                            format!("released {} (was bound to {})\n", record.display, record.key)
                        }
                        Ok(None) => format!("{name} is not bound to a key\n"),
                        Err(e) => format!("cannot release {name}: {e}\n"),
                    }
                } else {
                    format!("usage: release NAME; {HELP}\n")
                }
            }
            other => format!("unknown command '{other}'; {HELP}\n"),
        };
        output.write_all(reply.as_bytes()).await?;
        output.flush().await?;
    }
}
