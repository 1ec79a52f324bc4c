//! A minimal SVG writer: the elements the charts use, attribute and text values escaped.

use std::fmt::Write;

/// Escapes `&`, `<`, `>`, `"` and `'` for XML text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Text anchor.
#[derive(Clone, Copy, Debug)]
pub enum Anchor {
    Start,
    Middle,
    End,
}

impl Anchor {
    fn as_str(self) -> &'static str {
        match self {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        }
    }
}

/// An SVG document being written.
pub struct Svg {
    width: f64,
    height: f64,
    body: String,
}

/// Coordinates with two decimals at most.
fn n(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl Svg {
    pub fn new(width: f64, height: f64) -> Svg {
        Svg {
            width,
            height,
            body: String::new(),
        }
    }

    /// A rectangle; `title` becomes a tooltip (`<title>`).
    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, title: Option<&str>) {
        self.rect_class(x, y, w, h, fill, title, None);
    }

    /// [`rect`](Self::rect) with a `class` attribute (what the tests measure).
    #[allow(clippy::too_many_arguments)]
    pub fn rect_class(
        &mut self,
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: &str,
        title: Option<&str>,
        class: Option<&str>,
    ) {
        let _ = write!(
            self.body,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{}""#,
            n(x),
            n(y),
            n(w.max(0.0)),
            n(h.max(0.0)),
            escape(fill)
        );
        if let Some(c) = class {
            let _ = write!(self.body, r#" class="{}""#, escape(c));
        }
        match title {
            Some(t) => {
                let _ = writeln!(self.body, "><title>{}</title></rect>", escape(t));
            }
            None => self.body.push_str("/>\n"),
        }
    }

    pub fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, width: f64) {
        let _ = writeln!(
            self.body,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="{}"/>"#,
            n(x1),
            n(y1),
            n(x2),
            n(y2),
            escape(stroke),
            n(width)
        );
    }

    /// A polyline through `points` (no fill), with round markers of radius `dot` at each.
    pub fn polyline(&mut self, points: &[(f64, f64)], stroke: &str, dot: f64) {
        if points.is_empty() {
            return;
        }
        let pts: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{},{}", n(x), n(y)))
            .collect();
        let _ = writeln!(
            self.body,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
            pts.join(" "),
            escape(stroke)
        );
        for &(x, y) in points {
            let _ = writeln!(
                self.body,
                r#"<circle cx="{}" cy="{}" r="{}" fill="{}"/>"#,
                n(x),
                n(y),
                n(dot),
                escape(stroke)
            );
        }
    }

    pub fn text(&mut self, x: f64, y: f64, size: f64, anchor: Anchor, s: &str) {
        let _ = writeln!(
            self.body,
            r#"<text x="{}" y="{}" font-size="{}" text-anchor="{}">{}</text>"#,
            n(x),
            n(y),
            n(size),
            anchor.as_str(),
            escape(s)
        );
    }

    /// Text turned 90° counter-clockwise around its anchor (a y-axis title).
    pub fn vtext(&mut self, x: f64, y: f64, size: f64, s: &str) {
        let _ = writeln!(
            self.body,
            r#"<text x="{0}" y="{1}" font-size="{2}" text-anchor="middle" transform="rotate(-90 {0} {1})">{3}</text>"#,
            n(x),
            n(y),
            n(size),
            escape(s)
        );
    }

    /// The finished document.
    pub fn finish(self) -> String {
        format!(
            concat!(
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" "#,
                r#"font-family="sans-serif">"#,
                "\n",
                r#"<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>"#,
                "\n{body}</svg>\n"
            ),
            w = n(self.width),
            h = n(self.height),
            body = self.body
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_into_well_formed_xml() {
        let mut s = Svg::new(100.0, 50.0);
        s.text(1.0, 2.0, 10.0, Anchor::Start, "a < b & \"c\" 'd' \u{1}");
        s.rect(0.0, 0.0, 5.0, 5.0, "red", Some("<tip>"));
        s.polyline(&[(0.0, 1.0), (2.5, 3.333)], "#000", 2.0);
        s.vtext(5.0, 25.0, 9.0, "y & axis");
        let doc = s.finish();
        let xml = roxmltree::Document::parse(&doc).expect("well-formed");
        let text: Vec<&str> = xml
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .collect();
        assert_eq!(text, ["a < b & \"c\" 'd'  ", "y & axis"]);
        assert!(doc.contains(r#"points="0,1 2.5,3.33""#), "{doc}");
    }
}
