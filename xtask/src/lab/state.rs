//! The state file a lab left up by `cargo xtask lab up` is found by (`lab run`, `lab down`).

use crate::file_error::FileError;
use crate::lab::error::LabError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabState {
    pub cni: String,
    pub prefix: String,
    pub work_dir: PathBuf,
    pub topology: PathBuf,
    /// The servers the lab started (teardown also kills anything else inside its namespaces).
    pub pids: Vec<u32>,
    /// `public` or `private` (state files written before it existed: public).
    #[serde(default = "public")]
    pub api_server: String,
}

fn public() -> String {
    "public".into()
}

pub fn state_file(state_dir: &Path) -> PathBuf {
    state_dir.join("current.toml")
}

pub fn write(path: &Path, state: &LabState) -> Result<(), LabError> {
    let text = toml::to_string(state).map_err(|e| LabError::State {
        path: path.into(),
        detail: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(FileError::on("cannot write the lab state", path))?;
    Ok(())
}

pub fn read(path: &Path) -> Result<LabState, LabError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LabError::NoLab { path: path.into() })
        }
        Err(source) => return Err(FileError::on("cannot read the lab state", path)(source).into()),
    };
    toml::from_str(&text).map_err(|e| LabError::State {
        path: path.into(),
        detail: e.to_string(),
    })
}
