//! `bench/report.html`: the scenarios as charts, one self-contained page (inline SVG from the
//! `chart` crate, no scripts, no external fonts or styles): total time, downtime and bytes
//! for minivmm and QEMU (median bars, min-max whiskers), and for each scenario the timeline
//! of minivmm's median run (passes, rates, setup and downtime phases).

use std::fmt::Write;
use std::path::Path;

use chart::svg::escape;
use chart::{Bar, BarChart, Group, Timeline};

use crate::scenario::{Measure, Scenario};

/// One scenario's runs.
pub struct Runs<'a> {
    pub scenario: &'a Scenario,
    pub ours: &'a [Measure],
    pub theirs: &'a [Measure],
}

fn bar(series: &str, runs: &[Measure], f: fn(&Measure) -> f64) -> Bar {
    let mut v: Vec<f64> = runs.iter().map(f).filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let nan = f64::NAN;
    Bar {
        series: series.to_string(),
        median: v.get(v.len() / 2).copied().unwrap_or(nan),
        min: v.first().copied().unwrap_or(nan),
        max: v.last().copied().unwrap_or(nan),
    }
}

fn chart(title: &str, unit: &str, runs: &[&Runs<'_>], f: fn(&Measure) -> f64) -> String {
    BarChart {
        title: title.to_string(),
        unit: unit.to_string(),
        groups: runs
            .iter()
            .map(|r| Group {
                label: r.scenario.name.to_string(),
                bars: vec![bar("minivmm", r.ours, f), bar("QEMU 7.2", r.theirs, f)],
            })
            .collect(),
    }
    .render()
}

/// The run whose total time is the median.
fn median_run(runs: &[Measure]) -> Option<&Measure> {
    let mut v: Vec<&Measure> = runs.iter().collect();
    v.sort_by(|a, b| a.total_ms.total_cmp(&b.total_ms));
    v.get(v.len() / 2).copied()
}

/// Writes the report to `path`; `header` says how it was made (command, host, date).
pub fn write(path: &Path, header: &str, runs: &[Runs<'_>]) -> std::io::Result<()> {
    let mut h = String::new();
    h.push_str(concat!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>minivmm migration benchmark</title>\n<style>",
        "body{font-family:sans-serif;max-width:800px;margin:2em auto;color:#222}",
        "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;text-align:right}",
        "th:first-child,td:first-child{text-align:left}tr:nth-child(even){background:#f4f4f4}",
        "svg{display:block;margin:1em 0}</style></head><body>\n",
        "<h1>minivmm migration benchmark</h1>\n"
    ));
    let _ = writeln!(h, "<p>{}</p>", escape(header));
    h.push_str(concat!(
        "<p>Bars: median of the repetitions; whiskers: min to max. Downtime is the guest's ",
        "own (stopped on the source until running on the destination, for QEMU from its QMP ",
        "STOP and RESUME events). Local scenarios hand guest memory over by descriptor ",
        "(<code>run --mem-shared</code>, <code>migrate --local</code>); QEMU 7.2 has no ",
        "counterpart here.</p>\n"
    ));
    let all: Vec<&Runs<'_>> = runs.iter().collect();
    let copying: Vec<&Runs<'_>> = runs.iter().filter(|r| !r.scenario.local).collect();
    let local: Vec<&Runs<'_>> = runs.iter().filter(|r| r.scenario.local).collect();
    h.push_str("<h2>Every scenario</h2>\n");
    h.push_str(&chart("Total migration time", "ms", &all, |m| m.total_ms));
    h.push_str(&chart("Downtime", "ms", &all, |m| m.downtime_ms));
    h.push_str(&chart("Transferred", "MiB", &all, |m| {
        m.bytes / (1024.0 * 1024.0)
    }));
    if !local.is_empty() && !copying.is_empty() {
        h.push_str("<h2>Local migration alone (its own scale)</h2>\n");
        h.push_str(&chart("Local: total time", "ms", &local, |m| m.total_ms));
        h.push_str(&chart("Local: downtime", "ms", &local, |m| m.downtime_ms));
    }
    h.push_str("<h2>One migration per scenario</h2>\n");
    for r in runs {
        let s = r.scenario;
        let _ = writeln!(
            h,
            "<h3>{} <small>(mem {}, {} vCPU, \"{}\"{})</small></h3>",
            escape(s.name),
            escape(s.mem),
            s.cpus,
            escape(s.cmdline),
            if s.local { ", local" } else { "" }
        );
        h.push_str(&table(r));
        let timeline = median_run(r.ours)
            .and_then(|m| m.stats.as_ref())
            .map(|v| Timeline::from_json(v, &format!("{}: minivmm's median run", s.name)));
        match timeline {
            Some(Ok(t)) => h.push_str(&t.render()),
            Some(Err(e)) => {
                let _ = writeln!(h, "<p>No timeline: {}</p>", escape(&e));
            }
            None => h.push_str("<p>No minivmm run succeeded.</p>\n"),
        }
    }
    h.push_str("</body></html>\n");
    std::fs::write(path, h)
}

/// One figure of a run.
type Metric = fn(&Measure) -> f64;

fn cell(runs: &[Measure], f: Metric) -> String {
    let b = bar("", runs, f);
    if !b.median.is_finite() {
        "-".into()
    } else if b.min == b.max {
        format!("{:.1}", b.median)
    } else {
        format!("{:.1} [{:.1}-{:.1}]", b.median, b.min, b.max)
    }
}

fn table(r: &Runs<'_>) -> String {
    let rows: &[(&str, Metric)] = &[
        ("total ms", |m| m.total_ms),
        ("downtime ms", |m| m.downtime_ms),
        ("MiB transferred", |m| m.bytes / (1024.0 * 1024.0)),
        ("passes", |m| m.passes),
        ("source CPU ms", |m| m.src_cpu_ms),
    ];
    let mut t = String::from("<table><tr><th></th><th>minivmm</th><th>QEMU 7.2</th></tr>\n");
    for (name, f) in rows {
        let _ = writeln!(
            t,
            "<tr><td>{name}</td><td>{}</td><td>{}</td></tr>",
            cell(r.ours, *f),
            cell(r.theirs, *f)
        );
    }
    t.push_str("</table>\n");
    t
}
