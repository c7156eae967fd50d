//! The interactive terminal: a prompt with line editing, history and Tab completion
//! (reedline), on a thread of its own. Everything the session prints goes through reedline's
//! external printer, which shows it above the line being typed and leaves that line intact;
//! a submitted line is redrawn with the time it was sent. If the session ends while a line is
//! being typed (the server shut down), reedline is told to stop reading (its break signal)
//! and gives the terminal back itself before the process exits.

use std::borrow::Cow;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use reedline::{
    ColumnarMenu, Completer, CompletionResult, Emacs, ExternalPrinter, FileBackedHistory, KeyCode,
    KeyModifiers, MenuBuilder, Prompt, PromptEditMode, PromptHistorySearch, Reedline,
    ReedlineEvent, ReedlineMenu, Signal, Span, Suggestion, default_emacs_keybindings,
};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Notify, mpsc};

use crate::cli::{Command, Conversation, Names, local_time, now_ms, printable};

/// Lines typed while the session cannot take them (it is reconnecting) wait, at most this
/// many; past that a line is refused with a notice.
pub const QUEUED_LINES: usize = 100;

/// Entries kept in the history file.
const HISTORY_SIZE: usize = 1000;

/// The running terminal front end; [`Terminal::finish`] (or dropping it) gives the terminal
/// back as it was.
pub struct Terminal {
    shared: Arc<Shared>,
    printer: Option<std::thread::JoinHandle<()>>,
    /// Set to make reedline stop reading (it then leaves raw mode).
    stop: Arc<AtomicBool>,
    /// Says when the line thread has ended.
    ended: Option<std::sync::mpsc::Receiver<()>>,
}

/// What the line thread and the printer thread share.
struct Shared {
    /// The line thread is reading lines: text goes through reedline. Once false, text is
    /// written directly.
    reading: Mutex<bool>,
    /// The peer the line being typed goes to, for the prompt a submitted line is redrawn with.
    peer: Mutex<Option<String>>,
}

impl Shared {
    fn reading(&self) -> std::sync::MutexGuard<'_, bool> {
        self.reading.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What [`start`] hands the session.
pub struct Started {
    /// The front end, to finish at the end.
    pub terminal: Terminal,
    /// The commands typed.
    pub commands: mpsc::Receiver<Command>,
    /// Text to show above the input line.
    pub printer: mpsc::Sender<String>,
}

/// Starts the prompt and the printer. `quit` is notified when the user is done (EXIT, Ctrl-D,
/// Ctrl-C), so that a reconnecting session stops waiting; `history` is the history file, if
/// any; `colour` colours the prompt.
///
/// # Errors
/// The history file cannot be used, as one line.
pub fn start(
    names: Arc<Names>,
    quit: Arc<Notify>,
    history: Option<PathBuf>,
    colour: bool,
) -> Result<Started, String> {
    let shared = Arc::new(Shared { reading: Mutex::new(true), peer: Mutex::new(None) });
    // A rendezvous: a hand-over returns once reedline has taken the text (it draws it at
    // once), so when the printer thread is done, everything is on the screen.
    let external = ExternalPrinter::<String>::new(0);
    let to_reedline = external.sender();
    let stop = Arc::new(AtomicBool::new(false));
    let mut keys = default_emacs_keybindings();
    keys.add_binding(
        KeyModifiers::NONE,
        KeyCode::Tab,
        ReedlineEvent::UntilFound(vec![
            ReedlineEvent::Menu("completion".into()),
            ReedlineEvent::MenuNext,
        ]),
    );
    let mut editor = Reedline::create()
        .with_edit_mode(Box::new(Emacs::new(keys)))
        .with_completer(Box::new(Completion { names }))
        .with_highlighter(Box::new(Plain))
        .with_menu(ReedlineMenu::EngineCompleter(Box::new(
            ColumnarMenu::default().with_name("completion"),
        )))
        .with_quick_completions(true)
        .with_partial_completions(true)
        .with_ansi_colors(colour)
        .with_external_printer(external)
        .with_break_signal(stop.clone())
        // How soon text handed over is drawn, and a stop noticed.
        .with_poll_interval(Duration::from_millis(20))
        .with_transient_prompt(Box::new(ChatPrompt { shared: shared.clone(), sent: true }))
        // A line typed with a space first stays out of the history, as in a shell.
        .with_history_exclusion_prefix(Some(" ".into()));
    if let Some(path) = history {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let history = FileBackedHistory::with_file(HISTORY_SIZE, path.clone())
            .map_err(|e| format!("cannot use the history file {}: {e}", path.display()))?;
        editor = editor.with_history(Box::new(history));
    }

    let (print_tx, print_rx) = mpsc::channel::<String>(256);
    let printer = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("relay-printer".into())
            .spawn(move || print(print_rx, &shared, &to_reedline))
            .map_err(|e| format!("cannot start the terminal: {e}"))?
    };

    let (command_tx, commands) = mpsc::channel(QUEUED_LINES);
    let notices = print_tx.downgrade();
    let (ended_tx, ended) = std::sync::mpsc::channel();
    let lines = {
        let shared = shared.clone();
        move || {
            let mut conversation = Conversation::default();
            let prompt = ChatPrompt { shared: shared.clone(), sent: false };
            let mut failures = 0;
            loop {
                *shared.peer.lock().unwrap_or_else(PoisonError::into_inner) =
                    conversation.peer().map(str::to_string);
                let command = match editor.read_line(&prompt) {
                    Ok(Signal::Success(line)) => {
                        failures = 0;
                        conversation.command(&line)
                    }
                    // The session is over (the server shut down, say): leave the line as it
                    // is, and go to the next.
                    Ok(Signal::ExternalBreak(_)) => {
                        write_out("\r\n");
                        break;
                    }
                    // Ctrl-C or Ctrl-D: the user is done.
                    Ok(_) => Command::Exit,
                    // The terminal did not answer in time (reedline asks it where the cursor
                    // is; a slow link may take a while): what was typed is kept, try again.
                    // One that fails over and over is gone.
                    Err(_) if failures < 3 => {
                        failures += 1;
                        continue;
                    }
                    Err(_) => Command::Exit,
                };
                if command == Command::Exit {
                    quit.notify_one();
                    let _ = command_tx.blocking_send(command);
                    break;
                }
                match command_tx.try_send(command) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        if let Some(printer) = notices.upgrade() {
                            // Never wait on the printer here: it may be waiting on reedline.
                            let _ = printer.try_send(format!(
                                "! not connected: that line was not sent ({QUEUED_LINES} lines \
                                 are waiting already)\n"
                            ));
                        }
                    }
                    Err(TrySendError::Closed(_)) => break,
                }
            }
            // From now on text is written directly; text being handed to reedline comes back
            // to the printer when reedline goes.
            *shared.reading() = false;
            drop(editor);
            let _ = ended_tx.send(());
        }
    };
    std::thread::Builder::new()
        .name("relay-terminal".into())
        .spawn(lines)
        .map_err(|e| format!("cannot start the terminal: {e}"))?;
    Ok(Started {
        terminal: Terminal { shared, printer: Some(printer), stop, ended: Some(ended) },
        commands,
        printer: print_tx,
    })
}

/// The printer thread: text from the session to reedline while it reads lines, else
/// straight to stdout.
fn print(mut from: mpsc::Receiver<String>, shared: &Shared, to_reedline: &SyncSender<String>) {
    while let Some(mut text) = from.blocking_recv() {
        // Whatever else is waiting goes in the same redraw.
        while text.len() < 64 * 1024 {
            match from.try_recv() {
                Ok(more) => text.push_str(&more),
                Err(_) => break,
            }
        }
        if *shared.reading() {
            // Waits until reedline takes it; reedline gone, it comes back.
            match to_reedline.send(text) {
                Ok(()) => continue,
                Err(back) => text = back.0,
            }
        }
        write_out(&text);
    }
}

fn write_out(text: &str) {
    let mut out = std::io::stdout();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// The history file: `RELAY_HISTORY` (empty: none), else `$XDG_STATE_HOME/relay/history`
/// (`~/.local/state/relay/history`).
pub fn history_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("RELAY_HISTORY") {
        return (!path.is_empty()).then(|| PathBuf::from(path));
    }
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?)
            .join(".local")
            .join("state"),
    };
    Some(base.join("relay").join("history"))
}

impl Terminal {
    /// Waits for everything handed to the printer to be on the screen, then gives the
    /// terminal back. Drop every [`Output`](crate::cli::Output) first: the printer ends with
    /// the last one.
    pub fn finish(mut self) {
        if let Some(printer) = self.printer.take() {
            let _ = printer.join();
        }
        self.restore();
    }

    /// Stops reedline if it is still reading (the session ended while a line was being
    /// typed) and waits for it to give the terminal back.
    fn restore(&mut self) {
        let Some(ended) = self.ended.take() else { return };
        self.stop.store(true, Ordering::SeqCst);
        // reedline looks at the stop every poll interval; if it is stuck (a terminal that
        // does not answer), leave raw mode here.
        if ended.recv_timeout(Duration::from_secs(3)).is_err() && *self.shared.reading() {
            let _ = crossterm::terminal::disable_raw_mode();
            write_out("\r\n");
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The prompt: `NAME> ` in a conversation with NAME, else `> `; a submitted line is redrawn
/// after the time it was sent (`sent`).
struct ChatPrompt {
    shared: Arc<Shared>,
    sent: bool,
}

impl Prompt for ChatPrompt {
    fn render_prompt_left(&self) -> Cow<'_, str> {
        let peer = self.shared.peer.lock().unwrap_or_else(PoisonError::into_inner);
        let peer = peer.as_deref().map(|p| printable(p.as_bytes())).unwrap_or_default();
        match self.sent {
            true => Cow::Owned(format!("{} {peer}", local_time(now_ms()))),
            false => Cow::Owned(peer),
        }
    }

    fn render_prompt_right(&self) -> Cow<'_, str> {
        Cow::Borrowed("")
    }

    fn render_prompt_indicator(&self, _: PromptEditMode) -> Cow<'_, str> {
        Cow::Borrowed("> ")
    }

    fn render_prompt_multiline_indicator(&self) -> Cow<'_, str> {
        Cow::Borrowed("… ")
    }

    fn render_prompt_history_search_indicator(&self, search: PromptHistorySearch) -> Cow<'_, str> {
        Cow::Owned(format!("(search: {}) ", search.term))
    }

    fn get_prompt_color(&self) -> reedline::Color {
        reedline::Color::Cyan
    }

    fn get_indicator_color(&self) -> reedline::Color {
        reedline::Color::Cyan
    }
}

/// The line being typed, as typed: in the terminal's own colours (reedline's default paints
/// it white, unreadable on a light background).
struct Plain;

impl reedline::Highlighter for Plain {
    fn highlight(&self, line: &str, _cursor: usize) -> reedline::StyledText {
        let mut text = reedline::StyledText::new();
        text.push((Default::default(), line.to_string()));
        text
    }
}

/// Tab completion: commands as the first word, names online after the ones that take a name.
struct Completion {
    names: Arc<Names>,
}

/// The commands completed as the first word.
const COMMANDS: [&str; 10] =
    ["send", "list", "help", "EXIT", "/msg", "/send", "/list", "/help", "/exit", "/quit"];

/// The commands whose next word is a name.
const TAKE_A_NAME: [&str; 7] = ["send", "list", "/msg", "/m", "/query", "/send", "/list"];

impl Completer for Completion {
    fn complete(&mut self, line: &str, pos: usize) -> CompletionResult {
        let before = line.get(..pos).unwrap_or(line);
        let start = before.rfind(char::is_whitespace).map_or(0, |at| at + 1);
        let word = &before[start..];
        let words: Vec<String> = match before[..start].split_whitespace().collect::<Vec<_>>()[..] {
            [] => COMMANDS.iter().filter(|c| c.starts_with(word)).map(|c| c.to_string()).collect(),
            [command] if TAKE_A_NAME.contains(&command) => {
                // Ask for a fresh list for the next Tab; this one uses what is known.
                self.names.wanted.notify_one();
                self.names.snapshot().into_iter().filter(|name| name.starts_with(word)).collect()
            }
            _ => Vec::new(),
        };
        if words.is_empty() {
            // Nothing to offer: the word itself, unchanged. (With no suggestion at all,
            // reedline leaves its menu open and the next Enter only closes it.)
            return CompletionResult::fresh(vec![Suggestion {
                value: word.to_string(),
                span: Span { start, end: pos },
                ..Suggestion::default()
            }]);
        }
        let suggestions: Vec<Suggestion> = words
            .into_iter()
            .map(|value| Suggestion {
                value,
                span: Span { start, end: pos },
                append_whitespace: true,
                ..Suggestion::default()
            })
            .collect();
        CompletionResult::fresh(suggestions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(names: &[&str], line: &str) -> Vec<String> {
        let shared = Arc::new(Names::default());
        shared.replace(names.iter().map(|n| n.to_string()).collect());
        let mut completion = Completion { names: shared };
        completion
            .complete(line, line.len())
            .suggestions()
            .iter()
            .map(|s| s.value.clone())
            .collect()
    }

    #[test]
    fn tab_completes_commands_then_names() {
        assert_eq!(complete(&[], "/m"), ["/msg"]);
        assert_eq!(complete(&[], "se"), ["send"]);
        assert_eq!(complete(&["bob", "bea", "carol"], "/msg b"), ["bea", "bob"]);
        assert_eq!(complete(&["bob", "carol"], "send c"), ["carol"]);
        // The message is not completed: the word stays as it is.
        assert_eq!(complete(&["bob"], "send bob b"), ["b"]);
    }
}
