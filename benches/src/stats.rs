//! Rates, ratios and percentiles, formatted as the final lines print them.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Events per second.
pub fn per_second(events: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        events as f64 / secs
    } else {
        0.0
    }
}

/// `numerator / denominator`, or 0 when the denominator is 0.
pub fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        0.0
    }
}

/// Receive minus commit for every committed id that was received, ascending, and how many
/// were received before their commit returned (counted as zero).
pub fn latencies<K: Eq + Hash>(
    committed: &HashMap<K, Instant>,
    received: &HashMap<K, Instant>,
) -> (Vec<Duration>, usize) {
    let mut early = 0usize;
    let mut latencies: Vec<Duration> = committed
        .iter()
        .filter_map(|(id, commit)| {
            let receive = received.get(id)?;
            if receive < commit {
                early += 1;
            }
            Some(receive.saturating_duration_since(*commit))
        })
        .collect();
    latencies.sort_unstable();
    (latencies, early)
}

/// The nearest-rank percentile `q` (0 < q <= 100) of an ascending slice; `None` when empty.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 50.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&values, 99.0), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&values, 100.0), Some(Duration::from_millis(100)));
        assert_eq!(
            percentile(&values[..1], 99.0),
            Some(Duration::from_millis(1))
        );
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn rates_and_ratios() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2000.0);
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
        assert_eq!(ratio(1.0, 0.0), 0.0);
        assert_eq!(format!("{:.2}", ratio(8.0, 10.0)), "0.80");
        assert_eq!(ms(Duration::from_micros(4_321)), "4.32");
    }
}
