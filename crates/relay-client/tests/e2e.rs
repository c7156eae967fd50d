//! End to end through the real binaries: the server prints its address, two clients chat,
//! one sends to a missing name, and the operator's EXIT makes both clients exit 0.

// Test helpers fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use common::binary;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

const WAIT: Duration = Duration::from_secs(30);

thread_local! {
    /// Each test (one thread each) runs its processes in a directory of its own: the server's
    /// data directory and the clients' keys live there and go with the test.
    static SANDBOX: tempfile::TempDir = tempfile::tempdir().unwrap();
}

/// This test's directory: the working directory of every process it starts, and their
/// `XDG_CONFIG_HOME`, so clients of one test share keys and tests never touch the user's.
fn sandbox() -> PathBuf {
    SANDBOX.with(|dir| dir.path().to_path_buf())
}

/// A command for one of the binaries, run in this test's sandbox.
fn command(name: &str) -> Command {
    let mut command = Command::new(binary(name));
    command.current_dir(sandbox()).env("XDG_CONFIG_HOME", sandbox().join("config"));
    command.env_remove("RELAY_KEY").env_remove("RELAY_USER").env_remove("RELAY_SERVER");
    command
}

/// A child's output, line by line (from one stream, or two merged), with a timeout on every
/// wait. The streams are read to their end whether or not anyone looks, so a child never
/// writes to a full or closed pipe.
struct Output {
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Output {
    fn new(reader: impl AsyncRead + Unpin + Send + 'static) -> Output {
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        Output::read(reader, tx);
        Output { lines, seen: Vec::new() }
    }

    /// Both of a client's streams: messages and listings (stdout) with notices (stderr).
    fn merged(
        out: impl AsyncRead + Unpin + Send + 'static,
        err: impl AsyncRead + Unpin + Send + 'static,
    ) -> Output {
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        Output::read(out, tx.clone());
        Output::read(err, tx);
        Output { lines, seen: Vec::new() }
    }

    fn read(
        reader: impl AsyncRead + Unpin + Send + 'static,
        tx: tokio::sync::mpsc::UnboundedSender<String>,
    ) {
        tokio::spawn(async move {
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
    }

    /// The next line; `None` at the end of the output.
    async fn next_line(&mut self) -> Option<String> {
        self.lines.recv().await
    }

    /// Reads lines until one contains `needle`, and returns it.
    async fn expect(&mut self, needle: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.lines.recv().await {
                self.seen.push(line.clone());
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!("no line containing {needle:?}; saw {:#?}", self.seen),
        }
    }
}

struct Process {
    child: Child,
    stdin: ChildStdin,
}

impl Process {
    fn spawn(binary: &str, args: &[&str]) -> Process {
        let mut command = command(binary);
        command.args(args).env("RUST_LOG", "info");
        Process::start(command)
    }

    /// Starts `command` with every stream piped, killed if the test drops it.
    fn start(mut command: Command) -> Process {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        Process { child, stdin }
    }

    async fn type_line(&mut self, line: &str) {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Types `EXIT` and waits for a clean exit (code 0).
    async fn quit(mut self) {
        self.type_line("EXIT").await;
        assert!(self.exit_status().await.success());
    }

    async fn exit_status(mut self) -> ExitStatus {
        tokio::time::timeout(WAIT, self.child.wait()).await.expect("process did not exit").unwrap()
    }
}

async fn start_server() -> (Process, Output, String) {
    let mut server = Process::spawn("relay-server", &["--host", "127.0.0.1", "--port", "0"]);
    let mut log = Output::new(server.child.stderr.take().unwrap());
    let line = log.expect("listening on").await;
    let addr = line.rsplit("listening on ").next().unwrap().trim().to_string();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{line}");
    (server, log, addr)
}

/// Waits for a client's "connected" notice (on its stderr: stdout carries only messages and
/// listings); its output from then on, both streams.
async fn connected(client: &mut Process, name: &str) -> Output {
    let out = client.child.stdout.take().unwrap();
    let mut output = Output::merged(out, client.child.stderr.take().unwrap());
    output.expect(&format!("as {name}")).await;
    output
}

/// Starts a client reading commands from a pipe and waits for its "connected" line.
async fn start_client(addr: &str, name: &str) -> (Process, Output) {
    let mut client = Process::spawn("relay-client", &["--server", addr, "--user", name]);
    let out = connected(&mut client, name).await;
    (client, out)
}

#[tokio::test]
async fn two_clients_chat_and_the_operator_shuts_everything_down() {
    let (mut server, mut server_log, addr) = start_server().await;

    let (mut alice, mut alice_out) = start_client(&addr, "alice").await;
    let (mut bob, mut bob_out) = start_client(&addr, "bob").await;
    server_log.expect("name=bob").await;

    alice.type_line("send bob hello bob").await;
    assert_eq!(bob_out.expect("alice:").await, "alice: hello bob");
    bob.type_line("send alice hi  alice, spaces kept").await;
    assert_eq!(alice_out.expect("bob:").await, "bob: hi  alice, spaces kept");

    alice.type_line("send carol are you there").await;
    let line = alice_out.expect("carol").await;
    assert!(line.contains("not found"), "{line}");

    bob.type_line("list").await;
    bob_out.expect("alice 127.0.0.1:").await;

    server.type_line("EXIT").await;
    alice_out.expect("server is shutting down").await;
    bob_out.expect("server is shutting down").await;
    assert!(alice.exit_status().await.success());
    assert!(bob.exit_status().await.success());
    // The last log line counts the notices actually written, not who was connected.
    let last = server_log.expect("clients_told").await;
    assert!(last.contains("clients_told=2"), "{last}");
    assert!(server.exit_status().await.success());
}

#[tokio::test]
async fn exit_command_and_end_of_input_leave_cleanly() {
    let (server, mut server_log, addr) = start_server().await;

    let (alice, _alice_out) = start_client(&addr, "alice").await;
    alice.quit().await;
    server_log.expect("offline").await;

    // End of input works like EXIT, and the name is free again.
    let (mut again, _again_out) = start_client(&addr, "alice").await;
    drop(again.stdin);
    let status = tokio::time::timeout(WAIT, again.child.wait()).await.unwrap().unwrap();
    assert!(status.success());

    server.quit().await;
}

/// Runs the client to completion and returns its exit status and stderr.
async fn client_failure(args: &[&str]) -> (ExitStatus, String) {
    let (status, _stdout, stderr) = client_failure_with_output(args).await;
    (status, stderr)
}

#[tokio::test]
async fn user_mistakes_get_one_clear_line_and_a_failure_code() {
    let (mut server, _log, addr) = start_server().await;
    let (alice, _alice_out) = start_client(&addr, "alice").await;

    let (status, stderr) = client_failure(&["--server", &addr, "--user", "alice"]).await;
    assert!(!status.success());
    assert_eq!(stderr.trim(), "relay-client: the name 'alice' is taken");

    let (status, stderr) = client_failure(&["--server", &addr, "--user", "two words"]).await;
    assert!(!status.success());
    assert!(stderr.contains("invalid name 'two words'") && stderr.lines().count() == 1, "{stderr}");

    // No key file is made for a name that cannot be registered.
    assert!(!sandbox().join("config/relay/keys/two%20words.key").exists());

    // A port nothing listens on: take a free one and release it. (alice's key exists, so
    // nothing but the error is printed.)
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (status, stderr) =
        client_failure(&["--server", &free.to_string(), "--user", "alice"]).await;
    assert!(!status.success());
    assert!(stderr.contains("cannot connect to") && stderr.lines().count() == 1, "{stderr}");

    let (status, stderr) = client_failure(&["--server", "not-an-address", "--user", "alice"]).await;
    assert!(!status.success());
    assert!(stderr.contains("cannot connect to not-an-address"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    server.type_line("EXIT").await;
    assert!(alice.exit_status().await.success());
    assert!(server.exit_status().await.success());
}

#[tokio::test]
async fn server_reports_a_port_in_use_clearly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = tokio::time::timeout(
        WAIT,
        command("relay-server")
            .args(["--host", "127.0.0.1", "--port", &port])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("cannot listen on 127.0.0.1:"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn sigterm_and_sigint_shut_down_like_exit() {
    for signal in ["-TERM", "-INT"] {
        let (server, _log, addr) = start_server().await;
        let mut alice = Process::spawn("relay-client", &["--server", &addr, "--user", "alice"]);
        let mut alice_out = connected(&mut alice, "alice").await;
        let pid = server.child.id().unwrap().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().await.unwrap();
        assert!(status.success());
        alice_out.expect("server is shutting down").await;
        assert!(alice.exit_status().await.success(), "client after {signal}");
        assert!(server.exit_status().await.success(), "server after {signal}");
    }
}

#[tokio::test]
async fn the_server_keeps_serving_when_its_stdin_is_closed() {
    let (server, mut log, addr) = start_server().await;
    // Closing the console's input is not a shutdown.
    drop(server.stdin);
    log.expect("console input closed").await;
    let mut server_child = server.child;
    let (mut alice, mut alice_out) = start_client(&addr, "alice").await;
    log.expect("name=alice").await;
    alice.type_line("send alice still serving").await;
    assert_eq!(alice_out.expect("alice:").await, "alice: still serving");
    assert!(server_child.try_wait().unwrap().is_none(), "server exited");
    alice.quit().await;
    server_child.start_kill().unwrap();
}

/// Starts a server in this test's sandbox with extra flags (its data directory is the
/// sandbox's `relay-data` unless they say otherwise).
async fn start_server_with(extra: &[&str]) -> (Process, Output, String) {
    let mut args = vec!["--host", "127.0.0.1", "--port", "0"];
    args.extend_from_slice(extra);
    let mut server = Process::spawn("relay-server", &args);
    let mut log = Output::new(server.child.stderr.take().unwrap());
    let line = log.expect("listening on").await;
    let addr = line.rsplit("listening on ").next().unwrap().trim().to_string();
    (server, log, addr)
}

/// Runs the server to completion (it must fail at start) and returns its exit status and
/// stderr.
async fn server_failure(args: &[&str]) -> (ExitStatus, String) {
    let out = tokio::time::timeout(
        WAIT,
        command("relay-server").args(args).stdin(Stdio::null()).kill_on_drop(true).output(),
    )
    .await
    .unwrap()
    .unwrap();
    (out.status, String::from_utf8(out.stderr).unwrap())
}

#[tokio::test]
async fn a_name_belongs_to_its_key_across_server_restarts() {
    let (server, mut log, addr) = start_server_with(&[]).await;
    // First login: a key is made and the name bound to it.
    let mut alice = Process::spawn("relay-client", &["--server", &addr, "--user", "alice"]);
    let mut alice_err = Output::new(alice.child.stderr.take().unwrap());
    let line = alice_err.expect("created a new key").await;
    assert!(line.contains("config/relay/keys/alice.key"), "{line}");
    log.expect("name bound to a new key").await;
    alice.quit().await;
    server.quit().await;

    // A new server on the same data directory: alice's key logs in, says nothing of keys.
    let (mut server, mut log, addr) = start_server_with(&[]).await;
    let (status, stderr) = client_failure(&["--server", &addr, "--user", "alice"]).await;
    assert!(status.success(), "{stderr}");
    // Only the connected notice: nothing about keys.
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("connected to") && !stderr.contains("key"), "{stderr}");
    log.expect("registered with key").await;

    // Another key, or no key: refused with one line, exit 1.
    let other = sandbox().join("other.key");
    let (status, stderr) =
        client_failure(&["--server", &addr, "--user", "alice", "--key", other.to_str().unwrap()])
            .await;
    assert!(!status.success());
    assert_eq!(stderr.lines().filter(|l| !l.contains("created a new key")).count(), 1, "{stderr}");
    assert!(stderr.contains("belongs to"), "{stderr}");
    let (status, stderr) = client_failure(&["--server", &addr, "--user", "Alice", "--guest"]).await;
    assert!(!status.success());
    assert!(stderr.contains("belongs to") && stderr.lines().count() == 1, "{stderr}");
    let (status, stderr) = client_failure(&["--server", &addr, "--user", "аlice", "--guest"]).await;
    assert!(!status.success());
    assert!(stderr.contains("looks like alice") && stderr.lines().count() == 1, "{stderr}");

    // The operator releases it; then another key may take it.
    server.type_line("release alice").await;
    log.expect("operator released the name").await;
    let (status, stderr) =
        client_failure(&["--server", &addr, "--user", "alice", "--key", other.to_str().unwrap()])
            .await;
    assert!(status.success(), "{stderr}");

    server.quit().await;
}

#[tokio::test]
async fn unusable_key_files_are_refused_with_the_fix() {
    let (server, _log, addr) = start_server_with(&[]).await;
    let path = sandbox().join("open.key");
    let (status, stderr) =
        client_failure(&["--server", &addr, "--user", "kim", "--key", path.to_str().unwrap()])
            .await;
    assert!(status.success(), "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (status, stderr) =
            client_failure(&["--server", &addr, "--user", "kim", "--key", path.to_str().unwrap()])
                .await;
        assert!(!status.success());
        assert!(stderr.contains("chmod 600") && stderr.lines().count() == 1, "{stderr}");
    }
    let junk = sandbox().join("junk.key");
    std::fs::write(&junk, "not a key\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (status, stderr) =
        client_failure(&["--server", &addr, "--user", "kim", "--key", junk.to_str().unwrap()])
            .await;
    assert!(!status.success());
    assert!(stderr.contains("is not a relay key file") && stderr.lines().count() == 1, "{stderr}");
    // RELAY_KEY names the key file too.
    let out = command("relay-client")
        .args(["--server", &addr, "--user", "kim"])
        .env("RELAY_KEY", &junk)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a relay key file"));
    server.quit().await;
}

#[tokio::test]
async fn a_data_dir_that_cannot_be_used_stops_the_server_with_one_line() {
    // Damaged: the file is not a name table. It is left as it was.
    std::fs::create_dir_all(sandbox().join("damaged")).unwrap();
    let db = sandbox().join("damaged/names.redb");
    std::fs::write(&db, vec![0x5a; 4096]).unwrap();
    let (status, stderr) =
        server_failure(&["--port", "0", "--data-dir", sandbox().join("damaged").to_str().unwrap()])
            .await;
    assert!(!status.success());
    assert!(stderr.contains("damaged") && stderr.lines().count() == 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(std::fs::read(&db).unwrap(), vec![0x5a; 4096]);

    // Not a directory.
    std::fs::write(sandbox().join("a-file"), "x").unwrap();
    let (status, stderr) =
        server_failure(&["--port", "0", "--data-dir", sandbox().join("a-file").to_str().unwrap()])
            .await;
    assert!(!status.success());
    assert!(
        stderr.contains("cannot use data directory") && stderr.lines().count() == 1,
        "{stderr}"
    );

    // A directory that exists but cannot be written (sysfs refuses new files even to root,
    // who can write anywhere a read-only permission would stop others).
    #[cfg(target_os = "linux")]
    {
        let (status, stderr) = server_failure(&["--port", "0", "--data-dir", "/sys/kernel"]).await;
        assert!(!status.success());
        assert!(
            stderr.contains("cannot use data directory /sys/kernel") && stderr.lines().count() == 1,
            "{stderr}"
        );
    }

    // In use by another server.
    let (first, _log, _addr) = start_server_with(&[]).await;
    let (status, stderr) = server_failure(&["--port", "0"]).await;
    assert!(!status.success());
    assert!(
        stderr.contains("in use by another relay-server") && stderr.lines().count() == 1,
        "{stderr}"
    );
    first.quit().await;
}

#[tokio::test]
async fn a_message_for_an_offline_key_holder_waits_and_its_sender_hears_it_was_delivered() {
    let (mut server, mut log, addr) = start_server_with(&[]).await;
    // bob binds his name (the client makes his key) and leaves.
    let (bob, _bob_out) = start_client(&addr, "bob").await;
    bob.quit().await;
    log.expect("name=bob").await;
    log.expect("offline").await;

    let (mut alice, mut alice_out) = start_client(&addr, "alice").await;
    alice.type_line("send bob are you there?").await;
    let line = alice_out.expect("bob").await;
    assert!(line.contains("stored for bob"), "{line}");

    // bob logs in with his key: the message is waiting, and alice hears it was delivered.
    let (mut bob, mut bob_out) = start_client(&addr, "bob").await;
    assert_eq!(bob_out.expect("alice").await, "alice: are you there?");
    assert_eq!(alice_out.expect("delivered").await, "~ delivered to bob");

    server.type_line("inboxes").await;
    let mut server_out = Output::new(server.child.stdout.take().unwrap());
    server_out.expect("0 messages").await;
    bob.type_line("EXIT").await;
    alice.type_line("EXIT").await;
    assert!(bob.exit_status().await.success());
    assert!(alice.exit_status().await.success());
    server.quit().await;
}

/// Starts a server logging to `log` (in the sandbox), with `extra` flags and no `RUST_LOG`;
/// returns it, its stderr, and its address from the one line stderr gets.
async fn start_server_logging_to(log: &str, extra: &[&str]) -> (Process, Output, String) {
    let mut command = command("relay-server");
    command
        .args(["--host", "127.0.0.1", "--port", "0", "--log-file", log])
        .args(extra)
        .env_remove("RUST_LOG");
    let mut server = Process::start(command);
    let mut err = Output::new(server.child.stderr.take().unwrap());
    let line = err.expect("listening on").await;
    assert!(line.starts_with(&format!("relay-server: log in {log}; listening on ")), "{line}");
    let addr = line.rsplit("listening on ").next().unwrap().trim().to_string();
    (server, err, addr)
}

/// Waits until the file at `path` (in the sandbox) contains `needle`; returns its text.
async fn file_with(path: &str, needle: &str) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            let text = std::fs::read_to_string(sandbox().join(path)).unwrap_or_default();
            if text.contains(needle) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{path} never contained {needle:?}"))
}

#[tokio::test]
async fn a_server_logging_to_a_file_leaves_the_terminal_to_the_chat() {
    let (server, mut err, addr) =
        start_server_logging_to("server.log", &["--data-dir", "data-a"]).await;
    let (alice, _out) = start_client(&addr, "alice").await;
    alice.quit().await;
    // What would have gone to the terminal is in the file.
    file_with("server.log", "registered").await;
    server.quit().await;
    file_with("server.log", "shut").await;
    // And stderr had nothing after its one line.
    let rest = tokio::time::timeout(WAIT, async {
        let mut rest = Vec::new();
        while let Some(line) = err.next_line().await {
            rest.push(line);
        }
        rest
    })
    .await
    .unwrap();
    assert!(rest.is_empty(), "stderr still got {rest:?}");

    // `-q`: only warnings and errors are logged.
    let (mut server, _err, addr) =
        start_server_logging_to("quiet.log", &["-q", "--data-dir", "data-b"]).await;
    let (bob, _out) = start_client(&addr, "bob").await;
    bob.quit().await;
    server.type_line("EXIT").await;
    server.exit_status().await;
    let quiet = std::fs::read_to_string(sandbox().join("quiet.log")).unwrap_or_default();
    assert!(!quiet.contains("registered") && !quiet.contains(" INFO "), "{quiet}");
}

#[tokio::test]
async fn the_environment_names_server_and_user_and_host_names_resolve() {
    // The server listens on a host name; the client finds it by one, from the environment.
    let mut server = Process::spawn("relay-server", &["--host", "localhost", "--port", "0"]);
    let mut log = Output::new(server.child.stderr.take().unwrap());
    let line = log.expect("listening on").await;
    let port = line.rsplit(':').next().unwrap().trim().to_string();
    let mut command = command("relay-client");
    command
        .env("RELAY_SERVER", format!("localhost:{port}"))
        .env("RELAY_USER", "erin")
        .arg("--guest");
    let mut client = Process::start(command);
    let _out = connected(&mut client, "erin").await;
    client.quit().await;
    server.quit().await;
}

#[tokio::test]
async fn a_peer_that_is_not_a_relay_server_gets_one_clear_line() {
    // A web server, as far as the client can tell.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let web = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
        // Read until the client gives up, so it sees the answer, not a reset.
        let mut sink = [0u8; 1024];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut socket, &mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    let (status, stderr) = client_failure(&["--server", &addr, "--user", "zed", "--guest"]).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not a relay server") && stderr.contains("HTTP"), "{stderr}");
    web.abort();
}

/// Runs a client with `input` piped to it; returns its exit status, stdout and stderr.
async fn piped(args: &[&str], input: &str) -> (ExitStatus, String, String) {
    let mut child = command("relay-client")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await.unwrap().unwrap();
    (out.status, String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[tokio::test]
async fn piped_commands_get_their_answers_before_the_client_exits_and_set_the_exit_code() {
    let (server, _log, addr) = start_server().await;
    let (watcher, _out) = start_client(&addr, "watcher").await;
    for round in 0..20 {
        // A listing is printed before the client leaves, every time.
        let (status, out, err) =
            piped(&["--server", &addr, "--user", "lister", "--guest"], "list\n").await;
        assert!(status.success(), "round {round}: {err}");
        assert!(out.contains("watcher 127.0.0.1:"), "round {round}: {out:?}");
        assert!(!out.contains("connected to"), "the notice belongs on stderr: {out:?}");
        // A send that fails is reported, and so is the failure, in the exit code.
        let (status, out, err) =
            piped(&["--server", &addr, "--user", "sender", "--guest"], "send nobody hi\n").await;
        assert_eq!(status.code(), Some(1), "round {round}: {out} {err}");
        // Notices and errors on stderr: stdout carries only messages and listings.
        assert!(out.is_empty(), "round {round}: {out:?}");
        assert!(err.contains("! nobody: not found"), "round {round}: {err:?}");
        assert!(err.contains("1 command failed"), "round {round}: {err:?}");
    }
    // A message stored for an offline key holder: its `Stored` answer is waited for too.
    let (status, _, err) = piped(&["--server", &addr, "--user", "owner"], "").await;
    assert!(status.success(), "{err}");
    let (status, out, err) =
        piped(&["--server", &addr, "--user", "writer"], "send owner are you there\n").await;
    assert!(status.success(), "{out} {err}");
    assert!(err.contains("~ stored for owner"), "{err:?}");
    watcher.quit().await;
    server.quit().await;
}

#[tokio::test]
async fn a_script_of_many_listings_still_ends_promptly() {
    let (server, _log, addr) = start_server().await;
    // More listings than the server answers at once: the last is refused as one too many,
    // which also marks the end of the answers.
    let (status, out, err) =
        piped(&["--server", &addr, "--user", "many", "--guest"], &"list\n".repeat(8)).await;
    assert_eq!(status.code(), Some(1), "{out} {err}");
    assert!(out.contains("many 127.0.0.1:") && err.contains("too many"), "{out:?} {err:?}");
    assert!(!err.contains("did not come in time"), "{err:?}");
    server.quit().await;
}

#[tokio::test]
async fn one_shot_send_and_list_answer_in_the_exit_code() {
    let (server, _log, addr) = start_server().await;
    let (bob, mut bob_out) = start_client(&addr, "bob").await;
    for round in 0..20 {
        // Delivered: nothing printed, exit 0, and bob has it.
        let (status, out, err) = client_failure_with_output(&[
            "--server", &addr, "--user", "oneshot", "--guest", "send", "bob", "hello", "there",
        ])
        .await;
        assert!(status.success(), "round {round}: {err}");
        assert!(out.is_empty() && err.is_empty(), "round {round}: {out:?} {err:?}");
        assert_eq!(bob_out.expect("oneshot:").await, "oneshot: hello there");
        // Not found: one line on stderr, exit 1.
        let (status, out, err) = client_failure_with_output(&[
            "--server", &addr, "--user", "oneshot", "--guest", "send", "nobody", "hi",
        ])
        .await;
        assert_eq!(status.code(), Some(1), "round {round}: {err}");
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(err.trim_end(), "relay-client: nobody: not found", "round {round}");
        // A listing: every user, nothing else.
        let (status, out, err) =
            client_failure_with_output(&["--server", &addr, "--user", "lister", "--guest", "list"])
                .await;
        assert!(status.success(), "round {round}: {err}");
        assert!(out.contains("bob 127.0.0.1:") && out.contains("lister 127.0.0.1:"), "{out:?}");
        assert!(err.is_empty(), "{err:?}");
    }
    bob.quit().await;
    server.quit().await;
}

#[tokio::test]
async fn one_shot_send_can_wait_for_the_receipt() {
    let (server, _log, addr) = start_server().await;
    // bob holds a key: his client acknowledges what it takes, and the sender hears.
    let (mut bob, mut bob_out) = start_client(&addr, "bob").await;
    let (status, out, err) = client_failure_with_output(&[
        "--server",
        &addr,
        "--user",
        "sender",
        "--guest",
        "send",
        "--receipt",
        "20s",
        "bob",
        "ack me",
    ])
    .await;
    assert!(status.success(), "{out} {err}");
    assert!(out.is_empty() && err.is_empty(), "{out:?} {err:?}");
    assert_eq!(bob_out.expect("sender:").await, "sender: ack me");
    // A guest never sends receipts: no receipt in time is a failure, said in one line.
    let (mut guest, mut guest_out) = {
        let mut guest =
            Process::spawn("relay-client", &["--server", &addr, "--user", "gus", "--guest"]);
        let out = connected(&mut guest, "gus").await;
        (guest, out)
    };
    let (status, _, err) = client_failure_with_output(&[
        "--server",
        &addr,
        "--user",
        "sender",
        "--guest",
        "send",
        "--receipt",
        "1s",
        "gus",
        "hi",
    ])
    .await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end(), "relay-client: gus: no receipt within 1s");
    assert_eq!(guest_out.expect("sender:").await, "sender: hi", "it was delivered all the same");
    for client in [&mut bob, &mut guest] {
        client.type_line("EXIT").await;
    }
    assert!(bob.exit_status().await.success() && guest.exit_status().await.success());
    server.quit().await;
}

/// Runs the client to completion with no input; returns its exit status, stdout and stderr.
async fn client_failure_with_output(args: &[&str]) -> (ExitStatus, String, String) {
    let out = tokio::time::timeout(
        WAIT,
        command("relay-client").args(args).stdin(Stdio::null()).kill_on_drop(true).output(),
    )
    .await
    .unwrap()
    .unwrap();
    (out.status, String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[tokio::test]
async fn listen_prints_each_message_on_one_line_until_the_server_shuts_down() {
    let (mut server, mut log, addr) = start_server().await;
    let mut listener = Process::spawn(
        "relay-client",
        &["--server", &addr, "--user", "ear", "--guest", "listen", "--json"],
    );
    let mut out = Output::new(listener.child.stdout.take().unwrap());
    log.expect("name=ear").await;
    let (mut alice, _alice_out) = start_client(&addr, "alice").await;
    alice.type_line("send ear say \"hi\"\tand go").await;
    let line = out.expect("\"from\":\"alice\"").await;
    assert!(line.starts_with("{\"from\":\"alice\",\"to\":\"ear\",\"time\":"), "{line}");
    assert!(line.ends_with(",\"content\":\"say \\\"hi\\\"\\tand go\"}"), "{line}");
    // Ctrl-C ends it with 0, every time; and the plain form is one line per message.
    for round in 0..20 {
        let mut plain = Process::spawn(
            "relay-client",
            &["--server", &addr, "--user", "plain", "--guest", "listen"],
        );
        let mut plain_out = Output::new(plain.child.stdout.take().unwrap());
        log.expect("name=plain").await;
        alice.type_line(&format!("send plain round {round}")).await;
        assert_eq!(plain_out.expect("alice:").await, format!("alice: round {round}"));
        let pid = plain.child.id().unwrap().to_string();
        assert!(Command::new("kill").args(["-INT", &pid]).status().await.unwrap().success());
        assert!(plain.exit_status().await.success(), "round {round}");
        // Gone from the server (it went offline) before the name is claimed again.
        let gone = log.expect("name=plain").await;
        assert!(gone.contains("offline") || gone.contains("disconnected"), "{gone}");
    }
    alice.quit().await;
    server.type_line("EXIT").await;
    assert!(listener.exit_status().await.success());
    assert!(server.exit_status().await.success());
}

#[tokio::test]
async fn the_operator_sees_metrics_and_kicks_a_user_who_is_told_why() {
    let (mut server, mut log, addr) = start_server_with(&["--metrics", "127.0.0.1:0"]).await;
    let line = log.expect("serving metrics at http://").await;
    let after = line.split("http://").nth(1).unwrap();
    let metrics = after.split("/metrics").next().unwrap().to_string();
    let (mut alice, alice_out) = start_client(&addr, "alice").await;
    let (bob, mut bob_out) = start_client(&addr, "bob").await;
    alice.type_line("send bob hello").await;
    bob_out.expect("alice: hello").await;
    // The scrape counts what happened (a read may come a moment before its count).
    let scraped = tokio::time::timeout(WAIT, async {
        loop {
            let mut stream = tokio::net::TcpStream::connect(&metrics).await.unwrap();
            stream.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
            let mut body = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut body).await.unwrap();
            // Delivered live, or through bob's inbox if it came while he was logging in.
            let live = body.contains("\nrelay_messages_routed_total 1\n");
            if live || body.contains("\nrelay_messages_stored_total 1\n") {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(scraped.starts_with("HTTP/1.1 200 OK"), "{scraped}");
    assert!(scraped.contains("\nrelay_users_online 2\n"), "{scraped}");
    // The operator kicks bob: bob's client says why and exits 1 without reconnecting.
    server.type_line("kick bob please stop").await;
    server.type_line("who alice").await;
    let status = bob.exit_status().await;
    assert_eq!(status.code(), Some(1));
    let told = bob_out.expect("disconnected").await;
    assert!(told.contains("disconnected by the operator (please stop)"), "{told}");
    log.expect("operator disconnected the user").await;
    alice.quit().await;
    let _ = alice_out;
    server.quit().await;
}

#[tokio::test]
async fn waiting_for_a_server_says_so_and_gives_up_in_one_line() {
    // A port nobody listens on (bound, then let go).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = format!("127.0.0.1:{port}");
    let (status, err) =
        client_failure(&["--server", &server, "--user", "patient", "--guest", "--wait", "0.5s"])
            .await;
    assert_eq!(status.code(), Some(1));
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert_eq!(lines[0], format!("relay-client: waiting for {server} to answer..."));
    assert!(lines[1].contains("cannot connect to"), "{err}");
}

#[tokio::test]
async fn completions_and_manual_pages_come_from_both_binaries() {
    for (binary, completions, man) in [
        ("relay-client", vec!["completions", "bash"], vec!["man"]),
        ("relay-server", vec!["--completions", "zsh"], vec!["--man"]),
    ] {
        let out = command(binary).args(&completions).output().await.unwrap();
        assert!(out.status.success(), "{binary}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(
            script.contains(binary) && script.contains("--server") == (binary == "relay-client")
        );
        let out = command(binary).args(&man).output().await.unwrap();
        assert!(out.status.success(), "{binary}");
        let page = String::from_utf8(out.stdout).unwrap();
        assert!(page.starts_with(".ie") || page.starts_with(".TH"), "{binary}: {page:.80}");
        assert!(page.contains(&format!(".TH {binary}")), "{binary}");
    }
    // The name is needed for a session, and its absence is one clear line.
    let (status, err) = client_failure(&["--server", "127.0.0.1:1"]).await;
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("--user") && err.lines().count() == 1, "{err}");
}

#[tokio::test]
async fn the_client_reconnects_when_its_server_comes_back_unless_told_not_to() {
    let (mut server, _log, addr) = start_server().await;
    let port = addr.rsplit(':').next().unwrap().to_string();
    let (_alice, mut alice_out) = start_client(&addr, "alice").await;
    let mut quitter =
        Process::spawn("relay-client", &["--server", &addr, "--user", "quitter", "--no-reconnect"]);
    let _out = connected(&mut quitter, "quitter").await;
    // The server vanishes (no shutdown notice) and comes back on the same port and data.
    server.child.start_kill().unwrap();
    tokio::time::timeout(WAIT, server.child.wait()).await.unwrap().unwrap();
    let status = quitter.exit_status().await;
    assert_eq!(status.code(), Some(1), "--no-reconnect exits when the connection is lost");
    let mut server = Process::spawn("relay-server", &["--host", "127.0.0.1", "--port", &port]);
    let mut log = Output::new(server.child.stderr.take().unwrap());
    log.expect("listening on").await;
    // alice comes back by herself, under her name (and key).
    log.expect("name=alice").await;
    let (mut bob, _bob_out) = start_client(&addr, "bob").await;
    bob.type_line("send alice welcome back").await;
    assert_eq!(alice_out.expect("bob:").await, "bob: welcome back");
    bob.quit().await;
    server.quit().await;
}

/// A certificate authority and a server certificate it signed for `localhost` and 127.0.0.1,
/// written as PEM files in the sandbox: `(ca, cert, key)` paths.
fn ca_issued_certificate() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let dir = sandbox();
    let paths = ["ca.pem", "server.pem", "server.key"].map(|f| dir.join(f));
    std::fs::write(&paths[0], ca.pem()).unwrap();
    std::fs::write(&paths[1], cert.pem()).unwrap();
    std::fs::write(&paths[2], key.serialize_pem()).unwrap();
    let [ca, cert, key] = paths.map(|p| p.to_str().unwrap().to_string());
    (ca, cert, key)
}

#[tokio::test]
async fn tls_with_a_ca_issued_certificate_and_nothing_sent_to_an_untrusted_one() {
    let (ca, cert, key) = ca_issued_certificate();
    let (mut server, mut log, addr) =
        start_server_with(&["--tls-cert", &cert, "--tls-key", &key]).await;
    log.expect("(TLS only)").await;
    let port = addr.rsplit(':').next().unwrap().to_string();
    let host = format!("localhost:{port}");
    // Trusting the CA: it works, under the certificate's name.
    let (status, out, err) =
        piped(&["--server", &host, "--user", "alice", "--guest", "--ca", &ca], "list\n").await;
    assert!(status.success(), "{err}");
    assert!(out.contains("alice 127.0.0.1:"), "{out}");
    // Not trusting it: one line, exit 1, and the server never saw a registration.
    let (status, err) =
        client_failure(&["--server", &host, "--user", "mallory", "--guest", "--tls"]).await;
    assert_eq!(status.code(), Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("TLS with") && err.contains("not signed by an authority"), "{err}");
    log.expect("TLS handshake failed").await;
    // A plain client at the TLS port is told what it reached, in one line.
    let (status, err) = client_failure(&["--server", &host, "--user", "plain", "--guest"]).await;
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("with TLS: connect with --tls") && err.lines().count() == 1, "{err}");
    server.type_line("list").await;
    server.quit().await;
    let seen = log.seen.join("\n");
    assert!(!seen.contains("name=mallory") && !seen.contains("name=plain"), "{seen}");
}

#[tokio::test]
async fn tls_with_a_self_signed_certificate_pinned_by_its_fingerprint() {
    let (server, mut log, addr) =
        start_server_with(&["--tls-self-signed", "--tls-port", "0", "--register-timeout", "1s"])
            .await;
    let line = log.expect("serving TLS on").await;
    let tls_addr = line.split("serving TLS on ").nth(1).unwrap().split(';').next().unwrap();
    let tls_addr = tls_addr.replace("0.0.0.0", "127.0.0.1");
    let fingerprint = line.rsplit(' ').next().unwrap().to_string();
    assert_eq!(fingerprint.len(), 64, "{line}");
    // Pinned: alice over TLS and bob over plain TCP chat through the same server.
    let mut alice = Process::spawn(
        "relay-client",
        &["--server", &tls_addr, "--user", "alice", "--tls-fingerprint", &fingerprint],
    );
    let mut alice_out = connected(&mut alice, "alice").await;
    let (mut bob, mut bob_out) = start_client(&addr, "bob").await;
    bob.type_line("send alice over plain").await;
    alice_out.expect("bob: over plain").await;
    alice.type_line("send bob over TLS").await;
    bob_out.expect("alice: over TLS").await;
    // A wrong pin: one line, exit 1.
    let wrong: String = fingerprint.chars().rev().collect();
    let (status, err) = client_failure(&[
        "--server",
        &tls_addr,
        "--user",
        "eve",
        "--guest",
        "--tls-fingerprint",
        &wrong,
    ])
    .await;
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("not the one pinned") && err.lines().count() == 1, "{err}");
    // A TLS client at the plain port: one line.
    let (status, err) = client_failure(&[
        "--server",
        &addr,
        "--user",
        "eve",
        "--guest",
        "--tls-fingerprint",
        &fingerprint,
    ])
    .await;
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("does not speak TLS here") && err.lines().count() == 1, "{err}");
    // A handshake that never finishes is dropped at the registration timeout.
    let _silent = tokio::net::TcpStream::connect(&tls_addr).await.unwrap();
    log.expect("TLS handshake not finished in time").await;
    for client in [&mut alice, &mut bob] {
        client.type_line("EXIT").await;
    }
    assert!(alice.exit_status().await.success() && bob.exit_status().await.success());
    server.quit().await;
    // The certificate survives a restart: same fingerprint.
    let (again, mut log, _) = start_server_with(&["--tls-self-signed", "--tls-port", "0"]).await;
    let line = log.expect("serving TLS on").await;
    assert!(line.ends_with(&fingerprint), "{line}");
    again.quit().await;
}
