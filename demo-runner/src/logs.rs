//! Reading the services' JSON log files: trace ids and line counts.

use std::path::Path;

use serde_json::Value;

/// The trace id of the log line of `log` whose message is `message` and whose `order_id`
/// field is `order_id` (JSON log lines, as the services write them).
pub fn trace_id_of(log: &Path, message: &str, order_id: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|v| v["fields"]["message"] == message && v["fields"]["order_id"] == order_id)
        .and_then(|v| {
            v["spans"]
                .as_array()?
                .iter()
                .find_map(|s| s["trace_id"].as_str().map(str::to_owned))
        })
}

/// How many lines of `log` mention `needle`.
pub fn count_lines(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.lines().filter(|l| l.contains(needle)).count())
        .unwrap_or(0)
}
