//! Accounts and sessions of the web pages (the appliance's and central's): Argon2 password
//! hashes in the configuration, random session tokens in an `HttpOnly` cookie, kept in memory
//! (a restart logs everyone out), ending when idle or old; each session has its own token for
//! the forms it posts.

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    /// The language of this user's pages (`en`, `fr`, `pt`); the side's own where absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
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
    /// The account asks for a language the pages are not written in.
    #[error("web user {user}: language {language:?} is not one of en, fr, pt")]
    UnknownLanguage {
        /// The account.
        user: String,
        /// What it asked for.
        language: String,
    },
    /// Argon2 refused to hash.
    #[error("hashing: {0}")]
    Hashing(String),
}

impl User {
    /// Refuses an account that could never log in: an empty name, a hash that is not a PHC
    /// string (a password pasted in its place, say), or a language the pages do not have.
    pub fn validate(&self) -> Result<(), AccountError> {
        if self.name.is_empty() {
            return Err(AccountError::EmptyName);
        }
        if let Some(l) = self
            .language
            .as_deref()
            .filter(|l| crate::i18n::Lang::from_code(l).is_none())
        {
            return Err(AccountError::UnknownLanguage {
                user: self.name.clone(),
                language: l.to_string(),
            });
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

/// Checks a login against `users`; the user's name when it is one. An unknown name costs the
/// same Argon2 work as a known one, so that the time of the answer does not tell which names
/// exist. Argon2 is slow on purpose: call it off async workers.
pub fn check_login(users: &[User], form: &LoginForm) -> Option<String> {
    static DUMMY: std::sync::OnceLock<User> = std::sync::OnceLock::new();
    let user = users.iter().find(|u| u.name == form.user);
    let against = user.unwrap_or_else(|| {
        DUMMY.get_or_init(|| User {
            name: String::new(),
            password_hash: hash_password("no such user").expect("hashing in memory"),
            language: None,
        })
    });
    let ok = verify_password(against, &form.password);
    user.filter(|_| ok).map(|u| u.name.clone())
}

/// Checks a login against `users` and, when it is one, starts a session: returns the
/// `Set-Cookie` value that carries it.
pub fn log_in(users: &[User], sessions: &Sessions, form: &LoginForm) -> Option<String> {
    check_login(users, form).map(|u| Sessions::cookie(&sessions.start(&u), false))
}

/// How long sessions last, and how many there may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// A session unused this long ends.
    pub idle: Duration,
    /// A session ends this long after its login, used or not.
    pub absolute: Duration,
    /// Most sessions at once (the oldest ends first).
    pub max_sessions: usize,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        SessionPolicy {
            idle: Duration::from_secs(2 * 3600),
            absolute: Duration::from_secs(12 * 3600),
            max_sessions: 256,
        }
    }
}

#[derive(Debug, Clone)]
struct Session {
    user: String,
    /// The token every state-changing request of this session carries (CSRF).
    form_token: String,
    started: Instant,
    last_used: Instant,
}

/// The logged-in users, by session token.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    policy: SessionPolicy,
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Sessions {
    /// Sessions under `policy`.
    pub fn with_policy(policy: SessionPolicy) -> Self {
        Sessions {
            map: Mutex::default(),
            policy,
        }
    }

    /// Logs `user` in; returns the new session's token.
    pub fn start(&self, user: &str) -> String {
        self.start_at(user, Instant::now())
    }

    fn start_at(&self, user: &str, now: Instant) -> String {
        let token = random_token();
        let mut map = self.map.lock().expect("sessions");
        map.retain(|_, s| self.alive(s, now));
        while map.len() >= self.policy.max_sessions.max(1) {
            let Some(oldest) = map.iter().min_by_key(|(_, s)| s.started).map(|(k, _)| k.clone()) else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(
            token.clone(),
            Session {
                user: user.to_string(),
                form_token: random_token(),
                started: now,
                last_used: now,
            },
        );
        token
    }

    fn alive(&self, s: &Session, now: Instant) -> bool {
        now.saturating_duration_since(s.last_used) < self.policy.idle
            && now.saturating_duration_since(s.started) < self.policy.absolute
    }

    /// The user of a session, if it is one and has not expired (it counts as used now).
    pub fn user(&self, token: &str) -> Option<String> {
        self.user_at(token, Instant::now())
    }

    fn user_at(&self, token: &str, now: Instant) -> Option<String> {
        let mut map = self.map.lock().expect("sessions");
        match map.get_mut(token) {
            Some(s) if self.alive(s, now) => {
                s.last_used = now;
                Some(s.user.clone())
            }
            Some(_) => {
                map.remove(token);
                None
            }
            None => None,
        }
    }

    /// The token a session's forms carry (CSRF), if the session is one.
    pub fn form_token(&self, token: &str) -> Option<String> {
        self.map
            .lock()
            .expect("sessions")
            .get(token)
            .map(|s| s.form_token.clone())
    }

    /// Logs a session out.
    pub fn end(&self, token: &str) {
        self.map.lock().expect("sessions").remove(token);
    }

    /// The `Set-Cookie` value that carries a session's token (`Secure` where the page was
    /// served over HTTPS).
    pub fn cookie(token: &str, secure: bool) -> String {
        format!(
            "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/{}",
            if secure { "; Secure" } else { "" }
        )
    }

    /// The `Set-Cookie` value that removes the session cookie from the browser.
    pub fn clear_cookie() -> String {
        format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
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
            language: None,
        };
        assert!(user.password_hash.starts_with("$argon2"));
        assert_eq!(user.validate(), Ok(()));
        assert!(verify_password(&user, "correct horse"));
        assert!(!verify_password(&user, "correct horse "));
        let french = User {
            language: Some("fr-FR".into()),
            ..user.clone()
        };
        assert_eq!(french.validate(), Ok(()));
        let klingon = User {
            language: Some("tlh".into()),
            ..user.clone()
        };
        assert!(klingon.validate().unwrap_err().to_string().contains("language \"tlh\""));
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
            language: None,
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
        assert!(Sessions::cookie(&t, false).contains("HttpOnly"));
        assert!(Sessions::cookie(&t, true).ends_with("; Secure"));
        s.end(&t);
        assert_eq!(s.user(&t), None);
        assert_eq!(s.user("forged"), None);
    }

    #[test]
    fn a_session_ends_when_idle_or_old_and_the_oldest_goes_when_there_are_too_many() {
        let s = Sessions::with_policy(SessionPolicy {
            idle: Duration::from_secs(60),
            absolute: Duration::from_secs(300),
            max_sessions: 2,
        });
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let a = s.start_at("tech", t0);
        // Used every 50 s it stays, until five minutes after the login.
        for secs in (50..300).step_by(50) {
            assert_eq!(s.user_at(&a, at(secs)).as_deref(), Some("tech"), "{secs} s");
        }
        assert_eq!(s.user_at(&a, at(301)), None, "absolute expiry");
        let b = s.start_at("tech", at(400));
        assert_eq!(s.user_at(&b, at(461)), None, "idle expiry");
        assert_eq!(s.user_at(&b, at(462)), None, "and gone");
        let (c, d) = (s.start_at("a", at(500)), s.start_at("b", at(501)));
        let e = s.start_at("c", at(502));
        assert_eq!(s.user_at(&c, at(503)), None, "the oldest of three ended");
        assert!(s.user_at(&d, at(503)).is_some() && s.user_at(&e, at(503)).is_some());
        assert_ne!(
            s.form_token(&d),
            s.form_token(&e),
            "each session has its own form token"
        );
    }

    #[test]
    fn an_unknown_name_costs_the_same_argon2_work_as_a_wrong_password() {
        let users = vec![User {
            name: "tech".into(),
            password_hash: hash_password("slide").unwrap(),
            language: None,
        }];
        let form = |u: &str, p: &str| LoginForm {
            user: u.into(),
            password: p.into(),
        };
        check_login(&users, &form("nobody", "x")); // the dummy hash is made once
        // Interleaved, so that a busy machine slows both alike.
        let (mut unknown, mut wrong) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..4 {
            for (f, total) in [(form("nobody", "x"), &mut unknown), (form("tech", "x"), &mut wrong)] {
                let t = Instant::now();
                assert_eq!(check_login(&users, &f), None);
                *total += t.elapsed();
            }
        }
        let ratio = unknown.as_secs_f64() / wrong.as_secs_f64();
        assert!(
            (0.25..4.0).contains(&ratio),
            "unknown {unknown:?} against wrong password {wrong:?}"
        );
        assert_eq!(check_login(&users, &form("tech", "slide")).as_deref(), Some("tech"));
    }
}
