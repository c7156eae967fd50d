//! A progress line on stderr for runs longer than a few seconds.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counts work done; a background task shows it while the run lasts.
#[derive(Clone, Debug)]
pub struct Progress {
    done: Arc<AtomicU64>,
}

/// Stops the display when dropped.
pub struct Display {
    task: tokio::task::JoinHandle<()>,
    tty: bool,
}

impl Drop for Display {
    fn drop(&mut self) {
        self.task.abort();
        if self.tty {
            // Clear the progress line so the report starts on a clean line.
            eprint!("\r\x1b[K");
        }
    }
}

/// Shows nothing for the first two seconds, so short runs stay quiet.
const QUIET_FOR: Duration = Duration::from_secs(2);

impl Progress {
    /// A counter with nothing done.
    pub fn new() -> Progress {
        Progress { done: Arc::new(AtomicU64::new(0)) }
    }

    /// Records `n` more units done.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Units done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Shows `label: done/total unit (rate/s)` on stderr every second (every five when stderr
    /// is not a terminal) until the returned guard is dropped.
    pub fn display(&self, label: String, total: u64, unit: &'static str) -> Display {
        let tty = std::io::stderr().is_terminal();
        let progress = self.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            tokio::time::sleep(QUIET_FOR).await;
            let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(5) };
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                let done = progress.done();
                let rate = done as f64 / start.elapsed().as_secs_f64();
                let line = format!(
                    "{label}: {done}/{total} {unit} ({}/s, {:.0?})",
                    human(rate),
                    start.elapsed()
                );
                let mut err = std::io::stderr().lock();
                if tty {
                    let _ = write!(err, "\r\x1b[K{line}");
                } else {
                    let _ = writeln!(err, "{line}");
                }
                let _ = err.flush();
            }
        });
        Display { task, tty }
    }
}

impl Default for Progress {
    fn default() -> Progress {
        Progress::new()
    }
}

/// `1234567.0` as `1.23 M`.
pub fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}
