//! The one error of a file or folder operation that xtask's chores share.

use std::path::PathBuf;

/// A file or folder operation that failed: what was being done, and on which path.
#[derive(Debug, thiserror::Error)]
#[error("{what} ({}): {source}", path.display())]
pub struct FileError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    /// For `map_err`: `fs::write(&path, text).map_err(FileError::on("cannot write x", &path))`.
    pub fn on<'a>(
        what: &'static str,
        path: impl Into<PathBuf> + 'a,
    ) -> impl FnOnce(std::io::Error) -> FileError + 'a {
        move |source| FileError {
            what,
            path: path.into(),
            source,
        }
    }
}
