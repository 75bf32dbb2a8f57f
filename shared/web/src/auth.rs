//! Accounts and sessions of the web pages (the appliance's and central's): Argon2 password
//! hashes in the configuration, random session tokens in an `HttpOnly` cookie, kept in memory
//! (a restart logs everyone out).

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;

/// The session cookie's name.
pub const COOKIE: &str = "wbc_session";

/// A web account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Argon2 PHC string (`appliance hash-password` makes one); never the password itself.
    pub password_hash: String,
}

/// Why an account cannot be used or a password not hashed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// The account has no name.
    #[error("a web user has an empty name")]
    EmptyName,
    /// The stored hash is not an Argon2 PHC string (a password pasted in its place, say).
    #[error("web user {user}: password_hash is not a PHC string: {reason}")]
    NotAHash {
        /// The account.
        user: String,
        /// What the PHC parser said.
        reason: String,
    },
    /// Argon2 refused to hash.
    #[error("hashing: {0}")]
    Hashing(String),
}

impl User {
    /// Refuses an account that could never log in: an empty name, or a hash that is not a PHC
    /// string (a password pasted in its place, say).
    pub fn validate(&self) -> Result<(), AccountError> {
        if self.name.is_empty() {
            return Err(AccountError::EmptyName);
        }
        PasswordHash::new(&self.password_hash)
            .map(|_| ())
            .map_err(|e| AccountError::NotAHash {
                user: self.name.clone(),
                reason: e.to_string(),
            })
    }
}

/// An Argon2 PHC string for `password`, with a fresh salt.
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Hashing(e.to_string()))
}

/// Whether `password` is the user's.
pub fn verify_password(user: &User, password: &str) -> bool {
    PasswordHash::new(&user.password_hash)
        .map(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
        .unwrap_or(false)
}

/// What a login form posts.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    /// Login name.
    pub user: String,
    /// Password.
    pub password: String,
}

/// Checks a login against `users` and, when it is one, starts a session: returns the
/// `Set-Cookie` value that carries it. Argon2 is slow on purpose: call it off async workers.
pub fn log_in(users: &[User], sessions: &Sessions, form: &LoginForm) -> Option<String> {
    users
        .iter()
        .any(|u| u.name == form.user && verify_password(u, &form.password))
        .then(|| Sessions::cookie(&sessions.start(&form.user)))
}

/// The logged-in users, by session token.
#[derive(Debug, Default)]
pub struct Sessions(Mutex<HashMap<String, String>>);

impl Sessions {
    /// Logs `user` in; returns the new session's token.
    pub fn start(&self, user: &str) -> String {
        let token = hex::encode(rand::random::<[u8; 32]>());
        self.0.lock().expect("sessions").insert(token.clone(), user.to_string());
        token
    }

    /// The user of a session, if it is one.
    pub fn user(&self, token: &str) -> Option<String> {
        self.0.lock().expect("sessions").get(token).cloned()
    }

    /// Logs a session out.
    pub fn end(&self, token: &str) {
        self.0.lock().expect("sessions").remove(token);
    }

    /// The `Set-Cookie` value that carries a session's token.
    pub fn cookie(token: &str) -> String {
        format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/")
    }
}

/// The session token among a request's `Cookie` header values.
pub fn session_token<'a>(cookie_headers: impl IntoIterator<Item = &'a str>) -> Option<String> {
    cookie_headers
        .into_iter()
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_verifies_against_its_hash_only() {
        let user = User {
            name: "tech".into(),
            password_hash: hash_password("correct horse").unwrap(),
        };
        assert!(user.password_hash.starts_with("$argon2"));
        assert_eq!(user.validate(), Ok(()));
        assert!(verify_password(&user, "correct horse"));
        assert!(!verify_password(&user, "correct horse "));
        let broken = User {
            password_hash: "not a hash".into(),
            ..user
        };
        assert!(!verify_password(&broken, "correct horse"));
        assert!(broken.validate().unwrap_err().to_string().contains("not a PHC string"));
        let nameless = User {
            name: String::new(),
            ..broken
        };
        assert!(nameless.validate().unwrap_err().to_string().contains("empty name"));
    }

    #[test]
    fn a_login_starts_a_session_only_with_the_right_password() {
        let users = vec![User {
            name: "lab".into(),
            password_hash: hash_password("microscope").unwrap(),
        }];
        let s = Sessions::default();
        let form = |user: &str, password: &str| LoginForm {
            user: user.into(),
            password: password.into(),
        };
        assert_eq!(log_in(&users, &s, &form("lab", "wrong")), None);
        assert_eq!(log_in(&users, &s, &form("other", "microscope")), None);
        let cookie = log_in(&users, &s, &form("lab", "microscope")).unwrap();
        let token = session_token([cookie.split(';').next().unwrap()]).unwrap();
        assert_eq!(s.user(&token).as_deref(), Some("lab"));
    }

    #[test]
    fn sessions_start_end_and_are_found_in_the_cookie_header() {
        let s = Sessions::default();
        let t = s.start("tech");
        assert_eq!(t.len(), 64);
        assert_ne!(t, s.start("tech"), "a new token each time");
        assert_eq!(s.user(&t).as_deref(), Some("tech"));
        let header = format!("theme=dark; {COOKIE}={t}; other=1");
        assert_eq!(session_token([header.as_str()]), Some(t.clone()));
        assert_eq!(session_token(["theme=dark", "x"]), None);
        assert!(Sessions::cookie(&t).contains("HttpOnly"));
        s.end(&t);
        assert_eq!(s.user(&t), None);
        assert_eq!(s.user("forged"), None);
    }
}
