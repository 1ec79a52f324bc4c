//! Grouped bar charts: one group per scenario, one bar per series (VMM), the bar at the
//! median, a whisker from min to max, the median written above.

use crate::svg::{Anchor, Svg};
use crate::{label, nice_max, PALETTE};

/// One bar: a series' median and range (NaN median: no data, drawn as "n/a").
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub series: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// Bars side by side under one label.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub label: String,
    pub bars: Vec<Bar>,
}

/// A chart of groups on one linear axis from zero.
#[derive(Clone, Debug, PartialEq)]
pub struct BarChart {
    pub title: String,
    /// Unit of the values, for the axis ("ms", "MiB").
    pub unit: String,
    pub groups: Vec<Group>,
}

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 52.0;
const BOTTOM: f64 = 44.0;

impl BarChart {
    /// Series names in order of first appearance (the legend, and the colours).
    pub fn series(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for b in self.groups.iter().flat_map(|g| &g.bars) {
            if !out.contains(&b.series) {
                out.push(b.series.clone());
            }
        }
        out
    }

    /// The axis's top value: a round number at or above every whisker.
    pub fn axis_max(&self) -> f64 {
        let top = self
            .groups
            .iter()
            .flat_map(|g| &g.bars)
            .flat_map(|b| [b.median, b.max])
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        nice_max(top)
    }

    /// The chart as an SVG document.
    pub fn render(&self) -> String {
        let mut s = Svg::new(WIDTH, HEIGHT);
        let plot_h = HEIGHT - TOP - BOTTOM;
        let plot_w = WIDTH - LEFT - RIGHT;
        let base = TOP + plot_h;
        let max = self.axis_max();
        let y = |v: f64| base - v / max * plot_h;
        s.text(LEFT, 20.0, 15.0, Anchor::Start, &self.title);
        let series = self.series();
        let colour = |name: &str| {
            let i = series.iter().position(|s| s == name).unwrap_or(0);
            PALETTE[i % PALETTE.len()]
        };
        // Legend, top right.
        let mut lx = WIDTH - RIGHT;
        for name in series.iter().rev() {
            lx -= 12.0 + 7.0 * name.len() as f64 + 14.0;
            s.rect(lx, 30.0, 10.0, 10.0, colour(name), None);
            s.text(lx + 14.0, 39.0, 11.0, Anchor::Start, name);
        }
        // Grid and axis.
        for i in 0..=4 {
            let v = max * i as f64 / 4.0;
            s.line(LEFT, y(v), LEFT + plot_w, y(v), "#dddddd", 1.0);
            s.text(LEFT - 6.0, y(v) + 4.0, 10.0, Anchor::End, &label(v));
        }
        s.vtext(16.0, TOP + plot_h / 2.0, 11.0, &self.unit);
        s.line(LEFT, base, LEFT + plot_w, base, "#333333", 1.0);
        let groups = self.groups.len().max(1) as f64;
        let slot = plot_w / groups;
        for (gi, g) in self.groups.iter().enumerate() {
            let x0 = LEFT + slot * gi as f64;
            s.text(x0 + slot / 2.0, base + 16.0, 11.0, Anchor::Middle, &g.label);
            let n = g.bars.len().max(1) as f64;
            let bw = (slot * 0.8 / n).min(60.0);
            let start = x0 + (slot - bw * n) / 2.0;
            for (bi, b) in g.bars.iter().enumerate() {
                let x = start + bw * bi as f64;
                let cx = x + bw / 2.0;
                if !b.median.is_finite() {
                    s.text(cx, base - 4.0, 10.0, Anchor::Middle, "n/a");
                    continue;
                }
                let tip = format!(
                    "{} {}: {} {} (min {}, max {})",
                    g.label,
                    b.series,
                    label(b.median),
                    self.unit,
                    label(b.min),
                    label(b.max)
                );
                s.rect_class(
                    x + 1.0,
                    y(b.median),
                    bw - 2.0,
                    base - y(b.median),
                    colour(&b.series),
                    Some(&tip),
                    Some("bar"),
                );
                if b.min.is_finite() && b.max.is_finite() && b.max > b.min {
                    s.line(cx, y(b.min), cx, y(b.max), "#222222", 1.2);
                    s.line(cx - 4.0, y(b.min), cx + 4.0, y(b.min), "#222222", 1.2);
                    s.line(cx - 4.0, y(b.max), cx + 4.0, y(b.max), "#222222", 1.2);
                }
                let top = y(b.median.max(if b.max.is_finite() { b.max } else { 0.0 }));
                s.text(cx, top - 4.0, 10.0, Anchor::Middle, &label(b.median));
            }
        }
        s.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(series: &str, median: f64, min: f64, max: f64) -> Bar {
        Bar {
            series: series.into(),
            median,
            min,
            max,
        }
    }

    fn chart() -> BarChart {
        BarChart {
            title: "Total time <ms> & more".into(),
            unit: "ms".into(),
            groups: vec![
                Group {
                    label: "idle-1G".into(),
                    bars: vec![
                        bar("minivmm", 40.0, 35.0, 52.0),
                        bar("QEMU", 300.0, 280.0, 310.0),
                    ],
                },
                Group {
                    label: "local-1G".into(),
                    bars: vec![
                        bar("minivmm", 2.5, 2.0, 3.0),
                        bar("QEMU", f64::NAN, f64::NAN, f64::NAN),
                    ],
                },
            ],
        }
    }

    #[test]
    fn bars_are_well_formed_and_as_high_as_their_values() {
        let c = chart();
        let doc = c.render();
        let xml = roxmltree::Document::parse(&doc).expect("well-formed XML");
        let bars: Vec<(f64, f64)> = xml
            .descendants()
            .filter(|n| n.attribute("class") == Some("bar"))
            .map(|n| {
                let h: f64 = n.attribute("height").unwrap().parse().unwrap();
                let y: f64 = n.attribute("y").unwrap().parse().unwrap();
                (h, y + h)
            })
            .collect();
        let values = [40.0, 300.0, 2.5];
        assert_eq!(bars.len(), values.len(), "no bar for the missing value");
        assert_eq!(c.axis_max(), 500.0);
        let plot_h = HEIGHT - TOP - BOTTOM;
        for ((h, bottom), v) in bars.iter().zip(values) {
            // Coordinates are written with 2 decimals.
            assert!((h - v / 500.0 * plot_h).abs() < 0.01, "{h} for {v}");
            assert!(
                (bottom - (TOP + plot_h)).abs() < 0.01,
                "bars stand on the axis"
            );
        }
        assert!(doc.contains("n/a"));
        assert!(doc.contains("Total time &lt;ms&gt; &amp; more"));
        assert_eq!(c.series(), ["minivmm", "QEMU"]);
        // Whiskers: two caps and a stem per bar with a range.
        let lines = xml.descendants().filter(|n| n.has_tag_name("line")).count();
        assert_eq!(lines, 5 + 1 + 3 * 3, "grid, axis, whiskers");
    }
}
