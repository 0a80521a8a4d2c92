//! The progress bar on stderr (indicatif), drawn only when stderr is a terminal and `--quiet`
//! was not given, so scripts and pipes see nothing of it.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Elapsed time, bar, percentage, then what the mode says.
const PROGRESS_TEMPLATE: &str = "{elapsed_precise} [{bar:30}] {percent:>3}% {msg}";

/// Redraws per second at most.
const REFRESH_HZ: u8 = 10;

/// A progress bar, or nothing.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    /// Notes are dropped too.
    quiet: bool,
}

impl Progress {
    /// A bar counting to `len`, if `enabled` (not `--quiet`) and stderr is a terminal.
    pub fn new(enabled: bool, len: u64) -> Progress {
        if !enabled || !std::io::stderr().is_terminal() {
            return Progress {
                bar: None,
                quiet: !enabled,
            };
        }
        let style = ProgressStyle::with_template(PROGRESS_TEMPLATE)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(
            Some(len),
            ProgressDrawTarget::stderr_with_hz(REFRESH_HZ),
        )
        .with_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress {
            bar: Some(bar),
            quiet: false,
        }
    }

    /// Moves the bar to `pos` with a message after it.
    pub fn update(&self, pos: u64, message: impl FnOnce() -> String) {
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
            bar.set_message(message());
        }
    }

    /// Changes the length (a new phase).
    pub fn reset(&self, len: u64, message: String) {
        if let Some(bar) = &self.bar {
            bar.set_length(len);
            bar.set_position(0);
            bar.set_message(message);
        }
    }

    /// Prints a line above the bar (or plainly on stderr without one), unless `--quiet`.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None if !self.quiet => eprintln!("{line}"),
            None => {}
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
