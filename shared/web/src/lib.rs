//! What the appliance's and central's web sides share: accounts (Argon2 hashes), sessions in an
//! `HttpOnly` cookie, the one set of login routes and the guard both sides mount
//! ([`login::Login`], feature `router`), HTML escaping, and the slide report for the patient
//! record ([`report`]) in the clinic's language ([`i18n`]).
#![deny(missing_docs)]

pub mod auth;
mod describe;
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

/// A time for people to read: `YYYY-MM-DD HH:MM UTC` (the seconds since the Unix epoch where
/// the time cannot be shown).
pub fn utc_minute(t: u64) -> String {
    i64::try_from(t)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|d| {
            d.format(&time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_read_as_utc_minutes_and_an_impossible_one_as_its_number() {
        assert_eq!(super::utc_minute(1_800_000_000), "2027-01-15 08:00 UTC");
        assert_eq!(super::utc_minute(u64::MAX), u64::MAX.to_string());
    }

    #[test]
    fn html_escape_neutralises_markup_and_quotes() {
        assert_eq!(
            super::html_escape(r#"<img src="x" onerror='a&b'>"#),
            "&lt;img src=&quot;x&quot; onerror=&#39;a&amp;b&#39;&gt;"
        );
    }
}
