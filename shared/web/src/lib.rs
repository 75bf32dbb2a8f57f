//! What the appliance's and central's web sides share: accounts (Argon2 hashes), sessions in an
//! `HttpOnly` cookie, the one set of login routes and the guard both sides mount
//! ([`login::Login`], feature `router`), HTML escaping, and the slide report for the patient
//! record ([`report`]) in the clinic's language ([`i18n`]).
#![deny(missing_docs)]

pub mod auth;
pub mod i18n;
#[cfg(feature = "router")]
pub mod login;
pub mod report;
pub mod throttle;

/// Escapes text for HTML element content and quoted attribute values (the appliance's and
/// central's pages).
pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    #[test]
    fn html_escape_neutralises_markup_and_quotes() {
        assert_eq!(
            super::html_escape(r#"<img src="x" onerror='a&b'>"#),
            "&lt;img src=&quot;x&quot; onerror=&#39;a&amp;b&#39;&gt;"
        );
    }
}
