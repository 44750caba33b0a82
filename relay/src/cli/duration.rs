//! [`Dur`], the type of every duration flag.

use std::time::Duration;

/// A duration flag: parsed by [`outbox::duration::parse`], shown in `--help` by
/// [`outbox::duration::format`] (the same units), so that the defaults come from
/// [`relay::RelayConfig::default`] alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Dur(pub(super) Duration);

impl std::str::FromStr for Dur {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        parse_duration(text).map(Dur)
    }
}

impl std::fmt::Display for Dur {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&outbox::duration::format(self.0))
    }
}

/// [`outbox::duration::parse`] with its refusal as the text clap prints.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    outbox::duration::parse(text).map_err(|e| e.to_string())
}
