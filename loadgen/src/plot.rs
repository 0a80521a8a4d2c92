//! `--plot out.svg`: the latency percentile curves of all targets on one chart, drawn as a
//! small hand-written SVG.
//!
//! The x axis is HdrHistogram's "nines" scale: x = log10(1 / (1 - q)), so 90%, 99%, 99.9% and
//! so on are evenly spaced and the tail gets as much room as the median. It stops at the last
//! nine the largest sample can resolve (10^x samples for x nines).

use std::fmt::Write as _;
use std::io::{self, Write};

use crate::stats::Latency;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 540.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// Points per nine along each curve.
const POINTS_PER_NINE: u32 = 50;
/// The longest tail drawn (99.9999%).
const MAX_NINES: u32 = 6;
/// Horizontal grid lines.
const Y_TICKS: u32 = 5;
/// Line colours, in target order (a colour-blind-safe palette).
const COLOURS: [&str; 8] = [
    "#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442",
];

/// Writes the chart of `series` (name, histogram) to `out` (the `--plot` file, created before
/// the run).
pub fn write(mut out: impl Write, title: &str, series: &[(&str, &Latency)]) -> io::Result<()> {
    out.write_all(svg(title, series).as_bytes())?;
    out.flush()
}

/// The chart as SVG text.
pub fn svg(title: &str, series: &[(&str, &Latency)]) -> String {
    let most = series.iter().map(|(_, h)| h.count()).max().unwrap_or(0);
    let nines = nines_for(most);
    let curves: Vec<Vec<(f64, f64)>> = series.iter().map(|(_, h)| curve(h, nines)).collect();
    let top_us = curves
        .iter()
        .flatten()
        .map(|&(_, us)| us)
        .fold(0.0, f64::max);
    let (unit, scale) = if top_us >= 10_000.0 {
        ("ms", 1_000.0)
    } else {
        ("µs", 1.0)
    };
    let y_max = nice_ceil(top_us / scale);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let px = |x: f64| LEFT + x / f64::from(nines) * plot_w;
    let py = |y: f64| TOP + plot_h - y / y_max * plot_h;

    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        LEFT + plot_w / 2.0,
        escape(title)
    );
    for i in 0..=Y_TICKS {
        let value = y_max * f64::from(i) / f64::from(Y_TICKS);
        let y = py(value);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 8.0,
            y + 4.0,
            trim_number(value)
        );
    }
    for nine in 0..=nines {
        let x = px(f64::from(nine));
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 20.0,
            percentile_label(nine)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 15.0
    );
    let _ = writeln!(
        out,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">latency ({unit})</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    let _ = writeln!(
        out,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    );
    for (i, ((name, _), points)) in series.iter().zip(&curves).enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut path = String::with_capacity(points.len() * 16);
        for &(x, us) in points {
            let _ = write!(path, "{:.1},{:.1} ", px(x), py(us / scale));
        }
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.trim_end()
        );
        let ly = TOP + 10.0 + 22.0 * i as f64;
        let lx = WIDTH - RIGHT + 20.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            escape(name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// How many nines the chart shows for a largest sample count of `count`.
fn nines_for(count: u64) -> u32 {
    let resolvable = (count.max(1) as f64).log10().floor() as u32;
    resolvable.clamp(2, MAX_NINES)
}

/// (nines, latency µs) along `histogram`'s percentile curve; empty if it has no values.
fn curve(histogram: &Latency, nines: u32) -> Vec<(f64, f64)> {
    if histogram.count() == 0 {
        return Vec::new();
    }
    let steps = nines * POINTS_PER_NINE;
    (0..=steps)
        .map(|i| {
            let x = f64::from(i) / f64::from(POINTS_PER_NINE);
            (x, histogram.quantile_us(quantile_at(x)))
        })
        .collect()
}

/// The quantile `x` nines out: 0 -> 0, 1 -> 0.9, 2 -> 0.99.
fn quantile_at(nines: f64) -> f64 {
    1.0 - 10f64.powf(-nines)
}

/// "0%", "90%", "99%", "99.9%", ...
fn percentile_label(nines: u32) -> String {
    match nines {
        0 => "0%".into(),
        1 => "90%".into(),
        n => format!("99.{}%", "9".repeat(n as usize - 2)).replace(".%", "%"),
    }
}

/// The smallest round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten) that
/// is at least `value`; 1 for 0.
fn nice_ceil(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let pow = 10f64.powf(value.log10().floor());
    [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|m| m * pow)
        .find(|&v| v >= value * (1.0 - 1e-12))
        .unwrap_or(10.0 * pow)
}

fn trim_number(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn nines_scale() {
        assert!((quantile_at(0.0)).abs() < 1e-12);
        assert!((quantile_at(1.0) - 0.9).abs() < 1e-12);
        assert!((quantile_at(3.0) - 0.999).abs() < 1e-12);
        let labels: Vec<String> = (0..5).map(percentile_label).collect();
        assert_eq!(labels, ["0%", "90%", "99%", "99.9%", "99.99%"]);
        assert_eq!(nines_for(0), 2);
        assert_eq!(nines_for(50_000), 4);
        assert_eq!(nines_for(u64::MAX), MAX_NINES);
    }

    #[test]
    fn nice_axis_tops() {
        let cases = [
            (0.0, 1.0),
            (0.7, 0.8),
            (1.6, 2.0),
            (2.2, 2.5),
            (3.0, 3.0),
            (9.0, 10.0),
            (106.9, 120.0),
            (420.0, 500.0),
            (1000.0, 1000.0),
        ];
        for (value, want) in cases {
            assert!((nice_ceil(value) - want).abs() < 1e-9, "{value}");
        }
        assert_eq!(trim_number(2.50), "2.5");
        assert_eq!(trim_number(100.0), "100");
    }

    #[test]
    fn chart_has_one_curve_and_legend_entry_per_target() {
        let mut fast = Latency::new();
        let mut slow = Latency::new();
        for i in 1..=1000u64 {
            fast.record(Duration::from_micros(50 + i % 10));
            slow.record(Duration::from_micros(200 + i));
        }
        let empty = Latency::new();
        let text = svg(
            "query <p99>",
            &[("bg", &fast), ("pg&b", &slow), ("none", &empty)],
        );
        assert!(text.starts_with("<svg") && text.ends_with("</svg>\n"));
        assert_eq!(text.matches("<polyline").count(), 3);
        assert!(text.contains("query &lt;p99&gt;"));
        assert!(text.contains(">pg&amp;b</text>"));
        assert!(text.contains(">99.9%</text>"));
        assert!(text.contains("latency (µs)"));
        // 1000 samples resolve three nines: 3 * 50 + 1 points.
        let first = text.split("points=\"").nth(1).expect("a curve");
        let points = first.split('"').next().expect("points").split(' ').count();
        assert_eq!(points, 151);
    }
}
