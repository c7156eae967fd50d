//! The interactive client in a real pseudo-terminal: keys typed as a person types them, the
//! screen read back through a terminal emulator (vt100), the terminal's settings compared
//! before and after (`stty -g`). The server is the real binary.

// Test helpers fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::binary;
use expectrl::{Session, WaitStatus};

const WAIT: Duration = Duration::from_secs(30);
const ROWS: u16 = 24;
const COLS: u16 = 80;

/// A command run in `dir`, with keys and history kept there.
fn command(name: &str, dir: &Path) -> Command {
    let mut command = Command::new(binary(name));
    command
        .current_dir(dir)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("XDG_STATE_HOME", dir.join("state"))
        .env("TERM", "xterm")
        .env_remove("RELAY_KEY")
        .env_remove("RELAY_USER")
        .env_remove("RELAY_SERVER")
        .env_remove("RELAY_HISTORY")
        .env_remove("NO_COLOR");
    command
}

/// A process with piped streams whose output lines arrive on a channel.
struct Piped {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Piped {
    /// Starts `command`; `stderr` picks the stream to read (else stdout).
    fn start(mut command: Command, stderr: bool) -> Piped {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let out: Box<dyn std::io::Read + Send> = match stderr {
            true => Box::new(child.stderr.take().unwrap()),
            false => Box::new(child.stdout.take().unwrap()),
        };
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Piped { child, stdin, lines, seen: Vec::new() }
    }

    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        while let Ok(line) =
            self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
        panic!("no line containing {needle:?}; saw {:#?}", self.seen);
    }

    fn type_line(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn wait(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real server on a port of its own (`port` 0: any), data in `dir`; its address.
fn start_server(dir: &Path, port: u16) -> (Piped, String) {
    let mut command = command("relay-server", dir);
    command.args(["--host", "127.0.0.1", "--port", &port.to_string()]).env("RUST_LOG", "info");
    let mut server = Piped::start(command, true);
    let line = server.expect("listening on");
    let addr = line.rsplit("listening on ").next().unwrap().trim().to_string();
    (server, addr)
}

/// `relay-client listen` as `name`: its stdout has one line per message received.
fn listener(dir: &Path, addr: &str, name: &str, server: &mut Piped) -> Piped {
    let mut command = command("relay-client", dir);
    command.args(["--server", addr, "--user", name, "listen"]);
    let listener = Piped::start(command, false);
    server.expect(&format!("name={name}"));
    listener
}

/// A program in a pseudo-terminal, and the screen it has drawn. A thread reads what the
/// program writes as a terminal does, all the time, and answers its cursor position queries
/// (reedline asks where the prompt is, and waits for the answer).
struct Term {
    session: Session,
    screen: Arc<Mutex<vt100::Parser>>,
}

impl Term {
    fn spawn(command: Command) -> Term {
        let session = Session::spawn(command).unwrap();
        let screen = Arc::new(Mutex::new(vt100::Parser::new(ROWS, COLS, 0)));
        let mut reader = session.get_process().get_raw_handle().unwrap();
        let mut writer = reader.try_clone().unwrap();
        let parser = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0; 4096];
            // The last bytes read, for a query split between two reads.
            let mut tail = Vec::new();
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        let mut parser = parser.lock().unwrap();
                        parser.process(&buf[..n]);
                        let mut seen = std::mem::take(&mut tail);
                        seen.extend_from_slice(&buf[..n]);
                        for _ in seen.windows(4).filter(|w| w == b"\x1b[6n") {
                            let (row, col) = parser.screen().cursor_position();
                            // In one write, as a terminal answers: keys typed meanwhile
                            // must not land inside the answer.
                            let answer = format!("\x1b[{};{}R", row + 1, col + 1);
                            let _ = writer.write_all(answer.as_bytes());
                        }
                        tail = seen[seen.len().saturating_sub(3)..].to_vec();
                    }
                    // The session may have made the descriptor non-blocking.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // The program exited: its side of the terminal is closed.
                    Err(_) => return,
                }
            }
        });
        Term { session, screen }
    }

    fn send(&mut self, keys: &str) {
        self.session.send(keys).unwrap();
    }

    /// The screen's rows, and the cursor's row.
    fn rows(&self) -> (Vec<String>, usize) {
        let parser = self.screen.lock().unwrap();
        let screen = parser.screen();
        (screen.rows(0, COLS).collect(), usize::from(screen.cursor_position().0))
    }

    /// Waits until `check` holds for the screen's rows and the cursor's row.
    fn until(&mut self, what: &str, check: impl Fn(&[String], usize) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (rows, cursor) = self.rows();
            if check(&rows, cursor) {
                return;
            }
            if Instant::now() > deadline {
                panic!("the screen never showed {what}:\n{}", rows.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the screen shows `needle` (on one row, or wrapped over several).
    fn shows(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.screen.lock().unwrap().screen().contents().contains(needle) {
                return;
            }
            if Instant::now() > deadline {
                panic!("the screen never showed {needle}:\n{}", self.rows().0.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first row containing `needle`.
    fn row_of(&self, needle: &str) -> usize {
        self.rows().0.iter().position(|r| r.contains(needle)).unwrap()
    }

    /// Waits for the program to exit; its exit code.
    fn exit_code(&mut self) -> i32 {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.session.get_process().status().unwrap() {
                WaitStatus::Exited(_, code) => return code,
                WaitStatus::StillAlive => {}
                other => panic!("the program ended with {other:?}"),
            }
            let screen = self.rows().0.join("\n");
            assert!(Instant::now() < deadline, "the program did not exit:\n{screen}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The interactive client for `name` in a terminal, connected to `addr`.
fn chat(dir: &Path, addr: &str, name: &str, extra: &[&str]) -> Term {
    let mut command = command("relay-client", dir);
    command.args(["--server", addr, "--user", name]).args(extra);
    let mut term = Term::spawn(command);
    term.shows(&format!("as {name}"));
    term.until("the prompt", |rows, cursor| rows[cursor].starts_with("> "));
    term
}

#[test]
fn typing_survives_incoming_messages_and_history_and_conversations_work() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = start_server(dir.path(), 0);
    let mut bob = listener(dir.path(), &addr, "bob", &mut server);
    let mut alice = chat(dir.path(), &addr, "alice", &[]);

    // Half a line typed, a message arrives: it shows above the prompt, the half line stays.
    alice.send("send bob hello wor");
    alice.until("the half line", |rows, cursor| rows[cursor] == "> send bob hello wor");
    let status = command("relay-client", dir.path())
        .args(["--server", &addr, "--user", "carol", "--guest", "send", "alice", "knock knock"])
        .status()
        .unwrap();
    assert!(status.success());
    alice.shows("carol: knock knock");
    let incoming = alice.row_of("carol: knock knock");
    alice.until("the half line below the message", |rows, cursor| {
        cursor > incoming && rows[cursor] == "> send bob hello wor"
    });
    // The line finished: sent exactly as typed, and redrawn with the time it was sent.
    alice.send("ld\r");
    assert_eq!(bob.expect("alice:"), "alice: hello world");
    alice.until("the sent line with its time", |rows, _| {
        rows.iter().any(|r| r.ends_with("> send bob hello world") && r.as_bytes()[2] == b':')
    });

    // History: the line comes back with the up arrow, and goes again.
    alice.send("\x1b[A");
    alice.until("the recalled line", |rows, cursor| rows[cursor] == "> send bob hello world");
    alice.send("\r");
    assert_eq!(bob.expect("alice:"), "alice: hello world");

    // A conversation: /msg sets the peer, the prompt shows it, plain lines go to bob.
    alice.send("/msg bob first\r");
    assert_eq!(bob.expect("alice:"), "alice: first");
    alice.until("bob's prompt", |rows, cursor| rows[cursor].starts_with("bob> "));
    alice.send("  plain words, as typed\r");
    assert_eq!(bob.expect("alice:"), "alice:   plain words, as typed");
    // A paste of several lines: each goes to bob.
    alice.send("one\rtwo\r");
    assert_eq!(bob.expect("alice:"), "alice: one");
    assert_eq!(bob.expect("alice:"), "alice: two");
    alice.send("EXIT\r");
    assert_eq!(alice.exit_code(), 0);

    // The history outlives the session.
    let mut alice = chat(dir.path(), &addr, "alice", &[]);
    alice.send("\x1b[A\x1b[A");
    alice.until("the line from the last session", |rows, cursor| rows[cursor] == "> two");
    // Ctrl-D on a line is ignored by the editor; on an empty line it quits.
    alice.send("\x15\x04");
    assert_eq!(alice.exit_code(), 0);

    server.type_line("EXIT");
    assert!(bob.wait().success());
    assert!(server.wait().success());
}

/// The settings of the terminal a program ran in, before and after: it is started by a shell
/// that records `stty -g` around it.
fn chat_between_sttys(dir: &Path, addr: &str, name: &str, extra: &[&str]) -> Term {
    let client = binary("relay-client");
    let mut script =
        format!("stty -g > before.{name}; '{}' --server {addr} --user {name}", client.display());
    for arg in extra {
        script.push_str(&format!(" {arg}"));
    }
    script.push_str(&format!("; code=$?; stty -g > after.{name}; exit $code"));
    let mut command = Command::new("sh");
    command.args(["-c", &script]);
    let envs = self::command("relay-client", dir);
    command.current_dir(dir);
    for (key, value) in envs.get_envs() {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    let mut term = Term::spawn(command);
    term.shows(&format!("as {name}"));
    term.until("the prompt", |rows, cursor| rows[cursor].starts_with("> "));
    term
}

fn same_settings(dir: &Path, name: &str) {
    let before = std::fs::read_to_string(dir.join(format!("before.{name}"))).unwrap();
    let after = std::fs::read_to_string(dir.join(format!("after.{name}"))).unwrap();
    assert!(!before.trim().is_empty());
    assert_eq!(before, after, "{name} left the terminal changed");
}

#[test]
fn the_terminal_is_restored_on_every_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = start_server(dir.path(), 0);
    // EXIT, Ctrl-D and Ctrl-C, each with nothing or half a line typed before.
    for (name, keys, code) in
        [("exit", "EXIT\r", 0), ("ctrld", "\x04", 0), ("ctrlc", "half a line\x03", 0)]
    {
        let mut term = chat_between_sttys(dir.path(), &addr, name, &[]);
        term.send(keys);
        assert_eq!(term.exit_code(), code, "{name}");
        same_settings(dir.path(), name);
    }

    // Killed politely (SIGTERM; SIGHUP, the terminal closing, is handled alike).
    let mut term = chat_between_sttys(dir.path(), &addr, "killed", &[]);
    term.send("half a li");
    term.until("the half line", |rows, cursor| rows[cursor] == "> half a li");
    let shell = term.session.get_process().pid().to_string();
    assert!(Command::new("pkill").args(["-TERM", "-P", &shell]).status().unwrap().success());
    assert_eq!(term.exit_code(), 0);
    same_settings(dir.path(), "killed");

    // The server vanishes while a line is half typed, and the client was told not to wait.
    let mut lost = chat_between_sttys(dir.path(), &addr, "lost", &["--no-reconnect"]);
    // The server's shutdown notice arrives while a line is half typed.
    let mut told = chat_between_sttys(dir.path(), &addr, "told", &[]);
    for term in [&mut lost, &mut told] {
        term.send("half a li");
        term.until("the half line", |rows, cursor| rows[cursor] == "> half a li");
    }
    server.type_line("EXIT");
    assert_eq!(told.exit_code(), 0);
    // Shown above the line being typed, as everything that arrives; the line stays.
    told.shows("server is shutting down");
    assert!(told.row_of("server is shutting down") < told.row_of("> half a li"));
    same_settings(dir.path(), "told");
    // To `lost`, the shutdown is a shutdown too: start again, and vanish this time.
    assert_eq!(lost.exit_code(), 0);
    same_settings(dir.path(), "lost");
    assert!(server.wait().success());

    let (mut server, addr) = start_server(dir.path(), 0);
    let mut lost = chat_between_sttys(dir.path(), &addr, "vanish", &["--no-reconnect"]);
    lost.send("half a li");
    lost.until("the half line", |rows, cursor| rows[cursor] == "> half a li");
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    assert_eq!(lost.exit_code(), 1);
    lost.shows("connection to the server lost");
    same_settings(dir.path(), "vanish");
}

#[test]
fn the_client_comes_back_by_itself_after_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, addr) = start_server(dir.path(), 0);
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let mut alice = chat(dir.path(), &addr, "alice", &[]);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    alice.shows("reconnecting");
    // A line typed while it is away waits, and goes out once it is back.
    alice.send("send bob typed while away\r");
    let (mut server, _) = start_server(dir.path(), port);
    alice.shows("reconnected to");
    let mut bob = listener(dir.path(), &addr, "bob", &mut server);
    // bob's key was new: the message waited for him as a name nobody held (not found), or
    // was stored for him; either way alice hears. Send another that he must get.
    alice.send("/msg bob still here?\r");
    assert_eq!(bob.expect("alice:"), "alice: still here?");
    alice.send("EXIT\r");
    assert_eq!(alice.exit_code(), 0);
    server.type_line("EXIT");
    assert!(bob.wait().success());
    assert!(server.wait().success());
}
