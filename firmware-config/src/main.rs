//! `firmware-config`: checks an appliance configuration and provisions new devices.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "firmware-config",
    about = "Appliance configuration and provisioning",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checks an appliance configuration file (TOML); says what is wrong, with the key.
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Prints the configuration's JSON schema.
    Schema,
    /// Provisions a new device: configuration, MQTT password (0600), the trusted update keys,
    /// the broker's password and ACL lines, the systemd unit and the USB-update udev rule.
    Provision {
        /// Clinic id.
        #[arg(long)]
        clinic: String,
        /// Device id, unique within the clinic.
        #[arg(long)]
        device: String,
        /// Folder to write into (must not hold a provisioned device).
        #[arg(long)]
        out: PathBuf,
        /// The lab's MQTT broker.
        #[arg(long, default_value = "mqtt.lab.example")]
        broker_host: String,
        /// Its TLS port.
        #[arg(long, default_value_t = 8883)]
        broker_port: u16,
        /// Where the files go on the device.
        #[arg(long, default_value = "/etc/wbc")]
        install_dir: PathBuf,
        /// The lab's update signing key (public, PEM, from `trainer keygen`); may repeat.
        /// Without one the device trusts only the release key for updates.
        #[arg(long)]
        update_key: Vec<PathBuf>,
        /// The language of its pages and slide reports: en, fr or pt (each web account may
        /// choose its own).
        #[arg(long, default_value = "en")]
        language: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Check { file } => {
            let c = firmware_config::check(&file)?;
            println!(
                "{}: valid (clinic {}, device {}, uplink {})",
                file.display(),
                c.clinic,
                c.device,
                if c.uplink.is_some() { "configured" } else { "none" }
            );
        }
        Command::Schema => println!("{}", serde_json::to_string_pretty(&wbc_config::schema())?),
        Command::Provision {
            clinic,
            device,
            out,
            broker_host,
            broker_port,
            install_dir,
            update_key,
            language,
        } => {
            let no_keys = update_key.is_empty();
            firmware_config::provision(
                &firmware_config::Provision {
                    clinic,
                    device,
                    broker_host,
                    broker_port,
                    install_dir,
                    update_keys: update_key,
                    language,
                },
                &out,
            )?;
            println!(
                "provisioned into {}: {}",
                out.display(),
                firmware_config::FILES.join(", ")
            );
            println!(
                "the MQTT password is in mqtt.password only (mode 0600); append mosquitto.passwd and mosquitto.acl on the broker"
            );
            if no_keys {
                println!("no --update-key given: the device trusts only the release key for model updates");
            }
        }
    }
    Ok(())
}
