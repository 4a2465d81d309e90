//! One bounded boot under QEMU's TCG (KVM hangs on this nested machine): the guest's serial
//! console is the whole result.

use anyhow::{Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What came back from a boot: the console, and whether the guest stopped by itself.
pub struct Boot {
    pub console: String,
    pub timed_out: bool,
}

/// Boots `vmlinuz` with `initramfs` and waits at most `limit` for the guest to power off.
pub fn boot(vmlinuz: &Path, initramfs: &Path, console: &Path, limit: Duration) -> Result<Boot> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "1024"])
        .args([
            "-nographic",
            "-no-reboot",
            "-monitor",
            "none",
            "-nic",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=3 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context(
            "cannot start qemu-system-x86_64 (`cargo xtask setup` installs qemu-system-x86)",
        )?;
    let deadline = Instant::now() + limit;
    let timed_out = loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                let mut stderr = String::new();
                if let Some(mut err) = child.stderr.take() {
                    use std::io::Read;
                    let _ = err.read_to_string(&mut stderr);
                }
                anyhow::bail!("qemu-system-x86_64 failed ({status}): {}", stderr.trim());
            }
            break false;
        }
        if Instant::now() >= deadline {
            // Killed by its id: the qemu this function started, nothing else.
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let console = std::fs::read(console)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    Ok(Boot { console, timed_out })
}
