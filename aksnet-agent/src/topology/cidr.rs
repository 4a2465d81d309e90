//! A network prefix (`10.224.0.0/12`, `fd00:10:244::/56`): the only address arithmetic the
//! topology needs is "does this prefix contain that address".

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a CIDR prefix like 10.224.0.0/12 or fd00::/64: {why}")]
pub struct CidrError {
    input: String,
    why: &'static str,
}

impl Cidr {
    /// The prefix `addr/len`; host bits are cleared so `10.244.0.1/24` is `10.244.0.0/24`.
    pub fn new(addr: IpAddr, len: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then(|| Cidr {
            addr: mask(addr, len),
            len,
        })
    }

    /// A single address as a /32 or /128.
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    /// The longest prefix that holds every address of `addrs`; `None` when there is none or
    /// they mix address families.
    pub fn covering(addrs: impl IntoIterator<Item = IpAddr>) -> Option<Cidr> {
        let bits = |ip: IpAddr| match ip {
            IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
            IpAddr::V6(a) => u128::from(a),
        };
        let mut addrs = addrs.into_iter();
        let first = addrs.next()?;
        let mut differing = 0u128;
        for ip in addrs {
            if ip.is_ipv4() != first.is_ipv4() {
                return None;
            }
            differing |= bits(ip) ^ bits(first);
        }
        let max = if first.is_ipv4() { 32 } else { 128 };
        Cidr::new(first, (differing.leading_zeros() as u8).min(max))
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| CidrError {
            input: s.to_string(),
            why,
        };
        let (addr, len) = s.split_once('/').ok_or_else(|| err("missing /length"))?;
        let addr: IpAddr = addr.parse().map_err(|_| err("bad address"))?;
        let len: u8 = len.parse().map_err(|_| err("bad prefix length"))?;
        Cidr::new(addr, len).ok_or_else(|| err("prefix length too long for the address family"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_v4_and_v6() {
        let v4: Cidr = "10.224.0.0/12".parse().unwrap();
        assert!(v4.contains("10.227.0.5".parse().unwrap()));
        assert!(!v4.contains("10.240.0.4".parse().unwrap()));
        let v6: Cidr = "fd00:10:244::/56".parse().unwrap();
        assert!(v6.contains("fd00:10:244:0:ff::1".parse().unwrap()));
        assert!(!v6.contains("fd00:10:245::1".parse().unwrap()));
        assert!(!v6.contains("10.244.0.1".parse().unwrap()));
    }

    #[test]
    fn covering_prefix() {
        let ips = |s: &[&str]| {
            s.iter()
                .map(|a| a.parse::<IpAddr>().unwrap())
                .collect::<Vec<_>>()
        };
        let c = Cidr::covering(ips(&["10.0.0.1", "10.0.0.10", "10.0.12.34"])).unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/20");
        assert_eq!(
            Cidr::covering(ips(&["10.0.0.10"])).unwrap().to_string(),
            "10.0.0.10/32"
        );
        assert_eq!(
            Cidr::covering(ips(&["fd00::1", "fd00::ff"]))
                .unwrap()
                .to_string(),
            "fd00::/120"
        );
        assert_eq!(Cidr::covering(ips(&["10.0.0.1", "fd00::1"])), None);
        assert_eq!(Cidr::covering(ips(&[])), None);
    }

    #[test]
    fn host_bits_are_cleared_and_bad_input_rejected() {
        assert_eq!(
            "10.244.0.1/24".parse::<Cidr>().unwrap().to_string(),
            "10.244.0.0/24"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix_len(), 0);
    }
}
