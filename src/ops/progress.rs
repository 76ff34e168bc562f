//! How far a long operation has got, for a caller that wants to show it. The library only counts;
//! drawing a bar is the command layer's business (`cli::progress`).

use std::fmt;
use std::sync::Arc;

/// Receives the amount of work ahead and the work done, from any thread.
pub trait Progress: Send + Sync {
    /// Called once, before the work starts, with its total (bytes for merges).
    fn start(&self, total: u64);
    /// Called as work completes, with the amount just done.
    fn advance(&self, done: u64);
}

/// An optional [`Progress`] carried in an operation's options; silent when empty.
#[derive(Clone, Default)]
pub struct ProgressSink(Option<Arc<dyn Progress>>);

impl ProgressSink {
    pub fn new(progress: Arc<dyn Progress>) -> ProgressSink {
        ProgressSink(Some(progress))
    }

    pub fn start(&self, total: u64) {
        if let Some(p) = &self.0 {
            p.start(total);
        }
    }

    pub fn advance(&self, done: u64) {
        if let Some(p) = &self.0 {
            p.advance(done);
        }
    }
}

impl fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "ProgressSink(..)"
        } else {
            "ProgressSink(none)"
        })
    }
}
