//! The `loratool` binary: parse arguments, run the command, print one-line errors, exit.

use clap::Parser;

fn main() {
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
