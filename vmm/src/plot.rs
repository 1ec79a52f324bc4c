//! `minivmm plot mig.json -o mig.svg`: one migration's timeline (the `chart` crate, which
//! `make bench` draws its report with too) from what `minivmm migrate --json` printed.

use std::io::{Read, Write};
use std::path::PathBuf;

use crate::cli::PlotArgs;

/// Largest input read: a `migrate --json` document is a few KiB per pass.
pub const MAX_INPUT: u64 = 16 << 20;

/// Errors of `minivmm plot`.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is larger than {MAX_INPUT} bytes: not the output of `migrate --json`")]
    TooLarge(PathBuf),
    #[error("{0} is not JSON")]
    Json(PathBuf, #[source] serde_json::Error),
    #[error("{0}: {1}")]
    Content(PathBuf, String),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// Reads the migration JSON, draws it, writes the SVG.
pub fn plot(args: &PlotArgs) -> Result<(), PlotError> {
    let path = args.input.clone();
    let read_err = |e| PlotError::Read(path.clone(), e);
    let mut text = Vec::new();
    let reader: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(&path).map_err(read_err)?)
    };
    reader
        .take(MAX_INPUT + 1)
        .read_to_end(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_INPUT {
        return Err(PlotError::TooLarge(path));
    }
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| PlotError::Json(path.clone(), e))?;
    let title = args.title.clone().unwrap_or_else(|| {
        let to = value.get("to").and_then(|t| t.as_str()).unwrap_or("");
        format!("{} {to}", path.display()).trim().to_string()
    });
    let timeline = chart::Timeline::from_json(&value, &title)
        .map_err(|e| PlotError::Content(path.clone(), e))?;
    let svg = timeline.render();
    match &args.output {
        Some(out) => std::fs::write(out, svg).map_err(|e| PlotError::Write(out.clone(), e)),
        None => std::io::stdout()
            .write_all(svg.as_bytes())
            .map_err(|e| PlotError::Write("stdout".into(), e)),
    }
}
