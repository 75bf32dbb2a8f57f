//! The trainer's command line: every subcommand and its documented flags (clap derive). What
//! each does is in `commands`.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use trainer::compact::export::ExportOptions;
use trainer::device::DeviceChoice;

/// The command line.
#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "Fine-tune, evaluate and export WBC classifier bundles"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Fine-tune a model: the compact one (4-bit frozen MobileNetV2 + LoRA + class/attribute
    /// heads), or with `--model mllama --base <HF checkpoint dir>` Llama 3.2 Vision with LoRA
    /// on conversations (image + question → class name and description).
    Train(TrainArgs),
    /// Cut the annotated white cells out of smear fields (Pascal VOC boxes) into a folder of
    /// cell images and an unlabelled `cells.csv` for `eval`.
    CropFields(CropFieldsArgs),
    /// Write what the model sees: the normalised view of every image of a CSV, with the
    /// measured cell sizes in `normalised.csv`.
    Normalise(NormaliseArgs),
    /// Evaluate a bundle on a CSV: the reference study's tables, JSON and a confusion-matrix PNG.
    Eval(EvalArgs),
    /// Merge LoRA into the base, quantize, add self-test images and val figures, and sign.
    Export(ExportArgs),
    /// Make a new version of a compact bundle with the same weights and a new calibration:
    /// temperature, familiarity bank, review rules (blast probability and size), val and
    /// other-site figures, self-test. For when the review rules change and the model does not;
    /// no training and no backbone checkpoint needed.
    Recalibrate(RecalibrateArgs),
    /// Teach a compact bundle one clinic's cells: fine-tune its class head on the cells the
    /// clinic's technicians reviewed (`central export-reviews`), with replay of the bundle's
    /// own training cells so that the in-domain answers hold; add those cells to the
    /// familiarity bank; with `--val`, fit the calibration again and refuse a bundle that costs
    /// in-domain val more than `--max-val-drop`. The signed backbone is kept byte for byte.
    /// The bundle names its clinic; other clinics' appliances refuse it. Ship it with `central
    /// announce --clinic` or on a USB stick.
    Adapt(AdaptArgs),
    /// Sign a trusted key list (key rotation or revocation) with a key the devices trust now.
    /// The devices then trust exactly the listed keys. Put the file on a USB stick or send it
    /// with `central announce --keys`.
    SignKeys(SignKeysArgs),
    /// Sign an instruction to go back from `--from-version` to the older bundle `--to` (the
    /// devices refuse older bundles without one). It applies only while `--from-version` is
    /// active.
    SignRollback(SignRollbackArgs),
    /// Sign a verified bundle again with another key (when keys are rotated).
    Resign(ResignArgs),
    /// Check a Hugging Face mllama checkpoint against transformers' outputs: loads `--model`
    /// (config.json and safetensors, sharded or not), runs the forward pass on the inputs in
    /// `--io` (input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
    /// cross_attention_mask) and compares with its `logits` (and `vision_output` if present).
    /// Exits 0 only when the relative error is at most 1e-4.
    CheckHf(CheckHfArgs),
    /// Write a synthetic mllama checkpoint: random weights (seeded) under the published tensor
    /// names, bf16 shards with an index, `config.json` and (with `--tokenizer`) the tokenizer.
    /// `--shape 11b` is Llama 3.2 11B Vision's published configuration (21 GB); `reduced`
    /// keeps every width and has `--text-layers` decoder layers (the last cross-attention) and
    /// `--vision-layers` local vision layers: for measuring memory and time per layer on a
    /// small machine.
    SynthMllama(SynthMllamaArgs),
    /// Create an ed25519 signing key pair (private key written with mode 0600).
    Keygen(KeygenArgs),
}

/// Arguments of `trainer train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Folder with train.csv and val.csv (or train/ and val/ with one folder per class).
    #[arg(long)]
    pub data: PathBuf,
    /// Model family.
    #[arg(long, value_enum, default_value_t = ModelFamily::Compact)]
    pub model: ModelFamily,
    /// mllama: where the model trains (the compact model trains on the CPU).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
    /// mllama: the base checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long, required_if_eq("model", "mllama"))]
    pub base: Option<PathBuf>,
    /// mllama: LoRA alpha (the adapters are scaled by alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// mllama: dropout on the adapters' input.
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// mllama: where adapters go (comma-separated: text-attention, text-mlp, cross-attention, vision).
    #[arg(long, default_value = "text-attention,text-mlp")]
    pub lora_targets: String,
    /// mllama: samples per optimiser step (gradient accumulation).
    #[arg(long, default_value_t = 8)]
    pub accumulate: usize,
    /// mllama: optimiser steps of linear warm-up before the cosine decay of the learning rate
    /// (default: 5 % of all steps).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// mllama: go on from the checkpoint the run in `--out` left (`--out`/resume), with the same
    /// settings.
    #[arg(long)]
    pub resume: bool,
    /// mllama: also leave a checkpoint every this many optimiser steps (default: at each
    /// epoch's end only).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// mllama: stop after this many optimiser steps, with a checkpoint (`--resume` goes on).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// mllama: the frozen base is held in 4 bits, one scale per this many values (0: f32).
    #[arg(long, default_value_t = 32)]
    pub base_block: u8,
    /// Run directory to write (checkpoint, curves, run.json).
    #[arg(long)]
    pub out: PathBuf,
    /// torchvision MobileNetV2 ImageNet checkpoint (default: $WBC_WEIGHTS_DIR/mobilenet_v2-b0353104.pth).
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// Epochs.
    #[arg(long, default_value_t = 6)]
    pub epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Augmented views of each training image cached per run.
    #[arg(long, default_value_t = 2)]
    pub views: usize,
    /// First backbone block (0-18) that gets LoRA adapters; earlier blocks are cached.
    /// Default 10 (model version 3; version 2 trained blocks 14-18).
    #[arg(long, default_value_t = 10)]
    pub tune_from: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Use at most N training images per class (0 = all), for quick runs.
    #[arg(long, default_value_t = 0)]
    pub max_per_class: usize,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Train on plain centre crops instead of normalised cells (model version 1's recipe).
    #[arg(long)]
    pub no_cell_norm: bool,
    /// Mild colour augmentation only (no blur, resolution loss, noise or JPEG).
    #[arg(long)]
    pub mild_augment: bool,
    /// Micrometres of smear in the model's view: the physical scale, which keeps the cell's
    /// size (e.g. 24; needs each image's pixel size). Default 0: the relative scale, set by
    /// the nucleus.
    #[arg(long, default_value_t = 0.0)]
    pub view_microns: f32,
    /// Fraction of the model input that the nucleus spans (relative scale).
    #[arg(long)]
    pub nucleus_fraction: Option<f32>,
    /// Resolution normalisation: side of the low-resolution view (0 = full resolution).
    #[arg(long)]
    pub detail_side: Option<u32>,
    /// Replace what lies outside the cell with a constant background.
    #[arg(long)]
    pub mask_background: bool,
    /// Show the model the stain-normalised colour view instead of the grey one.
    #[arg(long)]
    pub colour: bool,
    /// Equalise the grey view's histogram.
    #[arg(long)]
    pub equalise: bool,
    /// Train against a source critic on the classes several sources share, with this
    /// weight of its confusion loss once ramped up (0 = none).
    #[arg(long)]
    pub source_adversary: Option<f64>,
    /// MixStyle: mix the feature statistics of cells from different sources, in this
    /// share of the batches (0 = none).
    #[arg(long)]
    pub mixstyle: Option<f64>,
    /// Amplitude mixing: give this share of the training views the Fourier amplitude
    /// (sharpness, texture, contrast) partly of a view from another source (0 = none).
    #[arg(long)]
    pub amplitude_mix: Option<f64>,
    /// Stain density: give this share of the training views a random optical-density curve
    /// (exponent 0.3–1.2 around a red cell's density: paler or darker nuclei, flatter or
    /// harder contrast), so that how dark a nucleus is against its red cells is no cue to a
    /// class (0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub stain_density: f64,
}

/// Arguments of `trainer crop-fields`.
#[derive(clap::Args)]
pub struct CropFieldsArgs {
    /// Folder with `images/` and `annotations/` (VOC XML).
    #[arg(long)]
    pub fields: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Source name written to the CSV.
    #[arg(long, default_value = "fields")]
    pub source: String,
}

/// Arguments of `trainer normalise`.
#[derive(clap::Args)]
pub struct NormaliseArgs {
    /// CSV (or class folder) of cell images.
    #[arg(long)]
    pub csv: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace what lies outside the cell with a constant background.
    #[arg(long)]
    pub mask_background: bool,
    /// Micrometres of smear in view (0 = relative scale, the default).
    #[arg(long, default_value_t = 0.0)]
    pub view_microns: f32,
    /// Take only the dark part of a pale, oversized stained region as the nucleus, as a site
    /// adaptation reads its cells (`CellNorm::dark_nucleus`).
    #[arg(long)]
    pub dark_nucleus: bool,
}

/// Arguments of `trainer eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// Bundle file.
    #[arg(long)]
    pub bundle: PathBuf,
    /// CSV with `path` (relative to the CSV) and optionally `label`, `source`, attributes.
    #[arg(long)]
    pub csv: PathBuf,
    /// Write the JSON report here (the confusion matrix PNG goes beside it).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Trusted public key (PEM); may repeat. Default: the project's default-bundle key.
    #[arg(long)]
    pub trust: Vec<PathBuf>,
    /// all-MiniLM-L6-v2 folder for description similarity (default: $WBC_WEIGHTS_DIR/all-MiniLM-L6-v2 if present).
    #[arg(long)]
    pub minilm: Option<PathBuf>,
    /// Bootstrap resamples for the Mean ± SD table.
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    /// Write one CSV row per cell here: probabilities, familiarity, neighbours' vote, what
    /// was reported and why, measured size.
    #[arg(long)]
    pub cells: Option<PathBuf>,
    /// Where each cell's predicted class comes from: `score` (the most probable class) or, for
    /// mllama bundles, `generate` (the first class name in the generated description, as the
    /// reference study read its answers; answers that name none are counted and scored as
    /// misses).
    #[arg(long, value_enum, default_value_t = trainer::eval::Predict::Score)]
    pub predict: trainer::eval::Predict,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
}

/// Arguments of `trainer export`.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Run directory from `trainer train`.
    #[arg(long)]
    pub run: PathBuf,
    /// Model family of the run.
    #[arg(long, value_enum, default_value_t = ModelFamily::Compact)]
    pub model: ModelFamily,
    /// mllama: the base checkpoint the run was trained on.
    #[arg(long, required_if_eq("model", "mllama"))]
    pub base: Option<PathBuf>,
    /// mllama: where the model is merged and checked (the compact model exports on the CPU).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
    /// mllama: 4-bit group size of the exported projections whose outputs do not divide into
    /// the appliance's blocks of 32 (the others are stored in the appliance's own grid).
    #[arg(long, default_value_t = 32)]
    pub q4_group: usize,
    /// Backbone checkpoint used by the run.
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    #[command(flatten)]
    pub cal: CalibrationArgs,
}

/// Arguments of `trainer recalibrate`.
#[derive(clap::Args)]
pub struct RecalibrateArgs {
    /// Bundle to recalibrate (verified against the trusted keys first).
    #[arg(long)]
    pub bundle: PathBuf,
    /// Trusted public key (PEM); may repeat. Default: the project's default-bundle key ring.
    #[arg(long)]
    pub trust: Vec<PathBuf>,
    #[command(flatten)]
    pub cal: CalibrationArgs,
}

/// Arguments of `trainer adapt`.
#[derive(clap::Args)]
pub struct AdaptArgs {
    /// The compact bundle the clinic runs now (verified against the trusted keys first).
    #[arg(long)]
    pub bundle: PathBuf,
    /// Trusted public key (PEM); may repeat. Default: the project's default-bundle key ring.
    #[arg(long)]
    pub trust: Vec<PathBuf>,
    /// The reviewed cells: a CSV with `path` and `label` columns at least (paths relative to
    /// it; `microns_per_pixel` and `clinic` are read when present).
    #[arg(long)]
    pub csv: PathBuf,
    /// Private signing key (PKCS#8 PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// Model version of the site bundle (above the bundle's).
    #[arg(long)]
    pub model_version: u64,
    /// Bundle file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The clinic the bundle is for (default: the CSV's `clinic` column). Without one, every
    /// clinic's appliance would take it.
    #[arg(long)]
    pub clinic: Option<String>,
    /// In-domain labelled val CSV: the calibration is fitted again on it and its figures are
    /// measured before and after.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Largest loss of in-domain val macro F1, in points, that the site bundle may cost (with
    /// `--val`).
    #[arg(long, default_value_t = 0.5)]
    pub max_val_drop: f64,
    /// Optimiser steps.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Share of the loss carried by the clinic's cells (the rest replays training cells).
    #[arg(long, default_value_t = 0.5)]
    pub site_share: f64,
    /// Pull towards the signed head (weight of the squared distance).
    #[arg(long, default_value_t = 1e-3)]
    pub anchor: f64,
    /// Views of each reviewed cell (1–8: itself, flipped, rotated).
    #[arg(long, default_value_t = 4)]
    pub views: usize,
    /// Views of each reviewed cell that join the familiarity bank (1 to `--views`).
    #[arg(long, default_value_t = 4)]
    pub bank_views: usize,
    /// Turn on the cell normalisation's dark-nucleus rule in the site bundle: for a stain that
    /// colours the red cells like the nucleus (LISC's), so that the view is centred and scaled on
    /// the nucleus rather than on everything stained.
    #[arg(long)]
    pub dark_nucleus: bool,
    /// Training sample list to replay while the backbone's last blocks learn the clinic too
    /// (without it only the class head learns). Needs `--val`.
    #[arg(long)]
    pub replay: Option<PathBuf>,
    /// Training images per class replayed (evenly spaced within each class).
    #[arg(long, default_value_t = 100)]
    pub replay_per_class: usize,
    /// With `--replay`: first backbone block (0-18) that learns.
    #[arg(long, default_value_t = 14)]
    pub tune_from: usize,
    /// With `--replay`: epochs.
    #[arg(long, default_value_t = 6)]
    pub tune_epochs: usize,
    /// With `--replay`: peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub tune_lr: f64,
    /// How many times another class a replayed training blast weighs (a clinic rarely reviews
    /// a blast; the replay keeps the training blasts flagged).
    #[arg(long, default_value_t = 3.0)]
    pub blast_replay_weight: f64,
    /// With `--val`: the share of the val blasts the site bundle must flag (reported Blast, or
    /// set aside with Blast the most probable class); below it nothing is written.
    #[arg(long, default_value_t = 0.97)]
    pub min_blasts_flagged: f64,
    /// With `--val`: no blast guard. By default the signed model is kept beside the taught one
    /// and a cell it calls Blast is held back as a possible blast when the taught model still
    /// gives Blast some probability (fitted on the val blasts)
    #[arg(long)]
    pub no_blast_guard: bool,
    /// With `--val`: fit the familiarity threshold on val alone. By default the reviewed cells
    /// (each against the bank without its own views) may raise it, so that the site's cells,
    /// which lie farther from the training cells than val's do, are not all set aside
    #[arg(long)]
    pub no_site_familiarity: bool,
    /// With `--replay`: augmented views of each reviewed cell.
    #[arg(long, default_value_t = 8)]
    pub tune_views: usize,
}

/// Arguments of `trainer sign-keys`.
#[derive(clap::Args)]
pub struct SignKeysArgs {
    /// Signing key (private, PEM) the devices trust now.
    #[arg(long)]
    pub key: PathBuf,
    /// Higher than every list issued before.
    #[arg(long)]
    pub sequence: u64,
    /// Output file, ending in `.keys.json`.
    #[arg(long)]
    pub out: PathBuf,
    /// Public keys (PEM) to trust from now on.
    #[arg(required = true)]
    pub public_keys: Vec<PathBuf>,
}

/// Arguments of `trainer sign-rollback`.
#[derive(clap::Args)]
pub struct SignRollbackArgs {
    /// Signing key (private, PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// The bundle file to return to.
    #[arg(long)]
    pub to: PathBuf,
    /// The version being left.
    #[arg(long)]
    pub from_version: u64,
    /// Only for this clinic.
    #[arg(long)]
    pub clinic: Option<String>,
    /// Only for this device of the clinic.
    #[arg(long, requires = "clinic")]
    pub device: Option<String>,
    /// Why (shown on the devices and at central).
    #[arg(long)]
    pub reason: String,
    /// Output file, ending in `.rollback.json`.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `trainer resign`.
#[derive(clap::Args)]
pub struct ResignArgs {
    /// The bundle.
    #[arg(long)]
    pub bundle: PathBuf,
    /// Public key (PEM) that verifies it now; may repeat. Default: the release key.
    #[arg(long)]
    pub trust: Vec<PathBuf>,
    /// The new signing key (private, PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// Output bundle file (never overwritten).
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `trainer check-hf`.
#[derive(clap::Args)]
pub struct CheckHfArgs {
    /// Checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Reference inputs and outputs (safetensors).
    #[arg(long)]
    pub io: PathBuf,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
}

/// Arguments of `trainer synth-mllama`.
#[derive(clap::Args)]
pub struct SynthMllamaArgs {
    /// Directory to write (created).
    #[arg(long)]
    pub out: PathBuf,
    /// `11b` (published) or `reduced` (published widths, fewer layers).
    #[arg(long, default_value = "reduced")]
    pub shape: String,
    /// `reduced`: decoder layers (the last is a cross-attention layer).
    #[arg(long, default_value_t = 4)]
    pub text_layers: usize,
    /// `reduced`: local vision layers (two global ones follow).
    #[arg(long, default_value_t = 8)]
    pub vision_layers: usize,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// About this many GB per shard (the published checkpoint uses 5).
    #[arg(long, default_value_t = 5.0)]
    pub shard_gb: f64,
    /// tokenizer.json to copy in (`scripts/fetch-weights.sh` unpacks the published one).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Arguments of `trainer keygen`.
#[derive(clap::Args)]
pub struct KeygenArgs {
    /// Private key file to create (never overwritten); the public key goes to <file>.pub.
    #[arg(long)]
    pub out: PathBuf,
}

/// What a bundle's calibration and figures are made from, for `export` and `recalibrate`.
#[derive(clap::Args)]
pub struct CalibrationArgs {
    /// Private signing key (PKCS#8 PEM, from `trainer keygen`).
    #[arg(long)]
    pub key: PathBuf,
    /// Bundle file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Labelled val CSV: figures for the manifest and the golden self-test images.
    #[arg(long)]
    pub val: PathBuf,
    /// Model version (must increase with every release).
    #[arg(long)]
    pub model_version: u64,
    /// Training sample list: a stratified subset becomes the familiarity (out-of-distribution)
    /// bank. Without it the bundle has no familiarity score.
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Training cells per class in the familiarity bank.
    #[arg(long, default_value_t = 200)]
    pub bank_per_class: usize,
    /// Val quantile of the familiarity score beyond which a cell is Unidentified.
    #[arg(long, default_value_t = 0.99)]
    pub ood_quantile: f64,
    /// Share of the correctly called val blasts whose probability a Blast call must reach
    /// (1 = no blast threshold).
    #[arg(long, default_value_t = 0.98)]
    pub blast_keep: f64,
    /// Share of the correctly called val blasts whose nucleus size (µm, where the pixel size is
    /// known) a Blast call must reach (1 = no size check).
    #[arg(long, default_value_t = 0.99)]
    pub blast_size_keep: f64,
    /// Do not send cells whose class differs from their nearest training cells' vote to review.
    #[arg(long)]
    pub no_agreement: bool,
    /// Unlabelled other-site cells, NAME=CSV (may repeat): their Blast and Unidentified
    /// fractions go into the manifest.
    #[arg(long, value_parser = parse_named)]
    pub other_site: Vec<(String, PathBuf)>,
    /// Turn on the cell normalisation's dark-nucleus rule in the bundle's own view (for a model
    /// trained to answer for the views it makes; `CellNorm::dark_nucleus`).
    #[arg(long)]
    pub dark_nucleus: bool,
}

impl CalibrationArgs {
    /// Applies these settings to export options.
    pub fn apply<'a>(&'a self, o: ExportOptions<'a>) -> ExportOptions<'a> {
        ExportOptions {
            val: Some(&self.val),
            train: self.train.as_deref(),
            bank_per_class: self.bank_per_class,
            ood_quantile: self.ood_quantile,
            require_agreement: !self.no_agreement,
            blast_keep: self.blast_keep,
            blast_size_keep: self.blast_size_keep,
            other_sites: self.other_site.iter().map(|(n, p)| (n.clone(), p.as_path())).collect(),
            dark_nucleus: self.dark_nucleus || o.dark_nucleus,
            ..o
        }
    }
}

/// The model families `train` can fine-tune.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelFamily {
    /// The compact CNN.
    Compact,
    /// Llama 3.2 Vision.
    Mllama,
}

pub fn parse_targets(s: &str) -> Result<wbc_models::mllama::LoraTargets> {
    let mut t = wbc_models::mllama::LoraTargets {
        text_attention: false,
        text_mlp: false,
        cross_attention: false,
        vision: false,
    };
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "text-attention" => t.text_attention = true,
            "text-mlp" => t.text_mlp = true,
            "cross-attention" => t.cross_attention = true,
            "vision" => t.vision = true,
            other => anyhow::bail!(
                "--lora-targets: unknown target {other:?} (text-attention, text-mlp, cross-attention, vision)"
            ),
        }
    }
    if t == (wbc_models::mllama::LoraTargets {
        text_attention: false,
        text_mlp: false,
        cross_attention: false,
        vision: false,
    }) {
        anyhow::bail!("--lora-targets names no target");
    }
    Ok(t)
}

fn parse_named(s: &str) -> Result<(String, PathBuf)> {
    let (name, path) = s
        .split_once('=')
        .with_context(|| format!("expected NAME=CSV, got {s:?}"))?;
    if name.is_empty() || path.is_empty() {
        anyhow::bail!("expected NAME=CSV, got {s:?}");
    }
    Ok((name.to_string(), PathBuf::from(path)))
}
