//! The bench's results: medians, the machine they came from, and the table printed and written
//! to BENCHMARKS.md.

use std::fmt::Write;
use std::process::Command;

/// The median of `values` (the mean of the two middle ones for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// What the figures ran on.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cores: String,
    pub memory: String,
    pub cpu: String,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Machine {
        let run = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "unknown".into())
        };
        let proc_field = |file: &str, key: &str| {
            std::fs::read_to_string(file)
                .ok()
                .and_then(|text| {
                    text.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        (k.trim() == key).then(|| v.trim().to_string())
                    })
                })
                .unwrap_or_else(|| "unknown".into())
        };
        let memory = proc_field("/proc/meminfo", "MemTotal");
        let memory = memory
            .trim_end_matches(" kB")
            .parse::<f64>()
            .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
            .unwrap_or(memory);
        Machine {
            cores: run("nproc", &[]),
            memory,
            cpu: proc_field("/proc/cpuinfo", "model name"),
            kernel: run("uname", &["-r"]),
        }
    }
}

/// One line of the results table.
#[derive(Clone, Debug)]
pub struct Row {
    pub section: &'static str,
    pub figure: String,
    pub value: String,
    /// How the value was aggregated, e.g. "median of 5 runs".
    pub runs: String,
    /// The same figure for the baseline binary, where it was measured too.
    pub before: Option<String>,
}

impl Row {
    pub fn new(
        section: &'static str,
        figure: impl Into<String>,
        value: impl Into<String>,
        runs: impl Into<String>,
    ) -> Row {
        Row {
            section,
            figure: figure.into(),
            value: value.into(),
            runs: runs.into(),
            before: None,
        }
    }
}

pub struct Report {
    pub machine: Machine,
    /// What else ran on the machine meanwhile: `/proc/loadavg` at the start and at the end.
    pub load: (String, String),
    /// Names the baseline binary whose figures fill the "before" column, if one was measured.
    pub baseline: Option<String>,
    pub quick: bool,
    pub rows: Vec<Row>,
    /// Method notes and findings, one paragraph each.
    pub notes: Vec<String>,
}

impl Report {
    /// The results as a Markdown table (also readable as plain text).
    pub fn table(&self) -> String {
        let before = self.baseline.as_ref().map(|b| format!("Before ({b})"));
        let mut header = vec!["Area", "Figure", "Value"];
        header.extend(before.as_deref());
        header.push("Aggregation");
        let cells: Vec<Vec<&str>> = self
            .rows
            .iter()
            .map(|r| {
                let mut c = vec![r.section, r.figure.as_str(), r.value.as_str()];
                if before.is_some() {
                    c.push(r.before.as_deref().unwrap_or("—"));
                }
                c.push(r.runs.as_str());
                c
            })
            .collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                cells
                    .iter()
                    .map(|c| c[i].chars().count())
                    .chain([header[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |c: &[&str]| {
            let mut s = String::from("|");
            for (cell, w) in c.iter().zip(&widths) {
                let _ = write!(s, " {cell}{} |", " ".repeat(w - cell.chars().count()));
            }
            s.push('\n');
            s
        };
        let mut out = line(&header);
        out.push('|');
        for w in &widths {
            let _ = write!(out, "{}|", "-".repeat(w + 2));
        }
        out.push('\n');
        for c in &cells {
            out.push_str(&line(c));
        }
        out
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = String::from("# aksnet benchmarks\n\n");
        let _ = writeln!(
            out,
            "Written by `cargo xtask bench{}`. Machine: {} cores (`nproc`), {} memory, CPU {}; \
             kernel {} (`uname -r`). Load average (`/proc/loadavg`) {} at the start, {} at the end: \
             the machine is shared, so CPU-time figures (which hold under load) are the ones to \
             quote, wall-time rates less so. Every figure is a median; the last column says over \
             what.\n",
            if self.quick { " --quick" } else { "" },
            m.cores,
            m.memory,
            m.cpu,
            m.kernel,
            self.load.0,
            self.load.1
        );
        if self.quick {
            out.push_str(
                "This is a `--quick` smoke run: few runs, small counts. Do not quote it.\n\n",
            );
        }
        out.push_str(&self.table());
        out.push_str("\n## How these were measured\n\n");
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        out
    }
}

/// The first three fields of `/proc/loadavg` (1, 5 and 15 minutes).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// `12345.6` → `12 346`; readable counts and rates.
pub fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".into();
    }
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(ch);
    }
    if value < 0.0 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(1234567.4), "1 234 567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(f64::NAN), "n/a");
    }

    #[test]
    fn table_columns_line_up() {
        let report = Report {
            machine: Machine {
                cores: "2".into(),
                memory: "1 GiB".into(),
                cpu: "x".into(),
                kernel: "6".into(),
            },
            load: ("1.0".into(), "2.0".into()),
            baseline: None,
            quick: false,
            rows: vec![
                Row::new("a", "figure", "1", "median of 3 runs"),
                Row::new("bb", "f", "22", "-"),
            ],
            notes: vec![],
        };
        let table = report.table();
        let lengths: Vec<usize> = table.lines().map(|l| l.chars().count()).collect();
        assert!(lengths.windows(2).all(|w| w[0] == w[1]), "{table}");
        assert!(table.contains("| bb   | f      | 22    | -"), "{table}");
    }
}
