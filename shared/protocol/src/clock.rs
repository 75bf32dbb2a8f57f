//! The one clock of the project: seconds since the Unix epoch, as every record and message
//! carries them.

/// Now, in whole seconds since the Unix epoch (0 on a clock set before 1970).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_is_after_this_code_was_written() {
        // 2026-01-01T00:00:00Z
        assert!(super::now() > 1_767_225_600);
    }
}
