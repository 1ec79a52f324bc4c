//! Charts of migrations as self-contained SVG (no scripts, no fonts beyond the viewer's
//! generic sans-serif), shared by `make bench` (its `bench/report.html`) and `minivmm plot`.
//!
//! - [`bars`]: grouped bars (one group per scenario, one bar per VMM), a median with a
//!   min-max whisker.
//! - [`timeline`]: one migration from `minivmm migrate --json`: its passes over time (bytes
//!   sent, bandwidth, dirty rate) and where the setup and the downtime went, phase by phase.
//! - [`svg`]: the few SVG elements both draw with, text escaped.

pub mod bars;
pub mod svg;
pub mod timeline;

pub use bars::{Bar, BarChart, Group};
pub use timeline::Timeline;

/// Series colours, in order (colour-blind safe).
pub const PALETTE: &[&str] = &[
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00",
];

/// A "nice" upper bound for an axis: the smallest 1, 2, 2.5 or 5 × 10^k at least `max`.
pub fn nice_max(max: f64) -> f64 {
    if !max.is_finite() || max <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&v| v >= max * (1.0 - 1e-12))
        .unwrap_or(10.0 * p)
}

/// A number for an axis label: few digits, no trailing zeros.
pub fn label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    let s = if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_bounds_and_labels() {
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(1.0), 1.0);
        assert_eq!(nice_max(120.0), 200.0);
        assert_eq!(nice_max(0.0021), 0.0025);
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(label(2.50), "2.5");
        assert_eq!(label(1500.0), "1500");
        assert_eq!(label(0.25), "0.25");
    }
}
