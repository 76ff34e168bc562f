//! The `loratool` binary: parse arguments, run the command, print one-line errors, exit.

use clap::Parser;

fn main() {
    // A file-size limit (ulimit -f, quotas) must surface as an I/O error that removes the temp
    // file, not as SIGXFSZ killing the process with a half-written file left behind.
    #[cfg(unix)]
    // SAFETY: setting a signal to SIG_IGN at startup, before any thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // Streaming commands allocate and free tensor-sized buffers over and over. glibc hands large
    // blocks straight back to the kernel, so every tensor paid for fresh zeroed pages (measured:
    // 10 s of system time in a 2 GB merge). Keeping freed blocks in the heap reuses them instead.
    // One arena: buffers are allocated on worker threads and freed on the writer thread, and
    // per-thread arenas each kept their own high-water mark (SD1.5 merge: 274 → 195 MB peak RSS);
    // the allocations are few and large, so the shared lock costs nothing measurable.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any allocation-heavy work.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // SIGINT, SIGTERM and SIGHUP remove unfinished outputs, print one line and exit 128 + n.
    if let Err(e) = loratool::tensors::clean_up_on_signals() {
        eprintln!("loratool: cannot handle signals: {e}");
        std::process::exit(1);
    }
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(e),
    };
    match cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("loratool: {e}");
            std::process::exit(1);
        }
    }
}

/// Help and version go out as clap prints them; a usage error is one line, like every other
/// error: clap's message and its hint (`[possible values: …]`, a similar flag), exit status 2.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let rendered = e.render().to_string();
    let parts: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect();
    eprintln!("loratool: {}", parts.join(" "));
    std::process::exit(2);
}

mod cli;
