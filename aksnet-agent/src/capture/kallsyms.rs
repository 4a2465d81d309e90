//! What the kernel's symbol table says about a function the agent hooks: whether it lives in a
//! module, and whether the compiler split it (`nf_ct_delete.part.0` on Debian's 5.10), in which
//! case a probe on the plain name misses every caller that calls the part directly.

use std::path::Path;

/// How `function` appears in the symbol table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FunctionSymbols {
    /// The module that holds it (`nf_conntrack`), `None` when built in or not found.
    pub module: Option<String>,
    /// Whether the plain name is a symbol.
    pub whole: bool,
    /// Compiler-made copies that callers may call instead of the plain name: partial inlining
    /// (`.part.N`), scalar replacement of arguments (`.isra.N`), constant propagation
    /// (`.constprop.N`). `.cold` parts are not entry points and are left out.
    pub split: Vec<String>,
}

impl FunctionSymbols {
    /// The `.part.N` copy: GCC's partial inlining keeps the leading arguments of the original,
    /// so a probe reading the first argument reads the same object there.
    pub fn part(&self) -> Option<&str> {
        self.split
            .iter()
            .map(String::as_str)
            .find(|s| s.contains(".part."))
    }
}

/// Reads `/proc/kallsyms` (or `path`) for `function`.
pub fn lookup(path: &Path, function: &str) -> std::io::Result<FunctionSymbols> {
    Ok(parse(&std::fs::read_to_string(path)?, function))
}

/// `text` is kallsyms' format: `address type name [module]` per line.
pub fn parse(text: &str, function: &str) -> FunctionSymbols {
    let mut found = FunctionSymbols::default();
    for line in text.lines() {
        let mut words = line.split_whitespace().skip(2);
        let Some(name) = words.next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(function) else {
            continue;
        };
        let module = words
            .next()
            .map(|m| m.trim_start_matches('[').trim_end_matches(']').to_owned());
        let compiler_copy = [".part.", ".isra.", ".constprop."]
            .iter()
            .any(|kind| rest.starts_with(kind))
            && !rest.contains(".cold");
        if rest.is_empty() {
            found.whole = true;
        } else if compiler_copy {
            found.split.push(name.to_owned());
        } else {
            continue;
        }
        if module.is_some() {
            found.module = module;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    // Debian 5.10.0-32-cloud-amd64's nf_conntrack.ko, trimmed.
    const DEBIAN_5_10: &str = "\
ffffffffc03a1230 t nf_ct_delete.part.0\t[nf_conntrack]
ffffffffc03a1400 T nf_ct_delete\t[nf_conntrack]
ffffffffc03a1500 t nf_ct_delete_from_lists\t[nf_conntrack]
ffffffffc03a1600 t nf_ct_delete.cold\t[nf_conntrack]
ffffffff81a00000 T nf_nat_setup_info\t[nf_nat]
";

    #[test]
    fn a_split_function_shows_its_part_and_module() {
        let s = parse(DEBIAN_5_10, "nf_ct_delete");
        assert!(s.whole);
        assert_eq!(s.module.as_deref(), Some("nf_conntrack"));
        assert_eq!(s.split, ["nf_ct_delete.part.0"]);
        assert_eq!(s.part(), Some("nf_ct_delete.part.0"));
    }

    #[test]
    fn a_whole_function_has_no_copies_and_longer_names_do_not_match() {
        let s = parse(DEBIAN_5_10, "nf_nat_setup_info");
        assert_eq!(
            s,
            FunctionSymbols {
                module: Some("nf_nat".into()),
                whole: true,
                split: vec![]
            }
        );
        let builtin = parse("ffffffff81000000 T nf_ct_delete\n", "nf_ct_delete");
        assert_eq!(builtin.module, None);
        assert!(builtin.whole && builtin.split.is_empty());
    }

    #[test]
    fn isra_and_constprop_copies_are_reported_but_are_not_a_part() {
        let s = parse(
            "0 t nf_ct_delete.isra.0 [nf_conntrack]\n0 t nf_ct_delete.constprop.0 [nf_conntrack]\n",
            "nf_ct_delete",
        );
        assert!(!s.whole);
        assert_eq!(s.split.len(), 2);
        assert_eq!(s.part(), None);
    }
}
