//! A sparkline drawn on the server as inline SVG: no script, no image request, readable by a
//! screen reader through its label.

use maud::{Markup, html};

const WIDTH: usize = 240;
const HEIGHT: usize = 36;

/// Bars of `values` (oldest first), scaled to the largest, labelled `label`.
pub(crate) fn bars(values: &[i64], label: &str) -> Markup {
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    let n = values.len().max(1);
    let step = WIDTH as f64 / n as f64;
    let width = (step - 1.0).max(1.0);
    html! {
        svg.sparkline role="img" aria-label=(label) viewBox={ "0 0 " (WIDTH) " " (HEIGHT) }
            width=(WIDTH) height=(HEIGHT) xmlns="http://www.w3.org/2000/svg" {
            title { (label) }
            line x1="0" y1=(HEIGHT - 1) x2=(WIDTH) y2=(HEIGHT - 1) stroke="#d0d7de" stroke-width="1" {}
            @for (i, &v) in values.iter().enumerate() {
                @if v > 0 {
                    @let h = ((v as f64 / max as f64) * (HEIGHT - 2) as f64).max(1.0);
                    rect x=(format!("{:.1}", i as f64 * step)) y=(format!("{:.1}", (HEIGHT - 1) as f64 - h))
                        width=(format!("{width:.1}")) height=(format!("{h:.1}")) fill="#0a58ca" {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_largest_and_skip_zeros() {
        let svg = bars(&[0, 5, 10], "rate").into_string();
        assert_eq!(svg.matches("<rect").count(), 2, "{svg}");
        assert!(
            svg.contains(r#"height="34.0""#),
            "the largest fills the height: {svg}"
        );
        assert!(svg.contains(r#"height="17.0""#), "half of it: {svg}");
        assert!(svg.contains(r#"aria-label="rate""#), "{svg}");
        assert_eq!(bars(&[], "none").into_string().matches("<rect").count(), 0);
    }
}
