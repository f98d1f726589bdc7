//! Writes the generated CRD YAML (`crds/yaml/`, and the Helm chart's copy in
//! `charts/runv/crds/`, which Helm installs as it is) and the field reference
//! in `docs/api.md`, or with `--check` fails when the committed copies are
//! stale.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use runv_crds::generate;

/// Generate runv's CRDs and API field reference.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Repository root (defaults to the one this crate was built from).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Do not write; exit 1 if any generated file differs from what is committed.
    #[arg(long)]
    check: bool,
    /// Print the CRDs as one YAML stream to stdout instead of writing files.
    #[arg(long, conflicts_with = "check")]
    stdout: bool,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("crdgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<bool> {
    if args.stdout {
        for crd in generate::crds() {
            print!("---\n{}", generate::crd_yaml(&crd)?);
        }
        return Ok(true);
    }
    let root = args
        .root
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    let mut outputs = Vec::new();
    for crd in generate::crds() {
        let yaml = generate::crd_yaml(&crd)?;
        for dir in ["crds/yaml", "charts/runv/crds"] {
            let path = root.join(dir).join(generate::file_name(&crd));
            outputs.push((path, yaml.clone()));
        }
    }
    let docs_path = root.join("docs/api.md");
    let docs = std::fs::read_to_string(&docs_path)
        .with_context(|| format!("reading {}", docs_path.display()))?;
    let Some(spliced) = generate::splice_docs(&docs) else {
        bail!(
            "{} lacks the markers {} and {}",
            docs_path.display(),
            generate::DOCS_BEGIN,
            generate::DOCS_END
        );
    };
    outputs.push((docs_path, spliced));

    let mut fresh = true;
    for (path, content) in outputs {
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == content {
            continue;
        }
        if args.check {
            eprintln!(
                "crdgen: {} is stale; run `cargo run -p runv-crds --bin crdgen` and commit the result",
                path.display()
            );
            fresh = false;
        } else {
            std::fs::write(&path, content)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(fresh)
}
