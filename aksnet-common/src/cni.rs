//! The AKS network plug-in modes: one name for the agent (its models, config and `--cni`) and
//! for xtask's lab, which builds a node of each.

use core::fmt;
use core::str::FromStr;

/// The AKS network plug-in mode; the agent has one model file per mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
pub enum CniMode {
    Kubenet,
    AzureCni,
    AzureCniOverlay,
}

impl CniMode {
    pub const ALL: [CniMode; 3] = [
        CniMode::Kubenet,
        CniMode::AzureCni,
        CniMode::AzureCniOverlay,
    ];

    /// The name AKS gives the mode (`--network-plugin`, with Overlay's mode appended).
    pub fn as_str(self) -> &'static str {
        match self {
            CniMode::Kubenet => "kubenet",
            CniMode::AzureCni => "azure-cni",
            CniMode::AzureCniOverlay => "azure-cni-overlay",
        }
    }

    /// Whether pod IPs are vnet addresses that any vnet client can reach (azure-cni flat);
    /// kubenet and Overlay pods take the pod CIDR, routed only for the cluster's own subnets.
    pub fn pods_in_vnet(self) -> bool {
        self == CniMode::AzureCni
    }
}

impl fmt::Display for CniMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is none of [`CniMode::ALL`]'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownCniMode;

impl fmt::Display for UnknownCniMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown CNI mode: use kubenet, azure-cni or azure-cni-overlay")
    }
}

impl core::error::Error for UnknownCniMode {}

impl FromStr for CniMode {
    type Err = UnknownCniMode;
    fn from_str(s: &str) -> Result<Self, UnknownCniMode> {
        CniMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or(UnknownCniMode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_reads_back_its_name() {
        for mode in CniMode::ALL {
            assert_eq!(mode.as_str().parse(), Ok(mode));
        }
        assert_eq!("azure".parse::<CniMode>(), Err(UnknownCniMode));
    }
}
