//! The interactive client: commands read line by line, events printed one per line. Part of
//! the `relay-client` binary, not the library: programs embedding the library bring their own
//! interface.

use tokio::io::{AsyncBufRead, AsyncWrite, AsyncWriteExt};

use relay_client::{Client, Event, Events};

/// The help text for the interactive commands.
pub const HELP: &str = "commands:
  send <name|ip:port> <message>   send a message (the rest of the line, spaces kept)
  list [NAME]                     show who is online, with addresses (after NAME: the next page)
  help                            show this help
  EXIT                            go offline and quit (so does end of input)";

/// One line of input to the interactive client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `send <to> <message...>`
    Send {
        /// Destination name or `ip:port`.
        to: &'a str,
        /// Everything after the destination and one space, spaces kept.
        message: &'a str,
    },
    /// `list [NAME]`: the users online, or the page after NAME.
    List {
        /// The name to list after, for the next page of a long listing.
        after: Option<&'a str>,
    },
    /// `help`
    Help,
    /// `EXIT`
    Exit,
    /// A blank line.
    Empty,
    /// Anything else, with what to tell the user.
    Invalid(String),
}

/// Parses one input line.
pub fn parse_command(line: &str) -> Command<'_> {
    let line = line.trim_end_matches(['\r', '\n']).trim_start();
    let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    match word {
        "" => Command::Empty,
        "send" => {
            let rest = rest.trim_start();
            match rest.split_once(char::is_whitespace) {
                Some((to, message)) if !message.is_empty() => Command::Send { to, message },
                _ => Command::Invalid("usage: send <name|ip:port> <message>".into()),
            }
        }
        "list" => match rest.split_whitespace().collect::<Vec<_>>()[..] {
            [] => Command::List { after: None },
            [after] => Command::List { after: Some(after) },
            _ => Command::Invalid("usage: list [NAME]".into()),
        },
        "help" | "?" if rest.trim().is_empty() => Command::Help,
        w if w.eq_ignore_ascii_case("exit") && rest.trim().is_empty() => Command::Exit,
        other => Command::Invalid(format!("unknown command '{other}'; type help")),
    }
}

/// Message bytes made safe for a terminal: invalid UTF-8 replaced, control characters
/// (newlines, escape sequences) and format characters (bidi overrides, zero-width) shown
/// escaped, so a peer can neither forge lines, drive the terminal nor disguise text.
pub use relay_proto::printable;

/// How a connected stretch of an interactive session ended, when it did not fail.
#[derive(Debug)]
pub enum Ended {
    /// The user is done (`EXIT`, end of input).
    Done,
    /// The server shut down (the client exits 0, as the README promises).
    Shutdown,
    /// The connection was lost (the server vanished or restarted): worth reconnecting.
    Lost(String),
}

/// The end of a session: for a script (input not a terminal), an error if any command failed.
///
/// # Errors
/// How many commands failed, in a script.
pub fn finish(script: bool, failed: usize) -> Result<(), String> {
    match failed {
        // A script learns from the exit code whether every command went through.
        n if script && n > 0 => Err(format!("{n} command{} failed", if n == 1 { "" } else { "s" })),
        _ => Ok(()),
    }
}

/// One connected stretch of the interactive session: commands from `lines`, events to
/// `output`, failed commands counted in `failed`.
///
/// # Errors
/// The reason the server ended the session, as one line.
pub async fn run_connected<R, W>(
    client: Client,
    mut events: Events,
    lines: &mut tokio::io::Lines<R>,
    mut output: W,
    failed: &mut usize,
) -> Result<Ended, String>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Once the user is done: the listing asked for last, whose answer comes after the answers
    // to everything sent before it (the server holds it until then), and how long to wait.
    let mut last: Option<(u64, tokio::time::Instant)> = None;
    loop {
        let text = tokio::select! {
            line = lines.next_line(), if last.is_none() => match line {
                Ok(Some(line)) => match parse_command(&line) {
                    Command::Exit => match client.list_users().await {
                        Ok(id) => {
                            last = Some((id, tokio::time::Instant::now() + ANSWER_WAIT));
                            continue;
                        }
                        Err(_) => break,
                    },
                    Command::Empty => continue,
                    Command::Help => format!("{HELP}\n"),
                    Command::Invalid(message) => {
                        *failed += 1;
                        format!("{message}\n")
                    }
                    Command::List { after } => {
                        let asked = match after {
                            None => client.list_users().await,
                            Some(after) => client.list_users_after(after).await,
                        };
                        match asked {
                            Ok(_) => continue,
                            Err(e) => {
                                *failed += 1;
                                format!("{e}\n")
                            }
                        }
                    }
                    Command::Send { to, message } => {
                        match client.send(to, message.as_bytes().to_vec()).await {
                            Ok(_) => continue,
                            Err(e) => {
                                *failed += 1;
                                format!("{e}\n")
                            }
                        }
                    }
                },
                // End of input (or unreadable input) means the user is done: as EXIT.
                Ok(None) | Err(_) => match client.list_users().await {
                    Ok(id) => {
                        last = Some((id, tokio::time::Instant::now() + ANSWER_WAIT));
                        continue;
                    }
                    Err(_) => break,
                },
            },
            () = until(last.map(|(_, at)| at)), if last.is_some() => {
                write_line(&mut output, "! some answers did not come in time\n").await;
                *failed += 1;
                break;
            }
            event = events.next() => match event {
                // The last listing answered (or refused as one too many: an answer all the
                // same, and it too comes after the ones before it).
                Some(Event::Users { id, .. } | Event::Rejected { id, .. })
                    if last.is_some_and(|(last, _)| last == id) =>
                {
                    break
                }
                Some(Event::Message { from, content, time, .. }) => {
                    message_line(&from, &content, time)
                }
                Some(Event::NotFound { to, .. }) => {
                    *failed += 1;
                    format!("! {}: not found\n", safe(&to))
                }
                Some(Event::Stored { to, .. }) => {
                    format!("~ stored for {} (offline; delivered when they log in)\n", safe(&to))
                }
                Some(Event::Delivered { to, ids, .. }) => match ids.len() {
                    1 => format!("~ delivered to {}\n", safe(&to)),
                    n => format!("~ delivered to {} ({n} messages)\n", safe(&to)),
                },
                Some(Event::Rejected { to, status, detail, .. }) => {
                    *failed += 1;
                    format!("! {}: {status} ({})\n", safe(&to), safe(&detail))
                }
                Some(Event::Users { users, next, .. }) => {
                    let mut text = String::new();
                    for user in users {
                        text.push_str(&format!("{} {}\n", safe(&user.name), safe(&user.addr)));
                    }
                    if let Some(next) = next {
                        text.push_str(&format!("(more: list {} shows the next page)\n", safe(&next)));
                    }
                    text
                }
                Some(Event::ServerShutdown { .. }) => {
                    write_line(&mut output, "server is shutting down\n").await;
                    return Ok(Ended::Shutdown);
                }
                // Closed by the server for a reason: final. Lost: worth reconnecting.
                closed @ Some(Event::Closed { .. }) => {
                    return Err(ended_by(closed.as_ref()).unwrap_or_default());
                }
                lost @ (Some(Event::Disconnected { .. }) | None) => {
                    return Ok(Ended::Lost(ended_by(lost.as_ref()).unwrap_or_default()));
                }
                // Kinds of event this version of the client does not show.
                Some(_) => continue,
            },
        };
        write_line(&mut output, &text).await;
    }
    client.offline().await.map_err(|e| format!("going offline failed: {e}"))?;
    // Print whatever arrived before the server closed the session.
    while let Some(event) = events.try_next() {
        if let Event::Message { from, content, time, .. } = event {
            write_line(&mut output, &message_line(&from, &content, time)).await;
        }
    }
    Ok(Ended::Done)
}

/// `relay-client send TO MESSAGE`: sends it, waits for its answer (bounded by
/// [`ANSWER_WAIT`]) and goes offline. A message delivered live has no answer: the answer to a
/// listing asked for after it, which the server gives only once everything before it has been
/// answered, says nothing more is coming.
///
/// # Errors
/// What became of the message if it was not delivered or stored, as one line.
pub async fn send_once(
    client: Client,
    mut events: Events,
    to: &str,
    message: &str,
) -> Result<(), String> {
    let id = client.send(to, message.as_bytes().to_vec()).await.map_err(|e| e.to_string())?;
    let last = client.list_users().await.map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    let mut failure = None;
    loop {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| "no answer from the server in time".to_string())?;
        match event {
            Some(Event::NotFound { id: about, to, .. }) if about == id => {
                failure = Some(format!("{}: not found", safe(&to)));
            }
            Some(Event::Rejected { id: about, to, status, detail, .. }) if about == id => {
                failure = Some(format!("{}: {status} ({})", safe(&to), safe(&detail)));
            }
            Some(Event::Users { id: about, .. } | Event::Rejected { id: about, .. })
                if about == last =>
            {
                break;
            }
            Some(Event::ServerShutdown { .. }) => return Err("the server is shutting down".into()),
            other => {
                if let Some(why) = ended_by(other.as_ref()) {
                    return Err(why);
                }
            }
        }
    }
    client.offline().await.map_err(|e| format!("going offline failed: {e}"))?;
    failure.map_or(Ok(()), Err)
}

/// `relay-client list`: prints every page of the users online, one `name address` line each.
///
/// # Errors
/// A lost connection or a refused listing, as one line.
pub async fn list_once(client: Client, mut events: Events) -> Result<(), String> {
    let mut out = tokio::io::stdout();
    let mut after: Option<String> = None;
    loop {
        let asked = match &after {
            None => client.list_users().await,
            Some(name) => client.list_users_after(name).await,
        };
        let asked = asked.map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
        let next = loop {
            let event = tokio::time::timeout_at(deadline, events.next())
                .await
                .map_err(|_| "no answer from the server in time".to_string())?;
            match event {
                Some(Event::Users { id, users, next }) if id == asked => {
                    let mut text = String::new();
                    for user in users {
                        text.push_str(&format!("{} {}\n", safe(&user.name), safe(&user.addr)));
                    }
                    write_line(&mut out, &text).await;
                    break next;
                }
                Some(Event::Rejected { id, status, detail, .. }) if id == asked => {
                    return Err(format!("the listing was refused: {status} ({})", safe(&detail)));
                }
                Some(Event::ServerShutdown { .. }) => {
                    return Err("the server is shutting down".into());
                }
                other => {
                    if let Some(why) = ended_by(other.as_ref()) {
                        return Err(why);
                    }
                }
            }
        };
        match next {
            Some(name) => after = Some(name),
            None => break,
        }
    }
    client.offline().await.map_err(|e| format!("going offline failed: {e}"))
}

/// `relay-client listen`: prints each message received, one line each (as the interactive
/// client shows it, or one JSON object), until Ctrl-C (then it goes offline) or the server
/// shuts down.
///
/// # Errors
/// A lost connection, as one line.
pub async fn listen(client: Client, mut events: Events, json: bool) -> Result<(), String> {
    let mut out = tokio::io::stdout();
    let me = client.name().to_string();
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = tokio::signal::ctrl_c() => break,
        };
        match event {
            Some(Event::Message { from, content, time, .. }) => {
                let line = if json {
                    format!(
                        "{{\"from\":{},\"to\":{},\"time\":{time},\"content\":{}}}\n",
                        json_string(&from),
                        json_string(&me),
                        json_string(&String::from_utf8_lossy(&content)),
                    )
                } else {
                    message_line(&from, &content, time)
                };
                write_line(&mut out, &line).await;
            }
            Some(Event::ServerShutdown { .. }) => return Ok(()),
            other => {
                if let Some(why) = ended_by(other.as_ref()) {
                    return Err(why);
                }
            }
        }
    }
    client.offline().await.map_err(|e| format!("going offline failed: {e}"))
}

/// `text` as a JSON string: quoted, with quotes, backslashes and control characters escaped
/// (and U+2028/2029, which some JSON readers take for line ends).
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The line for an event that ends the connection (closed by the server, or lost; `None` is
/// the end of the events), or `None` if it does not.
fn ended_by(event: Option<&Event>) -> Option<String> {
    match event {
        Some(Event::Closed { status, detail }) => {
            Some(format!("disconnected by the server: {status} ({})", safe(detail)))
        }
        Some(Event::Disconnected { reason }) => {
            Some(format!("connection to the server lost: {}", safe(reason)))
        }
        None => Some("connection to the server lost".into()),
        Some(_) => None,
    }
}

/// How long the client waits, once the user is done, for the answers still due.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sleeps until `at` (forever if `None`, which the caller's guard rules out).
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How a received message is shown: `<from>: <content>`, both made safe for a terminal; one
/// sent a while ago (it waited in the inbox) shows when: `<from> (sent <UTC time>): <content>`.
fn message_line(from: &str, content: &[u8], time: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    if time != 0 && now.saturating_sub(time) > 10_000 {
        return format!("{} (sent {}): {}\n", safe(from), utc(time), printable(content));
    }
    format!("{}: {}\n", safe(from), printable(content))
}

/// `YYYY-MM-DD HH:MM:SS UTC` for a time in ms since the Unix epoch.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm, for dates after 1970).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn utc_times_read_as_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(1_796_036_114_000), "2026-11-30 10:55:14 UTC");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}

/// Text from the server made safe for a terminal (see [`printable`]).
fn safe(text: &str) -> String {
    printable(text.as_bytes())
}

async fn write_line<W: AsyncWrite + Unpin>(output: &mut W, text: &str) {
    // A closed stdout (the user piped us into `head`) is not worth failing over.
    let _ = output.write_all(text.as_bytes()).await;
    let _ = output.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("plain"), "\"plain\"");
        assert_eq!(json_string("a\"b\\c\nd\u{1b}e\u{2028}"), "\"a\\\"b\\\\c\\nd\\u001be\\u2028\"");
    }

    #[test]
    fn commands() {
        assert_eq!(
            parse_command("send bob hello  world "),
            Command::Send { to: "bob", message: "hello  world " }
        );
        assert_eq!(
            parse_command("  send   127.0.0.1:5000  two spaces\r\n"),
            Command::Send { to: "127.0.0.1:5000", message: " two spaces" }
        );
        assert!(matches!(parse_command("send bob"), Command::Invalid(_)));
        assert!(matches!(parse_command("send bob "), Command::Invalid(_)));
        assert!(matches!(parse_command("send"), Command::Invalid(_)));
        assert_eq!(parse_command("list"), Command::List { after: None });
        assert_eq!(parse_command("list  bob "), Command::List { after: Some("bob") });
        assert!(matches!(parse_command("list a b"), Command::Invalid(_)));
        assert_eq!(parse_command("help"), Command::Help);
        assert_eq!(parse_command("EXIT"), Command::Exit);
        assert_eq!(parse_command("exit"), Command::Exit);
        assert_eq!(parse_command("   "), Command::Empty);
        assert!(matches!(parse_command("sned bob hi"), Command::Invalid(m) if m.contains("sned")));
    }

    #[test]
    fn printable_escapes_control_and_format_characters() {
        assert_eq!(printable(b"hello"), "hello");
        assert_eq!(printable(b"a\nb"), "a\\nb");
        assert_eq!(printable(b"\x1b[2J"), "\\u{1b}[2J");
        assert_eq!(printable(b"\xff ok"), "\u{fffd} ok");
        // A right-to-left override would show this as `invoiceexe.jpg`.
        assert_eq!(printable("invoice\u{202e}gpj.exe".as_bytes()), "invoice\\u{202e}gpj.exe");
    }
}
