//! `firmware-config`: device configuration and provisioning (typed TOML configuration,
//! validation, JSON schema, provisioning of a new device). Only the crate exists so far.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("firmware-config has no commands yet: configuration and provisioning are still to be built")
}
