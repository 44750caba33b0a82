//! The consumer's maintenance services, each a background task of [`Consumer::run`]: the
//! inbox [`cleaner()`] and the `dlq retry` runner ([`dlq_retries()`]).

mod cleaner;
mod connection;
mod dlq_retry;

pub(super) use cleaner::cleaner;
pub(super) use dlq_retry::dlq_retries;

#[cfg(doc)]
use super::Consumer;
