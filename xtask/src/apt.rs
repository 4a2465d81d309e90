//! The Debian archive this machine's apt is configured with: the project names no package
//! registry host itself, it uses whatever mirror the machine already trusts.

use std::path::{Path, PathBuf};

const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

/// Debian's release codenames and aliases; a suite is Debian's when its name, less a `-updates`,
/// `-backports` or `-proposed-updates` suffix, is one of these. Security suites are served from
/// another archive (`debian-security`) and are not Debian's main archive.
const DEBIAN_RELEASES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
    "experimental",
];
const DEBIAN_SUFFIXES: &[&str] = &["", "-updates", "-backports", "-proposed-updates"];

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("cannot read apt's sources {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no Debian archive in apt's sources (read: {read}): add an entry with a Debian suite \
         (e.g. `bookworm`) and the `main` component to {SOURCES_DIR}/debian.sources or \
         {SOURCES_LIST}, pointing at the Debian mirror this machine may use"
    )]
    NotFound { read: String },
}

/// One `deb` source: its archive URI, suites and components.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    uri: String,
    suites: Vec<String>,
    components: Vec<String>,
}

/// The base URI of the Debian archive apt is configured with on this machine (without a trailing
/// `/`), usable for any Debian suite: `<uri>/dists/<suite>`.
pub fn debian_archive() -> Result<String, AptError> {
    let mut read = Vec::new();
    let mut sources = Vec::new();
    let list = Path::new(SOURCES_LIST);
    if list.exists() {
        sources.extend(one_line_style(&read_file(list)?));
        read.push(list.display().to_string());
    }
    let mut files = match std::fs::read_dir(SOURCES_DIR) {
        Ok(dir) => dir
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(AptError::Read {
                path: SOURCES_DIR.into(),
                source,
            })
        }
    };
    // apt reads them in name order; files with other extensions (`.disabled`, …) it ignores.
    files.sort();
    for file in files {
        let parsed = match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => deb822_style(&read_file(&file)?),
            Some("list") => one_line_style(&read_file(&file)?),
            _ => continue,
        };
        sources.extend(parsed);
        read.push(file.display().to_string());
    }
    choose(&sources).ok_or_else(|| AptError::NotFound {
        read: if read.is_empty() {
            "nothing found".into()
        } else {
            read.join(", ")
        },
    })
}

fn read_file(path: &Path) -> Result<String, AptError> {
    std::fs::read_to_string(path).map_err(|source| AptError::Read {
        path: path.into(),
        source,
    })
}

fn is_debian_suite(suite: &str) -> bool {
    DEBIAN_RELEASES.iter().any(|release| {
        DEBIAN_SUFFIXES
            .iter()
            .any(|suffix| suite == format!("{release}{suffix}"))
    })
}

/// The first source carrying `main` and a Debian suite.
fn choose(sources: &[Source]) -> Option<String> {
    sources
        .iter()
        .find(|s| {
            s.components.iter().any(|c| c == "main") && s.suites.iter().any(|s| is_debian_suite(s))
        })
        .map(|s| s.uri.trim_end_matches('/').to_owned())
}

/// `deb [options] uri suite component…` lines (sources.list and `*.list`).
fn one_line_style(text: &str) -> Vec<Source> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("").trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            // `[arch=amd64 signed-by=…]` options come before the URI.
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']')?.1,
                None => rest,
            };
            let mut words = rest.split_whitespace();
            let uri = words.next()?.to_owned();
            let suite = words.next()?.to_owned();
            Some(Source {
                uri,
                suites: vec![suite],
                components: words.map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// deb822 stanzas (`*.sources`): blank-line separated, `Field: value`, `Enabled: no` skipped.
fn deb822_style(text: &str) -> Vec<Source> {
    let mut sources = Vec::new();
    let mut stanza: Vec<(String, String)> = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            sources.extend(stanza_sources(&stanza));
            stanza.clear();
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // A continuation line belongs to the field before it.
            if let Some((_, value)) = stanza.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((field, value)) = line.split_once(':') {
            stanza.push((field.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    sources
}

fn stanza_sources(stanza: &[(String, String)]) -> Vec<Source> {
    let field = |name: &str| {
        stanza
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, v)| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let enabled = field("enabled");
    if enabled
        .first()
        .is_some_and(|v| v.eq_ignore_ascii_case("no"))
    {
        return Vec::new();
    }
    if !field("types").iter().any(|t| t == "deb") {
        return Vec::new();
    }
    let (suites, components) = (field("suites"), field("components"));
    field("uris")
        .into_iter()
        .map(|uri| Source {
            uri,
            suites: suites.clone(),
            components: components.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
Types: deb
# a comment
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb deb-src
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

    #[test]
    fn deb822_picks_the_main_archive_not_security() {
        assert_eq!(
            choose(&deb822_style(DEB822)).as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn deb822_skips_disabled_stanzas_and_other_archives() {
        let text = "\
Types: deb
URIs: http://off.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb
URIs: https://vendor.example/node_20.x
Suites: nodistro
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main
";
        assert_eq!(choose(&deb822_style(text)), None);
    }

    #[test]
    fn one_line_style_with_options_and_comments() {
        let text = "\
# deb http://commented.example/debian bookworm main
deb https://vendor.example/apt cloud-sdk-bookworm main
deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian trixie main non-free # why
deb http://mirror.example/debian-security trixie-security main
";
        let sources = one_line_style(text);
        assert_eq!(sources.len(), 3);
        assert_eq!(
            sources[1],
            Source {
                uri: "http://mirror.example/debian".into(),
                suites: vec!["trixie".into()],
                components: vec!["main".into(), "non-free".into()],
            }
        );
        assert_eq!(
            choose(&sources).as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn a_suite_without_main_is_not_chosen() {
        let sources = one_line_style("deb http://mirror.example/debian bookworm contrib\n");
        assert_eq!(choose(&sources), None);
    }

    #[test]
    fn debian_suites_are_told_from_others() {
        for suite in ["bookworm", "bookworm-updates", "sid", "stable-backports"] {
            assert!(is_debian_suite(suite), "{suite}");
        }
        for suite in [
            "bookworm-security",
            "jammy",
            "nodistro",
            "cloud-sdk-bookworm",
        ] {
            assert!(!is_debian_suite(suite), "{suite}");
        }
    }
}
