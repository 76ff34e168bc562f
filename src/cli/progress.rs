//! Progress bars on stderr for long commands. indicatif draws nothing when stderr is not a
//! terminal, so logs, pipes and tests see only the summary lines.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use loratool::ops::progress::{Progress, ProgressSink};
use std::sync::Arc;

struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0.reset();
        // Shown from here: before it, the total is unknown and the bar would read 0/0.
        self.0.set_draw_target(ProgressDrawTarget::stderr());
    }

    fn advance(&self, done: u64) {
        self.0.inc(done);
    }
}

/// A byte-counting bar labelled `label`, and the sink to hand to the library. Clear the bar with
/// `finish_and_clear` before printing the summary.
pub fn bytes_bar(label: &str) -> (ProgressBar, ProgressSink) {
    bar(
        label,
        "{msg} [{bar:24}] {bytes}/{total_bytes} {bytes_per_sec} {eta} left",
    )
}

/// A bar counting `unit`s (modules, files), labelled `label`; see [`bytes_bar`].
pub fn count_bar(label: &str, unit: &str) -> (ProgressBar, ProgressSink) {
    bar(
        label,
        &format!("{{msg}} [{{bar:24}}] {{pos}}/{{len}} {unit}, {{eta}} left"),
    )
}

fn bar(label: &str, template: &str) -> (ProgressBar, ProgressSink) {
    let bar = ProgressBar::hidden();
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_string());
    let sink = ProgressSink::new(Arc::new(Bar(bar.clone())));
    (bar, sink)
}
