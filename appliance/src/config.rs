//! The daemon's configuration: the types, defaults and checks live in `wbc-config` (shared with
//! firmware-config); what needs the appliance's runtime (the first-run account) is here.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use wbc_config::{Config, ConfigError, WebConfig, schema};
pub use wbc_web::auth::{User, verify_password};

/// Hashes a password for the configuration (Argon2id, random salt).
pub fn hash_password(password: &str) -> Result<String> {
    Ok(wbc_web::auth::hash_password(password)?)
}

/// The accounts to use: the configured ones, else those kept in `<data_dir>/web-users.toml`,
/// else a new `admin` with a random password, stored only as a hash, and written once to
/// `<data_dir>/first-admin-password` (mode 0600), whose path is returned (to be shown to whoever
/// started the daemon).
pub fn users_or_first_run(config: &Config) -> Result<(Vec<User>, Option<std::path::PathBuf>)> {
    if !config.web.users.is_empty() {
        return Ok((config.web.users.clone(), None));
    }
    #[derive(Serialize, Deserialize)]
    struct Kept {
        users: Vec<User>,
    }
    let path = config.data_dir.join("web-users.toml");
    if path.exists() {
        let text = std::fs::read_to_string(&path)?;
        let k: Kept = toml::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
        return Ok((k.users, None));
    }
    let password: String = {
        use rand::Rng;
        let mut rng = rand::rngs::OsRng;
        (0..16)
            .map(|_| {
                const CHARS: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKMNPQRSTUVWXYZ23456789";
                CHARS[rng.gen_range(0..CHARS.len())] as char
            })
            .collect()
    };
    let users = vec![User {
        name: "admin".into(),
        password_hash: hash_password(&password)?,
        language: None,
    }];
    std::fs::create_dir_all(&config.data_dir)?;
    // The password goes to a file only its owner reads, never to the log (which a journal
    // keeps and others may read); the log says where it is.
    let secret = config.data_dir.join(FIRST_PASSWORD_FILE);
    write_private(&secret, format!("{password}\n").as_bytes())
        .with_context(|| format!("writing {}", secret.display()))?;
    std::fs::write(&path, toml::to_string(&Kept { users: users.clone() })?)?;
    Ok((users, Some(secret)))
}

/// Where the first-run `admin` password is written (mode 0600), in the data folder.
pub const FIRST_PASSWORD_FILE: &str = "first-admin-password";

/// Writes a file that only its owner can read (created so: never readable by others, even for
/// a moment).
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hashed_and_verified() {
        let h = hash_password("s3cret").unwrap();
        assert!(!h.contains("s3cret"));
        let u = User {
            name: "t".into(),
            password_hash: h,
            language: None,
        };
        assert!(verify_password(&u, "s3cret"));
        assert!(!verify_password(&u, "S3cret"));
        let broken = User {
            name: "t".into(),
            password_hash: "nonsense".into(),
            language: None,
        };
        assert!(!verify_password(&broken, ""));
    }

    #[test]
    fn first_run_makes_one_admin_and_keeps_only_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config {
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let (users, file) = users_or_first_run(&c).unwrap();
        let file = file.expect("a new password is written once");
        let pw = std::fs::read_to_string(&file).unwrap().trim().to_string();
        assert!(verify_password(&users[0], &pw));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let kept = std::fs::read_to_string(dir.path().join("web-users.toml")).unwrap();
        assert!(!kept.contains(&pw));
        let (again, none) = users_or_first_run(&c).unwrap();
        assert_eq!(again, users);
        assert!(none.is_none(), "shown only the first time");
    }
}
