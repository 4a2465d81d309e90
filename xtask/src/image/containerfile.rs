//! The Dockerfile with its builder stage replaced by a binary built on the host.
//!
//! The builder stage needs a Rust base image, which no registry here can give. Every other line
//! (the global `ARG`s, the runtime stage) is kept as written, so the image built here and the one
//! a registry build makes differ only in how the binary was compiled.

/// The stage that compiles the agent.
const BUILDER: &str = "builder";
/// Where the builder stage leaves the agent, for the runtime stage's `COPY --from=builder`.
const AGENT_IN_BUILDER: &str = "/out/aksnet-agent";
/// The agent's file name in the build context.
pub const AGENT_IN_CONTEXT: &str = "aksnet-agent";
/// The global `ARG` naming the runtime stage's base image.
pub const BASE_ARG: &str = "RUNTIME_BASE";
/// The label of the stage holding the host's binary, by which the build removes it afterwards
/// (the runtime stage copies from it, so nothing is based on it).
pub const AGENT_STAGE_LABEL: &str = "io.aksnet.stage=host-agent";

/// The Dockerfile `text` with the builder stage replaced by one that holds the context's
/// `aksnet-agent` at the path the runtime stage copies it from.
pub fn with_prebuilt_agent(text: &str) -> Result<String, String> {
    let stages = split(text);
    let (preamble, stages) = stages.split_first().expect("split returns the preamble");
    if !stages.iter().any(|s| stage_name(s) == Some(BUILDER)) {
        return Err(format!(
            "no stage named `{BUILDER}`; xtask image replaces that stage"
        ));
    }
    let copies_agent = stages.iter().any(|stage| {
        stage.lines().any(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            words.first() == Some(&"COPY")
                && words.contains(&format!("--from={BUILDER}").as_str())
                && words.contains(&AGENT_IN_BUILDER)
        })
    });
    if !copies_agent {
        return Err(format!(
            "no stage copies {AGENT_IN_BUILDER} from `{BUILDER}`; xtask image puts the host's \
             binary there: update xtask/src/image/containerfile.rs with the Dockerfile"
        ));
    }
    if !preamble
        .lines()
        .any(|line| line.trim_start().starts_with(&format!("ARG {BASE_ARG}")))
    {
        return Err(format!(
            "no global `ARG {BASE_ARG}` before the first FROM; xtask image sets the runtime base \
             through it"
        ));
    }
    let mut out = preamble.to_string();
    for stage in stages {
        if stage_name(stage) == Some(BUILDER) {
            out.push_str(&format!(
                "# The agent built on the host (cargo xtask image).\n\
                 FROM scratch AS {BUILDER}\n\
                 LABEL {AGENT_STAGE_LABEL}\n\
                 COPY {AGENT_IN_CONTEXT} {AGENT_IN_BUILDER}\n\n"
            ));
        } else {
            out.push_str(stage);
        }
    }
    Ok(out)
}

/// The text before the first `FROM`, then each stage from its `FROM` line to the next one.
fn split(text: &str) -> Vec<&str> {
    let mut starts = vec![0];
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if is_from(line) {
            starts.push(offset);
        }
        offset += line.len();
    }
    starts.push(text.len());
    starts.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

fn is_from(line: &str) -> bool {
    line.split_whitespace()
        .next()
        .is_some_and(|word| word.eq_ignore_ascii_case("FROM"))
}

/// `FROM image AS name` → `name`.
fn stage_name(stage: &str) -> Option<&str> {
    let words: Vec<&str> = stage.lines().next()?.split_whitespace().collect();
    match words.as_slice() {
        [_, _, r#as, name] if r#as.eq_ignore_ascii_case("AS") => Some(name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_dockerfile_keeps_its_runtime_stage_verbatim() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../Dockerfile");
        let text = std::fs::read_to_string(path).unwrap();
        let out = with_prebuilt_agent(&text).unwrap();
        let runtime = split(&text)
            .into_iter()
            .find(|s| stage_name(s) == Some("runtime"))
            .expect("the Dockerfile has a runtime stage");
        assert!(out.ends_with(runtime), "{out}");
        assert!(!out.contains("cargo build"), "{out}");
        assert!(out.contains(
            "FROM scratch AS builder\nLABEL io.aksnet.stage=host-agent\n\
             COPY aksnet-agent /out/aksnet-agent\n"
        ));
    }

    #[test]
    fn refuses_a_dockerfile_whose_runtime_stage_copies_something_else() {
        let text = "ARG RUNTIME_BASE=x\nFROM rust AS builder\nRUN make\n\
                    FROM ${RUNTIME_BASE} AS runtime\nCOPY --from=builder /bin/agent /a\n";
        let err = with_prebuilt_agent(text).unwrap_err();
        assert!(err.contains("/out/aksnet-agent"), "{err}");
        let no_builder = "ARG RUNTIME_BASE=x\nFROM rust AS build\nFROM x AS runtime\n";
        assert!(with_prebuilt_agent(no_builder)
            .unwrap_err()
            .contains("builder"));
    }
}
