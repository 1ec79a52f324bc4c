//! One migration's timeline from `minivmm migrate --json` (or its `stats` object): the passes
//! laid end to end after the setup (bar height = bytes sent), bandwidth and dirty rate per
//! pass, and the setup and the downtime split into their phases.

use serde_json::Value;

use crate::svg::{Anchor, Svg};
use crate::{label, nice_max, PALETTE};

/// One pre-copy pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Pass {
    pub pass: u64,
    /// `bulk`, `iterative` or `final`.
    pub kind: String,
    pub bytes: u64,
    pub duration_us: u64,
    pub bandwidth_bps: u64,
    pub dirty_rate_bps: u64,
}

/// What the charts show of one migration.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeline {
    pub title: String,
    pub passes: Vec<Pass>,
    pub setup_phases_us: Vec<(String, u64)>,
    pub downtime_phases_us: Vec<(String, u64)>,
    pub total_us: u64,
    pub downtime_us: u64,
    pub local: bool,
}

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn phases(v: &Value, key: &str) -> Result<Vec<(String, u64)>, String> {
    let Some(list) = v.get(key) else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| format!("\"{key}\" is not a list"))?;
    list.iter()
        .map(|p| match p.as_array().map(Vec::as_slice) {
            Some([name, us]) => match (name.as_str(), us.as_u64()) {
                (Some(n), Some(us)) => Ok((n.to_string(), us)),
                _ => Err(format!("\"{key}\": {p} is not [name, microseconds]")),
            },
            _ => Err(format!("\"{key}\": {p} is not [name, microseconds]")),
        })
        .collect()
}

impl Timeline {
    /// From the JSON `minivmm migrate --json` prints (`{"ok":true,...,"stats":{...}}`) or
    /// its `stats` object alone.
    pub fn from_json(v: &Value, title: &str) -> Result<Timeline, String> {
        if v.get("ok") == Some(&Value::Bool(false)) {
            let e = v.get("error").and_then(Value::as_str).unwrap_or("?");
            return Err(format!("the migration failed: {e}"));
        }
        let stats = v.get("stats").unwrap_or(v);
        let passes = stats
            .get("passes")
            .and_then(Value::as_array)
            .ok_or("no \"passes\" list: not the output of `minivmm migrate --json`")?;
        let passes = passes
            .iter()
            .map(|p| Pass {
                pass: u(p, "pass"),
                kind: p
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                bytes: u(p, "bytes"),
                duration_us: u(p, "duration_us"),
                bandwidth_bps: u(p, "bandwidth_bps"),
                dirty_rate_bps: u(p, "dirty_rate_bps"),
            })
            .collect();
        Ok(Timeline {
            title: title.to_string(),
            passes,
            setup_phases_us: phases(stats, "setup_phases_us")?,
            downtime_phases_us: phases(stats, "downtime_phases_us")?,
            total_us: u(stats, "total_duration_us"),
            downtime_us: u(stats, "downtime_us"),
            local: stats.get("local").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// The timeline as an SVG document.
    pub fn render(&self) -> String {
        // Without a RAM pass (a local migration) only the phases have something to show.
        let compact = self.passes.is_empty();
        let mut s = Svg::new(WIDTH, if compact { COMPACT_HEIGHT } else { HEIGHT });
        s.text(LEFT, 22.0, 15.0, Anchor::Start, &self.title);
        s.text(
            LEFT,
            40.0,
            11.0,
            Anchor::Start,
            &format!(
                "total {} ms, downtime {} ms, {} passes{}",
                label(self.total_us as f64 / 1000.0),
                label(self.downtime_us as f64 / 1000.0),
                self.passes.len(),
                if self.local {
                    " (local: memory handed over, only state copied)"
                } else {
                    ""
                }
            ),
        );
        let phases_top = if compact {
            80.0
        } else {
            self.passes_panel(&mut s, 60.0);
            self.rates_panel(&mut s, 290.0);
            500.0
        };
        phase_bar(&mut s, phases_top, "setup", &self.setup_phases_us);
        phase_bar(
            &mut s,
            phases_top + 90.0,
            "downtime",
            &self.downtime_phases_us,
        );
        s.finish()
    }

    /// Bytes of each pass, placed in time: the setup first, then the passes end to end.
    fn passes_panel(&self, s: &mut Svg, top: f64) {
        let h = 170.0;
        let base = top + h;
        let w = WIDTH - LEFT - RIGHT;
        s.text(
            LEFT,
            top - 4.0,
            12.0,
            Anchor::Start,
            "Passes: MiB sent over time (ms)",
        );
        if self.passes.is_empty() {
            s.text(
                LEFT + w / 2.0,
                top + h / 2.0,
                12.0,
                Anchor::Middle,
                "no RAM pass",
            );
            return;
        }
        let setup: u64 = self.setup_phases_us.iter().map(|p| p.1).sum();
        let passes: u64 = self.passes.iter().map(|p| p.duration_us).sum();
        let span = (self.total_us.max(setup + passes)).max(1) as f64;
        let x = |us: f64| LEFT + us / span * w;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let top_mib = nice_max(self.passes.iter().map(|p| mib(p.bytes)).fold(0.0, f64::max));
        let y = |m: f64| base - m / top_mib * h;
        axis(s, LEFT, base, w, h, top_mib);
        for i in 0..=4 {
            let t = span * i as f64 / 4.0;
            s.text(x(t), base + 14.0, 10.0, Anchor::Middle, &label(t / 1000.0));
        }
        // The downtime, shaded, at the end.
        let down = self.downtime_us as f64;
        s.rect(
            x(span - down),
            top,
            x(span) - x(span - down),
            h,
            "#fbe3d6",
            Some("downtime"),
        );
        let mut t = setup as f64;
        for p in &self.passes {
            let colour = match p.kind.as_str() {
                "bulk" => PALETTE[0],
                "final" => PALETTE[5],
                _ => PALETTE[4],
            };
            let tip = format!(
                "pass {} ({}): {} MiB in {} ms",
                p.pass,
                p.kind,
                label(mib(p.bytes)),
                label(p.duration_us as f64 / 1000.0)
            );
            let x0 = x(t);
            let x1 = x(t + p.duration_us as f64).max(x0 + 2.0);
            s.rect_class(
                x0,
                y(mib(p.bytes)),
                x1 - x0,
                base - y(mib(p.bytes)),
                colour,
                Some(&tip),
                Some("pass"),
            );
            t += p.duration_us as f64;
        }
    }

    /// Bandwidth and dirty rate of each pass, MB/s.
    fn rates_panel(&self, s: &mut Svg, top: f64) {
        let h = 150.0;
        let base = top + h;
        let w = WIDTH - LEFT - RIGHT;
        s.text(LEFT, top - 4.0, 12.0, Anchor::Start, "Per pass: MB/s");
        let mbs = |v: u64| v as f64 / 1e6;
        // The final pass runs paused: its rates say nothing about convergence.
        let live: Vec<&Pass> = self.passes.iter().filter(|p| p.kind != "final").collect();
        if live.is_empty() {
            s.text(
                LEFT + w / 2.0,
                top + h / 2.0,
                12.0,
                Anchor::Middle,
                "no live pass",
            );
            return;
        }
        let top_v = nice_max(
            live.iter()
                .flat_map(|p| [mbs(p.bandwidth_bps), mbs(p.dirty_rate_bps)])
                .fold(0.0, f64::max),
        );
        axis(s, LEFT, base, w, h, top_v);
        let n = live.len() as f64;
        let x = |i: usize| LEFT + w * (i as f64 + 0.5) / n;
        let y = |v: f64| base - v / top_v * h;
        for (i, p) in live.iter().enumerate() {
            s.text(
                x(i),
                base + 14.0,
                10.0,
                Anchor::Middle,
                &format!("{}", p.pass),
            );
        }
        let bw: Vec<(f64, f64)> = live
            .iter()
            .enumerate()
            .map(|(i, p)| (x(i), y(mbs(p.bandwidth_bps))))
            .collect();
        let dr: Vec<(f64, f64)> = live
            .iter()
            .enumerate()
            .map(|(i, p)| (x(i), y(mbs(p.dirty_rate_bps))))
            .collect();
        s.polyline(&bw, PALETTE[0], 3.0);
        s.polyline(&dr, PALETTE[5], 3.0);
        let lx = WIDTH - RIGHT - 250.0;
        s.rect(lx, top - 14.0, 10.0, 10.0, PALETTE[0], None);
        s.text(lx + 14.0, top - 5.0, 11.0, Anchor::Start, "bandwidth");
        s.rect(lx + 110.0, top - 14.0, 10.0, 10.0, PALETTE[5], None);
        s.text(lx + 124.0, top - 5.0, 11.0, Anchor::Start, "dirty rate");
    }
}

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 690.0;
const COMPACT_HEIGHT: f64 = 270.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;

/// Grid lines and labels of a value axis from 0 to `max`.
fn axis(s: &mut Svg, left: f64, base: f64, w: f64, h: f64, max: f64) {
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let y = base - h * i as f64 / 4.0;
        s.line(
            left,
            y,
            left + w,
            y,
            if i == 0 { "#333333" } else { "#dddddd" },
            1.0,
        );
        s.text(left - 6.0, y + 4.0, 10.0, Anchor::End, &label(v));
    }
}

/// One horizontal bar split into phases (width ∝ duration), with a legend under it.
fn phase_bar(s: &mut Svg, top: f64, what: &str, phases: &[(String, u64)]) {
    let w = WIDTH - LEFT - RIGHT;
    let total: u64 = phases.iter().map(|p| p.1).sum();
    s.text(
        LEFT,
        top - 6.0,
        12.0,
        Anchor::Start,
        &format!("{what}: {} ms by phase", label(total as f64 / 1000.0)),
    );
    if total == 0 {
        s.text(LEFT, top + 16.0, 11.0, Anchor::Start, "not recorded");
        return;
    }
    let mut x = LEFT;
    let (mut lx, mut ly) = (LEFT, top + 42.0);
    for (i, (name, us)) in phases.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let pw = *us as f64 / total as f64 * w;
        let tip = format!("{name}: {} ms", label(*us as f64 / 1000.0));
        s.rect_class(x, top, pw, 22.0, colour, Some(&tip), Some("phase"));
        x += pw;
        let text = format!("{name} {} ms", label(*us as f64 / 1000.0));
        let tw = 12.0 + 6.2 * text.len() as f64 + 12.0;
        if lx + tw > WIDTH - RIGHT {
            lx = LEFT;
            ly += 16.0;
        }
        s.rect(lx, ly - 9.0, 10.0, 10.0, colour, None);
        s.text(lx + 13.0, ly, 11.0, Anchor::Start, &text);
        lx += tw;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        serde_json::json!({
            "ok": true,
            "total_ms": 76.3,
            "stats": {
                "passes": [
                    {"pass": 0, "kind": "bulk", "bytes": 64u64 << 20, "duration_us": 60000,
                     "bandwidth_bps": 1_100_000_000u64, "dirty_rate_bps": 20_000_000},
                    {"pass": 1, "kind": "iterative", "bytes": 4u64 << 20, "duration_us": 4000,
                     "bandwidth_bps": 1_000_000_000u64, "dirty_rate_bps": 10_000_000},
                    {"pass": 2, "kind": "final", "bytes": 16u64 << 20, "duration_us": 500,
                     "bandwidth_bps": 0, "dirty_rate_bps": 0}
                ],
                "setup_phases_us": [["send configuration", 300], ["destination ready", 900]],
                "downtime_phases_us": [["pause", 200], ["final pass", 500], ["send state", 100],
                                        ["destination restore", 200]],
                "total_duration_us": 66000,
                "downtime_us": 1000
            }
        })
    }

    #[test]
    fn a_migration_becomes_a_well_formed_timeline() {
        let t = Timeline::from_json(&sample(), "idle-4G <run 1>").unwrap();
        assert_eq!(t.passes.len(), 3);
        assert_eq!(t.downtime_phases_us[1], ("final pass".to_string(), 500));
        let doc = t.render();
        let xml = roxmltree::Document::parse(&doc).expect("well-formed XML");
        let widths = |class: &str| -> Vec<f64> {
            xml.descendants()
                .filter(|n| n.attribute("class") == Some(class))
                .map(|n| n.attribute("width").unwrap().parse().unwrap())
                .collect()
        };
        let heights: Vec<f64> = xml
            .descendants()
            .filter(|n| n.attribute("class") == Some("pass"))
            .map(|n| n.attribute("height").unwrap().parse().unwrap())
            .collect();
        // Pass heights follow the bytes (64, 4, 16 MiB).
        assert!((heights[0] / heights[1] - 16.0).abs() < 0.01, "{heights:?}");
        assert!((heights[0] / heights[2] - 4.0).abs() < 0.01, "{heights:?}");
        // Phase widths follow the durations: setup 300:900, downtime 200:500:100:200.
        let phases = widths("phase");
        assert_eq!(phases.len(), 6);
        assert!((phases[1] / phases[0] - 3.0).abs() < 0.01, "{phases:?}");
        assert!((phases[3] / phases[2] - 2.5).abs() < 0.01, "{phases:?}");
        let full = WIDTH - LEFT - RIGHT;
        assert!((phases[2..].iter().sum::<f64>() - full).abs() < 0.05);
        assert!(doc.contains("idle-4G &lt;run 1&gt;"));
    }

    #[test]
    fn local_and_failed_and_foreign_json() {
        let mut v = sample();
        v["stats"]["passes"] = serde_json::json!([]);
        v["stats"]["local"] = serde_json::json!(true);
        let t = Timeline::from_json(&v, "local").unwrap();
        let doc = t.render();
        roxmltree::Document::parse(&doc).expect("well-formed XML");
        assert!(doc.contains("local: memory handed over") && doc.contains("destination restore"));
        assert!(!doc.contains("Passes:"), "no empty pass panels");
        let failed = serde_json::json!({"ok": false, "error": "cancelled"});
        assert!(Timeline::from_json(&failed, "x")
            .unwrap_err()
            .contains("cancelled"));
        let e = Timeline::from_json(&serde_json::json!({"a": 1}), "x").unwrap_err();
        assert!(e.contains("migrate --json"), "{e}");
        v["stats"]["downtime_phases_us"] = serde_json::json!([["pause"]]);
        assert!(Timeline::from_json(&v, "x").is_err());
    }
}
