//! Retry delays, shared by the relay (rows, broker and database pauses) and the inbox
//! consumer (handler retries): one curve, so both back off alike.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays from `min`, doubling up to `max`, each with jitter (up to its own length again),
/// without end: the iterator never returns `None`.
pub fn exponential(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The delay before retry `attempt` (1-based; 0 counts as 1) of [`exponential`]: between
/// `min * 2^(attempt-1)` and twice that, capped at `max` (plus its jitter).
pub fn delay(min: Duration, max: Duration, attempt: u32) -> Duration {
    let n = attempt.saturating_sub(1).min(64) as usize;
    exponential(min, max).nth(n).unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_bounded() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(30));
        let first = delay(min, max, 1);
        assert!(first >= min && first <= min * 2, "{first:?}");
        assert!(delay(min, max, 0) >= min);
        let later = delay(min, max, 6);
        assert!(later >= min * 32, "{later:?}");
        for attempt in [20, 1000, u32::MAX] {
            assert!(delay(min, max, attempt) <= max * 2);
        }
        assert!(exponential(min, max).take(200).all(|d| d <= max * 2));
    }
}
