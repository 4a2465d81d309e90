//! Network namespaces: which one the agent observes (`--netns`), running work inside it, and
//! naming its interfaces.
//!
//! The agent never switches the namespace of a thread it keeps: [`Netns::run_in`] does the work on
//! a fresh thread that `setns(2)`s and then exits. Sockets created there stay bound to the
//! namespace, so a netlink or ioctl socket made once can be used from any thread afterwards.

use std::collections::HashMap;
use std::ffi::CStr;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where `ip netns add NAME` bind-mounts its namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The namespace of the agent process itself.
const OWN_NETNS: &str = "/proc/self/ns/net";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("invalid --netns value {0:?}: give a name from `ip netns list` or a path such as /proc/PID/ns/net")]
    BadTarget(String),
    #[error("network namespace {name:?} not found: looked for {} (list them with `ip netns list`, or pass a path such as /proc/PID/ns/net)", .path.display())]
    NameNotFound { name: String, path: PathBuf },
    #[error("network namespace file {} not found (for a process use /proc/PID/ns/net with a live PID)", .0.display())]
    PathNotFound(PathBuf),
    #[error("{} is not a network namespace (expected /run/netns/NAME, /proc/PID/ns/net or a bind mount of one)", .0.display())]
    NotNetns(PathBuf),
    #[error("permission denied to {action} {}: entering a network namespace needs CAP_SYS_ADMIN (run as root or add the capability)", .path.display())]
    Permission { action: &'static str, path: PathBuf },
    #[error("could not {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("could not start a thread to enter network namespace {}: {source}", .path.display())]
    Thread { path: PathBuf, source: io::Error },
    #[error("could not create the interface-name socket in network namespace {}: {source}", .path.display())]
    Socket { path: PathBuf, source: io::Error },
    #[error("SIOCGIFNAME for ifindex {ifindex} failed: {source}")]
    IfName { ifindex: u32, source: io::Error },
}

/// Which network namespace the agent observes, as given by `--netns`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NetnsTarget {
    /// No `--netns`: the agent's own namespace (the node's, for a host-network DaemonSet).
    #[default]
    Own,
    /// A name as `ip netns add NAME` creates it, i.e. `/run/netns/NAME`.
    Named(String),
    /// A namespace file: `/proc/PID/ns/net` or a bind mount of one.
    Path(PathBuf),
}

impl FromStr for NetnsTarget {
    type Err = NetnsError;

    /// Anything with a `/` is a path; anything else is a name under [`NETNS_RUN_DIR`].
    fn from_str(s: &str) -> Result<Self, NetnsError> {
        if s.contains('/') {
            Ok(NetnsTarget::Path(PathBuf::from(s)))
        } else if s.is_empty() || s == "." || s == ".." {
            Err(NetnsError::BadTarget(s.to_string()))
        } else {
            Ok(NetnsTarget::Named(s.to_string()))
        }
    }
}

impl fmt::Display for NetnsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetnsTarget::Own => f.write_str("the agent's own network namespace"),
            NetnsTarget::Named(name) => write!(f, "network namespace {name:?}"),
            NetnsTarget::Path(path) => write!(f, "network namespace {}", path.display()),
        }
    }
}

impl NetnsTarget {
    /// The namespace file this target names.
    pub fn path(&self) -> PathBuf {
        match self {
            NetnsTarget::Own => PathBuf::from(OWN_NETNS),
            NetnsTarget::Named(name) => Path::new(NETNS_RUN_DIR).join(name),
            NetnsTarget::Path(path) => path.clone(),
        }
    }

    /// Opens the namespace file and checks that it is a network namespace.
    pub fn open(&self) -> Result<Netns, NetnsError> {
        let path = self.path();
        let file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => match self {
                NetnsTarget::Named(name) => NetnsError::NameNotFound {
                    name: name.clone(),
                    path: path.clone(),
                },
                _ => NetnsError::PathNotFound(path.clone()),
            },
            io::ErrorKind::PermissionDenied => NetnsError::Permission {
                action: "open",
                path: path.clone(),
            },
            _ => NetnsError::Io {
                action: "open",
                path: path.clone(),
                source: e,
            },
        })?;
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd's namespace type.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
        if nstype != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns(path));
        }
        let meta = file.metadata().map_err(|source| NetnsError::Io {
            action: "fstat",
            path: path.clone(),
            source,
        })?;
        // nsfs inode numbers are the kernel's `ns.inum`, an unsigned int.
        let inode = u32::try_from(meta.ino()).map_err(|_| NetnsError::NotNetns(path.clone()))?;
        Ok(Netns {
            fd: OwnedFd::from(file),
            id: NsId {
                dev: meta.dev(),
                inode,
            },
            path,
        })
    }
}

/// Identity of a namespace file: nsfs device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NsId {
    dev: u64,
    inode: u32,
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    id: NsId,
    path: PathBuf,
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (inode {})", self.path.display(), self.id.inode)
    }
}

impl Netns {
    /// The namespace's inode number: what the kernel reports as `net->ns.inum` and what
    /// [`crate::events::FlowEvent::netns`] holds.
    pub fn inode(&self) -> u32 {
        self.id.inode
    }

    /// The namespace file it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its result; the caller's
    /// thread never changes namespace. A panic in `f` is propagated to the caller.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name("aksnet-netns".into())
                .spawn_scoped(scope, || -> Result<T, NetnsError> {
                    // Already there (the agent's own namespace): no setns, so no
                    // CAP_SYS_ADMIN needed for work that does not need it otherwise.
                    if thread_ns_id().ok() != Some(self.id) {
                        self.enter()?;
                    }
                    Ok(f())
                })
                .map_err(|source| NetnsError::Thread {
                    path: self.path.clone(),
                    source,
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Moves the calling thread into the namespace; only called on threads `run_in` owns.
    fn enter(&self) -> Result<(), NetnsError> {
        // SAFETY: the fd is a valid namespace fd owned by self; setns affects this thread only.
        if unsafe { libc::setns(self.fd.as_fd().as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        Err(match err.raw_os_error() {
            Some(libc::EPERM) => NetnsError::Permission {
                action: "setns into",
                path: self.path.clone(),
            },
            _ => NetnsError::Io {
                action: "setns into",
                path: self.path.clone(),
                source: err,
            },
        })
    }
}

/// The calling thread's current network namespace.
fn thread_ns_id() -> io::Result<NsId> {
    let meta = std::fs::metadata("/proc/thread-self/ns/net")?;
    let inode = u32::try_from(meta.ino()).map_err(|_| io::ErrorKind::InvalidData)?;
    Ok(NsId {
        dev: meta.dev(),
        inode,
    })
}

/// How long a resolved name is trusted: interfaces can be renamed, and the kernel may hand a
/// deleted interface's index to a new one.
const NAME_TTL: Duration = Duration::from_secs(60);
/// Bound on cached names; pods' veths come and go, so old entries are dropped wholesale.
const NAME_CACHE_MAX: usize = 4096;

/// Resolves ifindexes to interface names in one namespace, with a small cache.
#[derive(Debug)]
pub struct IfNames {
    /// AF_INET datagram socket created inside the namespace: SIOCGIFNAME answers for the
    /// socket's namespace, not the calling thread's.
    sock: OwnedFd,
    /// Shared names: every reported connection looks up two, and a clone is a count.
    cache: Mutex<HashMap<u32, (Arc<str>, Instant)>>,
}

impl IfNames {
    pub fn new(netns: &Netns) -> Result<IfNames, NetnsError> {
        let sock = netns.run_in(|| {
            // SAFETY: plain socket(2) call; the result is checked before use.
            let fd =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })?;
        let sock = sock.map_err(|source| NetnsError::Socket {
            path: netns.path.clone(),
            source,
        })?;
        Ok(IfNames {
            sock,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The interface's name, or `None` when no interface has that index (any more).
    pub fn name(&self, ifindex: u32) -> Result<Option<Arc<str>>, NetnsError> {
        let mut cache = self.cache.lock().expect("interface name cache poisoned");
        if let Some((name, at)) = cache.get(&ifindex) {
            if at.elapsed() < NAME_TTL {
                return Ok(Some(name.clone()));
            }
        }
        let resolved: Option<Arc<str>> = self.query(ifindex)?.map(Into::into);
        match &resolved {
            Some(name) => {
                if cache.len() >= NAME_CACHE_MAX {
                    cache.clear();
                }
                cache.insert(ifindex, (name.clone(), Instant::now()));
            }
            None => {
                cache.remove(&ifindex);
            }
        }
        Ok(resolved)
    }

    fn query(&self, ifindex: u32) -> Result<Option<String>, NetnsError> {
        let index = match libc::c_int::try_from(ifindex) {
            Ok(index) if index > 0 => index,
            _ => return Ok(None),
        };
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_ifru.ifru_ifindex = index;
        // SAFETY: SIOCGIFNAME reads ifr_ifindex and writes a NUL-terminated name into ifr_name.
        let rc = unsafe { libc::ioctl(self.sock.as_raw_fd(), libc::SIOCGIFNAME, &mut req) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENODEV) => Ok(None),
                _ => Err(NetnsError::IfName {
                    ifindex,
                    source: err,
                }),
            };
        }
        // SAFETY: the kernel NUL-terminates ifr_name within IFNAMSIZ.
        let name = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) };
        Ok(Some(name.to_string_lossy().into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_paths() {
        assert_eq!(
            "aks-node".parse::<NetnsTarget>().unwrap(),
            NetnsTarget::Named("aks-node".into())
        );
        assert_eq!(
            "/proc/1/ns/net".parse::<NetnsTarget>().unwrap(),
            NetnsTarget::Path("/proc/1/ns/net".into())
        );
        assert_eq!(
            NetnsTarget::Named("x".into()).path(),
            PathBuf::from("/run/netns/x")
        );
        for bad in ["", ".", ".."] {
            assert!(matches!(
                bad.parse::<NetnsTarget>(),
                Err(NetnsError::BadTarget(_))
            ));
        }
    }

    #[test]
    fn missing_name_says_where_it_looked_and_how_to_list() {
        let name = format!("aksnet-missing-{}", std::process::id());
        let err = NetnsTarget::Named(name.clone()).open().unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, NetnsError::NameNotFound { .. }), "{msg}");
        assert!(msg.contains(&format!("/run/netns/{name}")), "{msg}");
        assert!(msg.contains("ip netns list"), "{msg}");
    }

    #[test]
    fn a_regular_file_is_not_a_namespace() {
        let err = NetnsTarget::Path("/proc/self/status".into())
            .open()
            .unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns(_)), "{err}");
    }

    #[test]
    fn own_namespace_inode_matches_proc_and_run_in_returns_values() {
        let ns = NetnsTarget::Own.open().unwrap();
        let link = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_eq!(
            link.to_string_lossy(),
            format!("net:[{}]", ns.inode()),
            "fstat inode must be the kernel's ns.inum"
        );
        let caller = std::thread::current().id();
        let (inner, seen) = ns
            .run_in(|| (std::thread::current().id(), thread_ns_id().unwrap().inode))
            .unwrap();
        assert_ne!(inner, caller, "run_in must use a fresh thread");
        assert_eq!(seen, ns.inode());
    }

    #[test]
    fn loopback_is_index_one_and_unknown_indexes_are_none() {
        let ns = NetnsTarget::Own.open().unwrap();
        let names = IfNames::new(&ns).unwrap();
        assert_eq!(names.name(1).unwrap().as_deref(), Some("lo"));
        assert_eq!(names.name(1).unwrap().as_deref(), Some("lo"), "cached");
        assert_eq!(names.name(u32::MAX).unwrap(), None);
        assert_eq!(names.name(0).unwrap(), None);
    }
}
