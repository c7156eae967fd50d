//! The operator console: commands typed on the server's standard input.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::server::ServerHandle;

const HELP: &str = "commands: EXIT (tell every client to shut down, then stop), \
                    list (users online), release NAME (unbind a name from its key, for a \
                    user who lost it), inboxes (messages stored for offline users), \
                    purge NAME (delete the messages stored for NAME), help";

/// The argument of `cmd` if it is `command` followed by whitespace and a name.
fn argument<'a>(cmd: &'a str, command: &str) -> Option<&'a str> {
    let rest = cmd.strip_prefix(command)?;
    let name = rest.trim();
    (rest.starts_with(char::is_whitespace) && !name.is_empty()).then_some(name)
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
        let reply = match line.trim() {
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
