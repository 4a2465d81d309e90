//! The floor of the agent's BPF time: a program that does nothing (`r0 = 0; exit`), attached by
//! the bench next to the agent to the same tracepoint, `net_dev_start_xmit`, during the cost
//! runs. Its `run_time_ns` is what `kernel.bpf_stats_enabled` charges a run of any program there:
//! the statistics' two clock readings (`sched_clock`) around the call, the call and the JIT's
//! prologue. No program can cost less per run, so its figure per connection says how much of the
//! agent's is the price of being attached at all.
//!
//! It is a raw tracepoint program (`BPF_PROG_TYPE_RAW_TRACEPOINT`): the kernel runs it exactly as
//! it runs the agent's `tp_btf` program (both are raw tracepoint links, `__bpf_trace_run`), and
//! it needs no BTF id. Loaded with the `bpf(2)` syscall directly so that nothing of it lives in
//! the agent's object.

use crate::bench::cost::parse_prog_fdinfo;
use crate::bench::error::BenchError;
use crate::file_error::FileError;
use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const TRACEPOINT: &CStr = c"net_dev_start_xmit";

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to the fields this program needs; the kernel
/// accepts a shorter attribute and reads the rest as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// `union bpf_attr` for `BPF_RAW_TRACEPOINT_OPEN`.
#[repr(C)]
#[derive(Default)]
struct RawTracepointOpen {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

/// `r0 = 0` (`BPF_ALU64 | BPF_MOV | BPF_K`, dst r0, imm 0), then `exit` (`BPF_JMP | BPF_EXIT`):
/// one 8-byte instruction each.
const NOTHING: [u64; 2] = [0xb7, 0x95];

/// The do-nothing program, attached while this value lives.
pub struct Floor {
    prog: OwnedFd,
    _link: OwnedFd,
}

impl Floor {
    pub fn attach() -> Result<Floor, BenchError> {
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..12].copy_from_slice(b"aksnet_floor");
        let load = ProgLoad {
            prog_type: BPF_PROG_TYPE_RAW_TRACEPOINT,
            insn_cnt: NOTHING.len() as u32,
            insns: NOTHING.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            ..ProgLoad::default()
        };
        let prog = bpf(BPF_PROG_LOAD, &load, "load the do-nothing program")?;
        let open = RawTracepointOpen {
            name: TRACEPOINT.as_ptr() as u64,
            prog_fd: prog.as_raw_fd() as u32,
            _pad: 0,
        };
        let link = bpf(
            BPF_RAW_TRACEPOINT_OPEN,
            &open,
            "attach the do-nothing program to the net_dev_start_xmit tracepoint",
        )?;
        Ok(Floor { prog, _link: link })
    }

    /// Its `run_time_ns` and `run_cnt` so far.
    pub fn counters(&self) -> Result<(u64, u64), BenchError> {
        let path = PathBuf::from(format!("/proc/self/fdinfo/{}", self.prog.as_raw_fd()));
        let text = std::fs::read_to_string(&path).map_err(FileError::on("cannot read", &path))?;
        match parse_prog_fdinfo(&text) {
            Some((_, ns, runs)) => Ok((ns, runs)),
            None => Err(BenchError::Parse {
                what: path.display().to_string(),
                detail: format!("no prog_id, run_time_ns and run_cnt in {text:?}"),
            }),
        }
    }
}

/// One `bpf(2)` command that returns a file descriptor.
fn bpf<T>(cmd: libc::c_long, attr: &T, what: &'static str) -> Result<OwnedFd, BenchError> {
    // SAFETY: `attr` is a live `#[repr(C)]` prefix of `union bpf_attr` of the given size, and
    // every pointer in it outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *const T).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(BenchError::Bpf {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
