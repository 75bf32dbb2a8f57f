//! `appliance`: the clinic box's command line.

use anyhow::{Context, Result, bail};
use appliance::{
    classify_fields, classify_single_cells, evaluate_finder, expand_inputs, open_bundle, render_text, trusted_keys,
};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use wbc_cells::finder::FinderConfig;
use wbc_models::classify::Classifier;

#[derive(Parser)]
#[command(name = "appliance", version, about = "White-blood-cell differential appliance")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Find, classify and describe the white cells of microscope fields (or, with
    /// `--single-cell`, of single-cell images) with the active model (default: the embedded
    /// bundle).
    Classify {
        /// Treat each image as one centred cell (as the reference study's demo did) instead of
        /// a field in which to find the white cells.
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
        /// Pixel size of the images in micrometres (the camera's calibration at this
        /// objective). Default: the pixel size of the model's reference images, recorded in
        /// the bundle.
        #[arg(long)]
        microns_per_pixel: Option<f32>,
        /// Compute backend.
        #[arg(long, value_enum, default_value_t = appliance::backend::BackendChoice::Auto)]
        backend: appliance::backend::BackendChoice,
        /// First adapt to the site from the unlabelled images in this folder (subfolders
        /// included; single cells with `--single-cell`, fields otherwise), as the daemon does
        /// from the cells it sees, then classify. The signed weights do not change.
        #[arg(long, value_name = "DIR")]
        adapt_to: Option<PathBuf>,
        /// Images or folders of images.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// The daemon: watches the inbox, serves the web UI, counts slides. With no configuration
    /// it runs on the embedded defaults (embedded model, `./appliance-data`, its `inbox/`, the
    /// web UI on 127.0.0.1:8080).
    Run {
        /// Configuration file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Where the models stand: the active model (verified and self-tested again, as at every
    /// start), its fallback, the trusted keys and the latest model events.
    Models {
        /// Configuration file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply update files while the daemon is stopped (it applies those in its USB folder by
    /// itself): signed key lists (`*.keys.json`), bundles (`*.bundle`) and signed rollback
    /// instructions (`*.rollback.json`). Each is verified and a bundle self-tested before it
    /// becomes active; what happened is recorded and sent to central.
    Update {
        /// Configuration file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Update files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Hash a password (read from standard input) for a `[[web.users]]` entry.
    HashPassword,
    /// Measure the cell finder on annotated fields (Pascal VOC `WBC` boxes): recall and
    /// precision at an IoU threshold.
    EvalFinder {
        /// Folder with `images/` and `annotations/`.
        #[arg(long)]
        fields: PathBuf,
        /// Pixel size of the fields (µm). Default: from the annotated red cells (7.5 µm).
        #[arg(long)]
        microns_per_pixel: Option<f32>,
        /// IoU at which a found box matches an annotated one.
        #[arg(long, default_value_t = 0.5)]
        min_iou: f32,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn load_config(path: Option<&std::path::Path>) -> Result<appliance::config::Config> {
    match path {
        Some(p) => Ok(appliance::config::Config::load(p)?),
        None => Ok(appliance::config::Config::default()),
    }
}

/// The store and the model store, for commands run while the daemon is stopped.
fn open_offline(
    config: &appliance::config::Config,
) -> Result<(
    std::sync::Arc<appliance::store::Store>,
    std::sync::Arc<appliance::app::ModelStore>,
)> {
    let store = std::sync::Arc::new(appliance::store::Store::open(
        &config.data_dir.join("store"),
        appliance::store::Identity {
            clinic: config.clinic.clone(),
            device: config.device.clone(),
        },
        config.store.clone(),
    )?);
    let backend = appliance::backend::select(config.backend)?;
    let (models, _) = appliance::open_models(config, store.clone(), backend)?;
    Ok((store, models))
}

/// Refuses a pixel size that cannot be one.
fn check_pixel_size(um: Option<f32>) -> Result<()> {
    match um {
        Some(um) if !(um.is_finite() && um > 0.0 && um < 100.0) => {
            bail!("--microns-per-pixel must be a positive number of micrometres, got {um}")
        }
        _ => Ok(()),
    }
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
            microns_per_pixel,
            backend,
            adapt_to,
            inputs,
        } => {
            if !(0.0..=1.0).contains(&min_confidence) {
                bail!("--min-confidence must be between 0 and 1, got {min_confidence}");
            }
            check_pixel_size(microns_per_pixel)?;
            let bundle = open_bundle(bundle.as_deref(), &trusted_keys(&trust)?)?;
            let appliance::backend::Backend { device, name } = appliance::backend::select(backend)?;
            tracing::info!(backend = %name, model_version = bundle.manifest.model_version, "model loaded");
            let mut classifier = Classifier::from_bundle(&bundle, &device)?
                .with_min_confidence(min_confidence)
                .with_microns_per_pixel(microns_per_pixel);
            // The model is built: the bundle's bytes (several GB for a full-size model) go.
            let manifest = bundle.manifest.clone();
            drop(bundle);
            let paths = expand_inputs(&inputs)?;
            let field_um = || match microns_per_pixel {
                Some(um) => um,
                None => {
                    let um = manifest
                        .preprocess
                        .cell
                        .as_ref()
                        .and_then(|c| c.pixel_size(None))
                        .unwrap_or(0.143);
                    tracing::warn!(
                        microns_per_pixel = um,
                        "no pixel size given for these fields (--microns-per-pixel): assuming the model's reference"
                    );
                    um
                }
            };
            if let Some(dir) = adapt_to {
                let finder = FinderConfig::default();
                let fields = (!single_cell).then(|| (field_um(), &finder));
                let adaptation = appliance::adapt_to_site(&classifier, &dir, fields)
                    .with_context(|| format!("adapting to the site's images in {}", dir.display()))?;
                eprintln!(
                    "adapted to {} cells of the site in {} (their class mix as the adapted model sees it: {})",
                    adaptation.cells,
                    dir.display(),
                    appliance::render_mix(&adaptation.class_mix)
                );
                classifier = classifier.with_adaptation(Some(adaptation))?;
            }
            let results = if single_cell {
                classify_single_cells(&classifier, &paths)
            } else {
                classify_fields(&classifier, &paths, field_um(), &FinderConfig::default())
            };
            let mut failed = 0;
            for (path, r) in results {
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
        Cmd::Run { config } => {
            appliance::daemon::run(load_config(config.as_deref())?, wbc_protocol::shutdown::signal())?;
        }
        Cmd::Models { config, json } => {
            let config = load_config(config.as_deref())?;
            let (store, models) = open_offline(&config)?;
            let status = models.status();
            let log = store.model_log(10)?;
            models.close()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"status": status, "log": log}))?
                );
            } else {
                println!("{}", appliance::models::describe(&status));
                for e in log {
                    println!(
                        "  {} {} v{}: {}",
                        e.at, e.message.event, e.message.model_version, e.message.detail
                    );
                }
            }
        }
        Cmd::Update { config, files } => {
            let config = load_config(config.as_deref())?;
            let (_store, models) = open_offline(&config)?;
            let outcomes = appliance::update::apply_files(&models, &files, |p| p.display().to_string());
            let mut refused = 0;
            for (p, o) in &outcomes {
                match o {
                    appliance::models::Outcome::Active(c) => {
                        println!("{}: active, model version {}", p.display(), c.model_version)
                    }
                    appliance::models::Outcome::Skipped(why) => println!("{}: {why}", p.display()),
                    appliance::models::Outcome::Rejected(why) => {
                        refused += 1;
                        println!("{}: REFUSED: {why}", p.display())
                    }
                }
            }
            println!("{}", appliance::models::describe(&models.status()));
            models.close()?;
            if refused > 0 {
                bail!(
                    "{refused} of {} update files were refused; the model in use is a verified one",
                    files.len()
                );
            }
        }
        Cmd::HashPassword => {
            let mut pw = String::new();
            std::io::stdin().read_line(&mut pw)?;
            let pw = pw.trim_end_matches(['\r', '\n']);
            if pw.is_empty() {
                bail!("no password on standard input");
            }
            println!("{}", appliance::config::hash_password(pw)?);
        }
        Cmd::EvalFinder {
            fields,
            microns_per_pixel,
            min_iou,
            json,
        } => {
            check_pixel_size(microns_per_pixel)?;
            if !(0.0..=1.0).contains(&min_iou) {
                bail!("--min-iou must be between 0 and 1, got {min_iou}");
            }
            let r = evaluate_finder(&fields, microns_per_pixel, &FinderConfig::default(), min_iou)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} fields ({} unreadable), {} annotated white cells, {} found ({} cut by the edge)\n\
                     at IoU {}: recall {:.3}, precision {:.3} ({} true positives, {} false positives, {} missed)\n\
                     pixel size {:.4} µm ({})",
                    r.fields,
                    r.unreadable,
                    r.annotated,
                    r.found,
                    r.edge_cut,
                    r.min_iou,
                    r.recall,
                    r.precision,
                    r.matches.true_positives,
                    r.matches.false_positives,
                    r.matches.false_negatives,
                    r.microns_per_pixel,
                    r.pixel_size_from
                );
                for e in &r.errors {
                    println!(
                        "  {}: {} found that match no annotated cell, {} annotated missed",
                        e.field,
                        e.false_cells.len(),
                        e.missed.len()
                    );
                }
            }
        }
    }
    Ok(())
}
