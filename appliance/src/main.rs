//! `appliance`: the clinic box's command line.

use anyhow::{Result, bail};
use appliance::{classify_single_cells, expand_inputs, open_bundle, render_text, trusted_keys};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use wbc_shared::classify::Classifier;

#[derive(Parser)]
#[command(name = "appliance", version, about = "White-blood-cell differential appliance")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Classify and describe cell images with the active model (default: the embedded bundle).
    Classify {
        /// Treat each image as one centred cell (as the reference study's demo did).
        #[arg(long)]
        single_cell: bool,
        /// One JSON object per input image per line.
        #[arg(long)]
        json: bool,
        /// Model bundle file (default: the embedded default bundle).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Trusted public key (PEM); may repeat. Default: the default bundle's key.
        #[arg(long)]
        trust: Vec<PathBuf>,
        /// Below this confidence a cell is reported as Unidentified, for review.
        #[arg(long, default_value_t = 0.5)]
        min_confidence: f32,
        /// Images or folders of images.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    match Cli::parse().cmd {
        Cmd::Classify {
            single_cell,
            json,
            bundle,
            trust,
            min_confidence,
            inputs,
        } => {
            if !single_cell {
                bail!(
                    "finding cells in whole microscope fields is not available yet; pass --single-cell for images that each show one centred cell"
                );
            }
            if !(0.0..=1.0).contains(&min_confidence) {
                bail!("--min-confidence must be between 0 and 1, got {min_confidence}");
            }
            let bundle = open_bundle(bundle.as_deref(), &trusted_keys(&trust)?)?;
            let device = burn::tensor::Device::flex();
            tracing::info!(
                backend = "flex (CPU)",
                model_version = bundle.manifest.model_version,
                "model loaded"
            );
            let classifier = Classifier::from_bundle(&bundle, &device)?.with_min_confidence(min_confidence);
            let paths = expand_inputs(&inputs)?;
            let mut failed = 0;
            for (path, r) in classify_single_cells(&classifier, &paths) {
                match r {
                    Ok(img) if json => println!("{}", serde_json::to_string(&img)?),
                    Ok(img) => print!("{}", render_text(&img)),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{}: cannot classify: {e:#}", path.display());
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} images could not be classified", paths.len());
            }
        }
    }
    Ok(())
}
