//! `loratool meta`: flags, the metadata listing and the summary of an edit.

use clap::Args;
use loratool::ops::meta::{edit_metadata, read_metadata, MetaChange, MetaEdit, MetaOutput};
use loratool::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct MetaArgs {
    /// A .safetensors file. Without an edit, its metadata is printed.
    pub input: PathBuf,
    /// Add or replace a metadata key (split at the first '='; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
    pub set: Vec<(String, String)>,
    /// Remove a metadata key (repeatable).
    #[arg(long = "unset", value_name = "KEY")]
    pub unset: Vec<String>,
    /// Remove kohya's training details (every ss_* key but ss_network_*, ss_base_model_version,
    /// ss_v2 and ss_output_name; sshs_legacy_hash); modelspec.* and other keys stay.
    #[arg(long)]
    pub strip_training: bool,
    /// Output .safetensors file (tensors and data copied unchanged).
    #[arg(short = 'o', long = "output", conflicts_with = "in_place")]
    pub output: Option<PathBuf>,
    /// Replace the input itself (written beside it, then renamed over it atomically).
    #[arg(long)]
    pub in_place: bool,
    /// Overwrite an existing output.
    #[arg(long)]
    pub force: bool,
    /// Print the resulting metadata (and the changes) as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_set(arg: &str) -> std::result::Result<(String, String), String> {
    MetaEdit::parse_set(arg).map_err(|e| e.to_string())
}

pub fn run(args: MetaArgs) -> Result<i32> {
    let edit = MetaEdit {
        set: args.set,
        unset: args.unset,
        strip_training: args.strip_training,
    };
    let output = match (args.output, args.in_place) {
        (Some(path), _) => {
            if same_path(&path, &args.input) {
                return Err(Error::Invalid(format!(
                    "{}: refusing to write over the input file (use --in-place to edit it in place)",
                    path.display()
                )));
            }
            MetaOutput::File {
                path,
                force: args.force,
            }
        }
        (None, true) => MetaOutput::InPlace,
        (None, false) if edit.is_empty() => {
            let metadata = read_metadata(&args.input)?;
            if args.json {
                print_json(&serde_json::json!({
                    "path": args.input.display().to_string(),
                    "metadata": metadata,
                }));
            } else {
                print!("{}", listing(&metadata));
            }
            return Ok(0);
        }
        (None, false) => {
            return Err(Error::Invalid(
                "--set, --unset and --strip-training need -o OUT or --in-place".into(),
            ))
        }
    };
    let report = edit_metadata(&args.input, &edit, &output)?;
    for key in &report.absent {
        eprintln!(
            "loratool: warning: {}: no metadata key '{key}' to unset",
            args.input.display()
        );
    }
    if args.json {
        print_json(&serde_json::json!({
            "path": args.input.display().to_string(),
            "output": report.output.as_ref().map(|p| p.display().to_string()),
            "changes": report.changes,
            "metadata": report.metadata,
        }));
        return Ok(0);
    }
    for change in &report.changes {
        println!("{}", describe(change));
    }
    let keys = match report.metadata.len() {
        1 => "1 metadata key".to_string(),
        n => format!("{n} metadata keys"),
    };
    match (&report.output, output) {
        (None, _) => println!("{}: nothing to change", args.input.display()),
        (Some(_), MetaOutput::InPlace) => println!(
            "edited {} in place ({keys}; tensors unchanged)",
            args.input.display()
        ),
        (Some(path), MetaOutput::File { .. }) => {
            println!("wrote {} ({keys}; tensors unchanged)", path.display())
        }
    }
    Ok(0)
}

/// True when both paths name the same existing file (the library refuses hard links too; this
/// only adds the --in-place hint).
fn same_path(a: &Path, b: &Path) -> bool {
    matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON serializes")
    );
}

/// One `key: value` line per key, in key order; line breaks inside values are shown as `\n`.
fn listing(metadata: &BTreeMap<String, String>) -> String {
    metadata
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", one_line(v)))
        .collect()
}

fn describe(change: &MetaChange) -> String {
    match (&change.before, &change.after) {
        (None, Some(new)) => format!("+ {}: {}", change.key, one_line(new)),
        (Some(_), Some(new)) => format!("~ {}: {}", change.key, one_line(new)),
        _ => format!("- {}", change.key),
    }
}

fn one_line(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}
