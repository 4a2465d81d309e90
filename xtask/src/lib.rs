//! aksnet's chores as a library, shared by the `xtask` binary and the end-to-end tests.

pub mod apt;
pub mod bench;
pub mod check;
pub mod cmd;
pub mod file_error;
pub mod image;
pub mod lab;
pub mod setup;
pub mod vm;
