//! The real `relay-server` binary as a child process, for measurements that must see the
//! server's memory alone and for faults that need a process of their own (fd limits).

use std::net::SocketAddr;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::within;

pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
    log: mpsc::UnboundedReceiver<String>,
    /// The data directory, unless the caller gave `--data-dir`.
    _data: Option<tempfile::TempDir>,
}

impl ServerProcess {
    /// Starts `relay-server --host 127.0.0.1 --port 0 <args>`, optionally with a lower
    /// open-file limit, and waits for its `listening on` line.
    pub async fn spawn(args: &[&str], max_open_files: Option<u32>) -> ServerProcess {
        let binary = env!("CARGO_BIN_EXE_relay-server");
        let mut command = match max_open_files {
            // `ulimit` in a shell that then becomes the server: no unsafe pre_exec needed.
            Some(limit) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\"")).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let data = (!args.contains(&"--data-dir")).then(|| tempfile::tempdir().unwrap());
        if let Some(dir) = &data {
            command.arg("--data-dir").arg(dir.path());
        }
        let mut child = command
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, mut log) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let listening = within(async {
            let mut seen = Vec::new();
            loop {
                let Some(line) = log.recv().await else {
                    panic!("server exited before listening; it said:\n{}", seen.join("\n"));
                };
                if let Some(addr) = line.split("listening on ").nth(1) {
                    return addr.trim().parse().unwrap();
                }
                seen.push(line);
            }
        })
        .await;
        ServerProcess { child, addr: listening, pid, log, _data: data }
    }

    /// Reads the log until a line contains `needle`.
    pub async fn expect_log(&mut self, needle: &str) -> String {
        within(async {
            loop {
                let line = self.log.recv().await.expect("server log ended");
                if line.contains(needle) {
                    return line;
                }
            }
        })
        .await
    }

    /// Reads the log until a line contains `needle`; returns every line read, that one last.
    pub async fn log_until(&mut self, needle: &str) -> Vec<String> {
        within(async {
            let mut lines = Vec::new();
            loop {
                let line = self.log.recv().await.expect("server log ended");
                let found = line.contains(needle);
                lines.push(line);
                if found {
                    return lines;
                }
            }
        })
        .await
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmRSS:")
    }

    /// Peak resident memory so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmHWM:")
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
