//! The session's commands and output: lines of input turned into [`Command`]s (with the
//! current conversation's peer), events shown one per line. Part of the `relay-client`
//! binary, not the library: programs embedding the library bring their own interface.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

use relay_client::{Client, Event, Events};

/// The help text for the interactive commands.
pub const HELP: &str = "commands:
  /msg NAME [MESSAGE]             talk to NAME: sends MESSAGE, and every plain line after it
                                  goes to NAME too (the prompt shows who); /msg alone stops
  send NAME MESSAGE               send one message (NAME may be an address as list shows it)
  list [NAME]                     show who is online (after NAME: the next page)
  help                            show this help
  EXIT                            go offline and quit (so do Ctrl-D and Ctrl-C)
In a conversation every line not starting with / is a message (//x sends /x); the commands
are then /send, /list, /help and /exit (or /quit), and EXIT still quits.";

/// What one line of input asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Send `message` (spaces kept) to `to`, a name or `ip:port`.
    Send {
        /// Destination name or `ip:port`.
        to: String,
        /// The message.
        message: String,
    },
    /// `list [NAME]`: the users online, or the page after NAME.
    List {
        /// The name to list after, for the next page of a long listing.
        after: Option<String>,
    },
    /// `help`
    Help,
    /// `EXIT`, end of input, Ctrl-D or Ctrl-C.
    Exit,
    /// A blank line.
    Empty,
    /// Something to tell the user that needs no server (the peer changed).
    Notice(String),
    /// A line that is not a command, with what to tell the user.
    Invalid(String),
}

/// The state that turns lines into commands: who plain lines go to.
#[derive(Debug, Default)]
pub struct Conversation {
    peer: Option<String>,
}

impl Conversation {
    /// Who plain lines go to, if anyone.
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    /// Parses one line of input (and `/msg` changes the peer).
    pub fn command(&mut self, line: &str) -> Command {
        let line = line.trim_end_matches(['\r', '\n']);
        let trimmed = line.trim_start();
        if trimmed.is_empty() {
            return Command::Empty;
        }
        if let Some(rest) = trimmed.strip_prefix('/') {
            if rest.starts_with('/') {
                return self.to_peer(rest);
            }
            let (word, args) = split_word(rest);
            return match word.to_ascii_lowercase().as_str() {
                "msg" | "m" | "query" => self.msg(args),
                "send" => send(args),
                "list" => list(args),
                "help" if args.trim().is_empty() => Command::Help,
                "exit" | "quit" if args.trim().is_empty() => Command::Exit,
                _ => Command::Invalid(format!(
                    "unknown command '/{}'; type /help",
                    printable(word.as_bytes())
                )),
            };
        }
        if trimmed == "EXIT" {
            return Command::Exit;
        }
        if self.peer.is_some() {
            // In a conversation a plain line is a message, exactly as typed.
            return self.to_peer(line);
        }
        let (word, args) = split_word(trimmed);
        match word {
            "send" => send(args),
            "list" => list(args),
            "help" | "?" if args.trim().is_empty() => Command::Help,
            w if w.eq_ignore_ascii_case("exit") && args.trim().is_empty() => Command::Exit,
            other => Command::Invalid(format!(
                "unknown command '{}'; type help (or /msg NAME to start a conversation)",
                printable(other.as_bytes())
            )),
        }
    }

    fn to_peer(&self, message: &str) -> Command {
        match &self.peer {
            Some(peer) => Command::Send { to: peer.clone(), message: message.to_string() },
            None => Command::Invalid("nobody to send to: /msg NAME first, or type help".into()),
        }
    }

    fn msg(&mut self, args: &str) -> Command {
        let (to, message) = split_word(args.trim_start());
        if to.is_empty() {
            self.peer = None;
            return Command::Notice("conversation ended: plain lines are commands again".into());
        }
        if let Err(e) = relay_client::name_key(to)
            && to.parse::<std::net::SocketAddr>().is_err()
        {
            return Command::Invalid(format!("cannot talk to '{}': {e}", printable(to.as_bytes())));
        }
        self.peer = Some(to.to_string());
        if message.is_empty() {
            return Command::Notice(format!(
                "talking to {}: plain lines go to them (/msg alone to stop)",
                printable(to.as_bytes())
            ));
        }
        Command::Send { to: to.to_string(), message: message.to_string() }
    }
}

/// The first word of `text` and the rest after the one whitespace character that ends it.
fn split_word(text: &str) -> (&str, &str) {
    match text.find(char::is_whitespace) {
        Some(at) => {
            let rest = &text[at..];
            let skip = rest.chars().next().map_or(0, char::len_utf8);
            (&text[..at], &rest[skip..])
        }
        None => (text, ""),
    }
}

/// `send NAME MESSAGE`, after the word.
fn send(args: &str) -> Command {
    match split_word(args.trim_start()) {
        (to, message) if !to.is_empty() && !message.is_empty() => {
            Command::Send { to: to.to_string(), message: message.to_string() }
        }
        _ => Command::Invalid("usage: send <name|ip:port> <message>".into()),
    }
}

/// `list [NAME]`, after the word.
fn list(args: &str) -> Command {
    match args.split_whitespace().collect::<Vec<_>>()[..] {
        [] => Command::List { after: None },
        [after] => Command::List { after: Some(after.to_string()) },
        _ => Command::Invalid("usage: list [NAME]".into()),
    }
}

/// Message bytes made safe for a terminal: invalid UTF-8 replaced, control characters
/// (newlines, escape sequences) and format characters (bidi overrides, zero-width) shown
/// escaped, so a peer can neither forge lines, drive the terminal nor disguise text.
pub use relay_proto::printable;

/// The names online, for Tab completion: refreshed from listings the session asks for
/// itself (when a completion wants them, at most every [`Names::REFRESH`]) and from senders.
#[derive(Debug, Default)]
pub struct Names {
    names: Mutex<Vec<String>>,
    /// Woken by the completer: the session then refreshes the list.
    pub wanted: Notify,
}

impl Names {
    /// The shortest time between two listings asked for to refresh the names.
    pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

    /// The names known, sorted.
    pub fn snapshot(&self) -> Vec<String> {
        self.names.lock().map(|names| names.clone()).unwrap_or_default()
    }

    pub(crate) fn replace(&self, names: Vec<String>) {
        if let Ok(mut known) = self.names.lock() {
            *known = names;
            known.sort();
        }
    }

    fn add(&self, name: &str) {
        if let Ok(mut known) = self.names.lock()
            && let Err(at) = known.binary_search_by(|n| n.as_str().cmp(name))
        {
            known.insert(at, name.to_string());
        }
    }
}

/// Where the session's lines go, and how they look.
pub struct Output {
    sink: Sink,
    /// Colour escapes (a terminal, and `NO_COLOR` not set).
    colour: bool,
    /// The interactive look: timestamps, receipts with marks.
    chat: bool,
}

enum Sink {
    /// Messages and listings on stdout, notices and errors on stderr (a script reads stdout).
    Std,
    /// Everything to the terminal's printer, which shows it above the line being typed.
    Printer(mpsc::Sender<String>),
}

/// Colours, as SGR parameters.
const DIM: &str = "2";
const NAME: &str = "1;36";
const ME: &str = "32";
const ERROR: &str = "31";
const NOTICE: &str = "33";

impl Output {
    /// For scripts: plain lines, stdout for messages and listings, stderr for the rest.
    pub fn script() -> Output {
        Output { sink: Sink::Std, colour: false, chat: false }
    }

    /// For the interactive terminal: everything through `printer`, with timestamps.
    pub fn terminal(printer: mpsc::Sender<String>, colour: bool) -> Output {
        Output { sink: Sink::Printer(printer), colour, chat: true }
    }

    fn paint(&self, style: &str, text: &str) -> String {
        if self.colour { format!("\x1b[{style}m{text}\x1b[0m") } else { text.to_string() }
    }

    /// `HH:MM:SS ` (with the date if not today), local time, for the interactive look.
    fn stamp(&self, ms: u64) -> String {
        if !self.chat {
            return String::new();
        }
        format!("{} ", self.paint(DIM, &local_time(ms)))
    }

    /// A message or a listing: stdout for a script.
    pub async fn out(&mut self, text: &str) {
        match &self.sink {
            Sink::Std => write_line(&mut tokio::io::stdout(), text).await,
            Sink::Printer(printer) => {
                let _ = printer.send(text.to_string()).await;
            }
        }
    }

    /// A notice or an error: stderr for a script.
    pub async fn note(&mut self, text: &str) {
        match &self.sink {
            Sink::Std => write_line(&mut tokio::io::stderr(), text).await,
            Sink::Printer(printer) => {
                let _ = printer.send(text.to_string()).await;
            }
        }
    }

    /// A notice line: `~ text` (timestamped on a terminal).
    pub async fn notice(&mut self, text: &str) {
        let line =
            format!("{}{}\n", self.stamp(now_ms()), self.paint(NOTICE, &format!("~ {text}")));
        self.note(&line).await;
    }

    /// An error line: `! text`.
    pub async fn error(&mut self, text: &str) {
        let line = format!("{}{}\n", self.stamp(now_ms()), self.paint(ERROR, &format!("! {text}")));
        self.note(&line).await;
    }

    /// How a received message is shown. In a script: `<from>: <content>`, and one sent a while
    /// ago (it waited in the inbox) as `<from> (sent <UTC time>): <content>`. On a terminal:
    /// `<local time> <from>: <content>`. Both made safe for a terminal.
    fn message(&self, from: &str, content: &[u8], time: u64) -> String {
        if self.chat {
            let time = if time == 0 { now_ms() } else { time };
            return format!(
                "{}{}: {}\n",
                self.stamp(time),
                self.paint(NAME, &safe(from)),
                printable(content)
            );
        }
        message_line(from, content, time)
    }

    /// A receipt: `✓ delivered to <to>` on a terminal, `~ delivered to <to>` in a script.
    fn delivered(&self, to: &str, count: usize, time: u64) -> String {
        let what = match count {
            1 => format!("delivered to {}", safe(to)),
            n => format!("delivered to {} ({n} messages)", safe(to)),
        };
        if self.chat {
            format!("{}{} {what}\n", self.stamp(time), self.paint(ME, "✓"))
        } else {
            format!("~ {what}\n")
        }
    }
}

/// `HH:MM:SS` in local time, with the date before it for another day than today.
pub(crate) fn local_time(ms: u64) -> String {
    use chrono::TimeZone;
    let Some(at) =
        i64::try_from(ms).ok().and_then(|ms| chrono::Local.timestamp_millis_opt(ms).single())
    else {
        return utc(ms);
    };
    if at.date_naive() == chrono::Local::now().date_naive() {
        at.format("%H:%M:%S").to_string()
    } else {
        at.format("%Y-%m-%d %H:%M:%S").to_string()
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

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

/// What a session reads from and writes to, across reconnects.
pub struct Io {
    /// Commands, from the terminal or from stdin.
    pub commands: mpsc::Receiver<Command>,
    /// Where lines go.
    pub output: Output,
    /// Commands that failed so far.
    pub failed: usize,
    /// The names for completion (interactive only).
    pub names: Option<Arc<Names>>,
}

/// One connected stretch of the session: commands from `io`, events to it.
///
/// # Errors
/// The reason the server ended the session, as one line.
pub async fn run_connected(
    client: Client,
    mut events: Events,
    io: &mut Io,
) -> Result<Ended, String> {
    // Once the user is done: the listing asked for last, whose answer comes after the answers
    // to everything sent before it (the server holds it until then), and how long to wait.
    let mut last: Option<(u64, tokio::time::Instant)> = None;
    // A listing asked for to refresh the names for completion (not shown), and when.
    let mut refresh: Option<u64> = None;
    let mut refreshed: Option<tokio::time::Instant> = None;
    let mut due: Option<tokio::time::Instant> = None;
    if io.names.is_some() {
        refresh = client.list_users().await.ok();
        refreshed = Some(tokio::time::Instant::now());
    }
    let names = io.names.clone();
    loop {
        tokio::select! {
            command = io.commands.recv(), if last.is_none() => {
                // No more commands (the input is gone) means the user is done: as EXIT.
                let command = command.unwrap_or(Command::Exit);
                match command {
                    Command::Exit => match client.list_users().await {
                        Ok(id) => last = Some((id, tokio::time::Instant::now() + ANSWER_WAIT)),
                        Err(_) => break,
                    },
                    Command::Empty => {}
                    Command::Help => io.output.note(&format!("{HELP}\n")).await,
                    Command::Notice(text) => io.output.notice(&text).await,
                    Command::Invalid(message) => {
                        io.failed += 1;
                        io.output.error(&message).await;
                    }
                    Command::List { after } => {
                        let asked = match after {
                            None => client.list_users().await,
                            Some(after) => client.list_users_after(&after).await,
                        };
                        if let Err(e) = asked {
                            io.failed += 1;
                            io.output.error(&e.to_string()).await;
                        }
                    }
                    Command::Send { to, message } => {
                        // On a terminal the line typed, redrawn with the time, is the echo.
                        if let Err(e) = client.send(&to, message.into_bytes()).await {
                            io.failed += 1;
                            io.output.error(&e.to_string()).await;
                        }
                    }
                }
            }
            // A completion wants fresh names: asked for now, or once the last listing is
            // old enough (listings cost the server; it limits them).
            () = wanted(names.as_deref()), if due.is_none() && last.is_none() => {
                due = Some(refreshed.map_or_else(tokio::time::Instant::now, |at| at + Names::REFRESH));
            }
            () = until(due), if due.is_some() && refresh.is_none() && last.is_none() => {
                due = None;
                refresh = client.list_users().await.ok();
                refreshed = Some(tokio::time::Instant::now());
            }
            () = until(last.map(|(_, at)| at)), if last.is_some() => {
                io.output.error("some answers did not come in time").await;
                io.failed += 1;
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
                // The session's own listing: names for completion, not shown.
                Some(Event::Users { id, users, .. }) if refresh == Some(id) => {
                    refresh = None;
                    if let Some(names) = &names {
                        names.replace(users.into_iter().map(|u| u.name).collect());
                    }
                }
                Some(Event::Rejected { id, .. }) if refresh == Some(id) => refresh = None,
                Some(Event::Message { from, content, time, .. }) => {
                    if let Some(names) = &names {
                        names.add(&from);
                    }
                    let line = io.output.message(&from, &content, time);
                    io.output.out(&line).await;
                }
                Some(Event::NotFound { to, .. }) => {
                    io.failed += 1;
                    io.output.error(&format!("{}: not found", safe(&to))).await;
                }
                Some(Event::Stored { to, .. }) => {
                    let text = format!("stored for {} (offline; delivered when they log in)", safe(&to));
                    io.output.notice(&text).await;
                }
                Some(Event::Delivered { to, ids, time, .. }) => {
                    let line = io.output.delivered(&to, ids.len(), time);
                    io.output.note(&line).await;
                }
                Some(Event::Rejected { to, status, detail, .. }) => {
                    io.failed += 1;
                    io.output.error(&format!("{}: {status} ({})", safe(&to), safe(&detail))).await;
                }
                Some(Event::Users { users, next, .. }) => {
                    let mut text = String::new();
                    for user in users {
                        text.push_str(&format!("{} {}\n", safe(&user.name), safe(&user.addr)));
                    }
                    if let Some(next) = next {
                        text.push_str(&format!("(more: list {} shows the next page)\n", safe(&next)));
                    }
                    io.output.out(&text).await;
                }
                Some(Event::ServerShutdown { .. }) => {
                    io.output.notice("server is shutting down").await;
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
                Some(_) => {}
            },
        }
    }
    client.offline().await.map_err(|e| format!("going offline failed: {e}"))?;
    // Print whatever arrived before the server closed the session.
    while let Some(event) = events.try_next() {
        if let Event::Message { from, content, time, .. } = event {
            let line = io.output.message(&from, &content, time);
            io.output.out(&line).await;
        }
    }
    Ok(Ended::Done)
}

/// Waits until a completion wants the names refreshed (forever without completion).
async fn wanted(names: Option<&Names>) {
    match names {
        Some(names) => names.wanted.notified().await,
        None => std::future::pending().await,
    }
}

/// `relay-client send TO MESSAGE`: sends it, waits for its answer (bounded by
/// [`ANSWER_WAIT`]) and goes offline. A message delivered live has no answer: the answer to a
/// listing asked for after it, which the server gives only once everything before it has been
/// answered, says nothing more is coming. With `receipt`, it then waits that long for the
/// message's `Delivered` receipt.
///
/// # Errors
/// What became of the message if it was not delivered or stored (or, with `receipt`, not
/// taken by the receiver in time), as one line.
pub async fn send_once(
    client: Client,
    mut events: Events,
    to: &str,
    message: &str,
    receipt: Option<std::time::Duration>,
) -> Result<(), String> {
    let id = client.send(to, message.as_bytes().to_vec()).await.map_err(|e| e.to_string())?;
    let last = client.list_users().await.map_err(|e| e.to_string())?;
    let mut deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    let mut failure = None;
    // Answered: the listing after the message came back. Delivered: its receipt came.
    let (mut answered, mut delivered) = (false, false);
    while !answered || (receipt.is_some() && !delivered && failure.is_none()) {
        let Ok(event) = tokio::time::timeout_at(deadline, events.next()).await else {
            if answered {
                let wait = receipt.unwrap_or_default();
                failure = Some(format!("{}: no receipt within {wait:?}", safe(to)));
                break;
            }
            return Err("no answer from the server in time".into());
        };
        match event {
            Some(Event::NotFound { id: about, to, .. }) if about == id => {
                failure = Some(format!("{}: not found", safe(&to)));
            }
            Some(Event::Rejected { id: about, to, status, detail, .. }) if about == id => {
                failure = Some(format!("{}: {status} ({})", safe(&to), safe(&detail)));
            }
            Some(Event::Delivered { ids, .. }) if ids.contains(&id) => delivered = true,
            Some(Event::Users { id: about, .. } | Event::Rejected { id: about, .. })
                if about == last =>
            {
                answered = true;
                if let Some(wait) = receipt {
                    deadline = tokio::time::Instant::now() + wait;
                }
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
    // One listener for the whole session: a Ctrl-C that comes while a message is being
    // printed is not lost.
    let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let event = tokio::select! {
            // First, so that it is listening before the first message is handled.
            biased;
            _ = &mut interrupted => break,
            event = events.next() => event,
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
    if time != 0 && now_ms().saturating_sub(time) > 10_000 {
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

    fn send(to: &str, message: &str) -> Command {
        Command::Send { to: to.into(), message: message.into() }
    }

    #[test]
    fn commands() {
        let mut c = Conversation::default();
        assert_eq!(c.command("send bob hello  world "), send("bob", "hello  world "));
        assert_eq!(
            c.command("  send   127.0.0.1:5000  two spaces\r\n"),
            send("127.0.0.1:5000", " two spaces")
        );
        assert!(matches!(c.command("send bob"), Command::Invalid(_)));
        assert!(matches!(c.command("send bob "), Command::Invalid(_)));
        assert!(matches!(c.command("send"), Command::Invalid(_)));
        assert_eq!(c.command("list"), Command::List { after: None });
        assert_eq!(c.command("list  bob "), Command::List { after: Some("bob".into()) });
        assert!(matches!(c.command("list a b"), Command::Invalid(_)));
        assert_eq!(c.command("help"), Command::Help);
        assert_eq!(c.command("EXIT"), Command::Exit);
        assert_eq!(c.command("exit"), Command::Exit);
        assert_eq!(c.command("/quit"), Command::Exit);
        assert_eq!(c.command("   "), Command::Empty);
        assert!(matches!(c.command("sned bob hi"), Command::Invalid(m) if m.contains("sned")));
        // Without a peer a plain line is not a message.
        assert!(matches!(c.command("//hello"), Command::Invalid(_)));
        assert_eq!(c.peer(), None);
    }

    #[test]
    fn a_conversation_sends_plain_lines_to_its_peer() {
        let mut c = Conversation::default();
        assert_eq!(c.command("/msg bob hi there"), send("bob", "hi there"));
        assert_eq!(c.peer(), Some("bob"));
        // Exactly as typed, leading spaces and words that are commands elsewhere included.
        assert_eq!(c.command("  send me the file"), send("bob", "  send me the file"));
        assert_eq!(c.command("list"), send("bob", "list"));
        assert_eq!(c.command("//etc"), send("bob", "/etc"));
        // Slash commands still work, and EXIT still quits.
        assert_eq!(c.command("/send alice hello"), send("alice", "hello"));
        assert_eq!(c.command("/LIST"), Command::List { after: None });
        assert_eq!(c.command("/help"), Command::Help);
        assert_eq!(c.command("EXIT"), Command::Exit);
        assert!(matches!(c.command("/frob"), Command::Invalid(m) if m.contains("/frob")));
        // /msg NAME alone switches; /msg alone ends the conversation.
        assert!(matches!(c.command("/msg carol"), Command::Notice(_)));
        assert_eq!(c.peer(), Some("carol"));
        assert_eq!(c.command("hi"), send("carol", "hi"));
        assert!(matches!(c.command("/msg bad\u{7}name"), Command::Invalid(_)));
        assert_eq!(c.peer(), Some("carol"), "an invalid name leaves the peer as it was");
        assert!(matches!(c.command("/msg"), Command::Notice(_)));
        assert_eq!(c.peer(), None);
        assert!(matches!(c.command("hi"), Command::Invalid(_)));
        // An address is a peer too.
        assert_eq!(c.command("/m 127.0.0.1:5000 yo"), send("127.0.0.1:5000", "yo"));
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
