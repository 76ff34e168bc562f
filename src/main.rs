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
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("loratool: {e}");
            std::process::exit(1);
        }
    }
}

mod cli;
