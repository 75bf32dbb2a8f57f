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
/// else a new `admin` with a random password, which is returned once (to be shown to whoever
/// started the daemon) and stored only as a hash.
pub fn users_or_first_run(config: &Config) -> Result<(Vec<User>, Option<String>)> {
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
    }];
    std::fs::create_dir_all(&config.data_dir)?;
    std::fs::write(&path, toml::to_string(&Kept { users: users.clone() })?)?;
    Ok((users, Some(password)))
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
        };
        assert!(verify_password(&u, "s3cret"));
        assert!(!verify_password(&u, "S3cret"));
        let broken = User {
            name: "t".into(),
            password_hash: "nonsense".into(),
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
        let (users, pw) = users_or_first_run(&c).unwrap();
        let pw = pw.expect("a new password is shown once");
        assert!(verify_password(&users[0], &pw));
        let kept = std::fs::read_to_string(dir.path().join("web-users.toml")).unwrap();
        assert!(!kept.contains(&pw));
        let (again, none) = users_or_first_run(&c).unwrap();
        assert_eq!(again, users);
        assert!(none.is_none(), "shown only the first time");
    }
}
