//! Addresses as the control plane takes them: a MAC and a 1:1 IP mapping
//! ("IDENTITY_IP=GUEST_IP") written as text, and the checks that an address
//! can be one host's own. Both types are saved and sent as their text.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::policy::{IpMap, Mac};

/// Most `ip_map` entries of one port.
pub const MAX_IP_MAPPINGS: usize = 16;

/// Errors in addresses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("invalid MAC address {0:?}: use six hex bytes like 52:54:00:12:34:56")]
    BadMac(String),
    #[error("{0} is a multicast or all-zero MAC address: give a host's own (unicast) MAC")]
    NotUnicastMac(MacAddr),
    #[error("invalid IP address {0:?}: use an IPv4 address like 192.0.2.10 or an IPv6 one like 2001:db8::10")]
    BadIp(String),
    #[error("{0} cannot be a host's address (unspecified, loopback, multicast or broadcast): give a unicast address")]
    NotUnicastIp(IpAddr),
    #[error("invalid IP mapping {0:?}: write IDENTITY_IP=GUEST_IP, e.g. 192.0.2.10=10.0.0.5")]
    BadMapping(String),
    #[error("IP mapping {0:?} maps addresses of two families: map IPv4 to IPv4 and IPv6 to IPv6")]
    MixedMapping(String),
    #[error("IP mapping {0:?} maps an address to itself: leave it out")]
    SelfMapping(String),
    #[error("a port has at most {MAX_IP_MAPPINGS} IP mappings, got {0}")]
    TooManyMappings(usize),
    #[error("{0} is mapped twice: each address may appear in one mapping")]
    MappedTwice(IpAddr),
}

/// A MAC address, written `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub Mac);

impl MacAddr {
    /// The address if it can be a host's own: unicast and not all zeros.
    pub fn host(self) -> Result<Self, AddrError> {
        if self.0[0] & 1 != 0 || self.0 == [0; 6] {
            return Err(AddrError::NotUnicastMac(self));
        }
        Ok(self)
    }
}

impl FromStr for MacAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        crate::daemon::parse_mac(s)
            .map(MacAddr)
            .map_err(|_| AddrError::BadMac(s.to_string()))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::daemon::mac_string(&self.0))
    }
}

/// An IP address from its text, refused unless it can be a host's own:
/// not unspecified, loopback, multicast or the IPv4 broadcast address.
pub fn host_ip(s: &str) -> Result<IpAddr, AddrError> {
    let ip: IpAddr = s.parse().map_err(|_| AddrError::BadIp(s.to_string()))?;
    check_host_ip(ip)
}

/// `ip` if it can be a host's own (see [`host_ip`]).
pub fn check_host_ip(ip: IpAddr) -> Result<IpAddr, AddrError> {
    let special = match ip {
        IpAddr::V4(a) => {
            a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast()
        }
        IpAddr::V6(a) => a.is_unspecified() || a.is_loopback() || a.is_multicast(),
    };
    if special {
        return Err(AddrError::NotUnicastIp(ip));
    }
    Ok(ip)
}

/// A 1:1 address translation of a port, written `IDENTITY_IP=GUEST_IP`:
/// the network sees the identity's address, the guest its own. Both are
/// host addresses of one family, and differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpMapping(IpMap);

impl IpMapping {
    /// The identity's address: what the network sees.
    pub fn identity(&self) -> IpAddr {
        match self.0 {
            IpMap::V4 { identity, .. } => identity.into(),
            IpMap::V6 { identity, .. } => identity.into(),
        }
    }

    /// The address the guest is configured with.
    pub fn guest(&self) -> IpAddr {
        match self.0 {
            IpMap::V4 { guest, .. } => guest.into(),
            IpMap::V6 { guest, .. } => guest.into(),
        }
    }

    /// The translation the dataplane applies.
    pub fn map(&self) -> IpMap {
        self.0
    }
}

impl FromStr for IpMapping {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        let (identity, guest) = s
            .split_once('=')
            .ok_or_else(|| AddrError::BadMapping(s.to_string()))?;
        let parse = |a: &str| {
            a.parse::<IpAddr>()
                .map_err(|_| AddrError::BadMapping(s.to_string()))
                .and_then(check_host_ip)
        };
        let map = match (parse(identity)?, parse(guest)?) {
            (i, g) if i == g => return Err(AddrError::SelfMapping(s.to_string())),
            (IpAddr::V4(identity), IpAddr::V4(guest)) => IpMap::V4 { identity, guest },
            (IpAddr::V6(identity), IpAddr::V6(guest)) => IpMap::V6 { identity, guest },
            _ => return Err(AddrError::MixedMapping(s.to_string())),
        };
        Ok(IpMapping(map))
    }
}

impl fmt::Display for IpMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.identity(), self.guest())
    }
}

/// Check a port's mappings together: at most [`MAX_IP_MAPPINGS`], and no
/// address on the same side of two of them (a translation must be 1:1).
pub fn check_mappings(maps: &[IpMapping]) -> Result<(), AddrError> {
    if maps.len() > MAX_IP_MAPPINGS {
        return Err(AddrError::TooManyMappings(maps.len()));
    }
    for (i, m) in maps.iter().enumerate() {
        for side in [IpMapping::identity, IpMapping::guest] {
            if maps[..i].iter().any(|o| side(o) == side(m)) {
                return Err(AddrError::MappedTwice(side(m)));
            }
        }
    }
    Ok(())
}

/// Serde as the text form: `Display` out, `FromStr` in (its error as the
/// message).
macro_rules! serde_as_text {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_text!(MacAddr);
serde_as_text!(IpMapping);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_read_and_print_canonically_and_hosts_are_unicast() {
        let m: MacAddr = "52:54:00:AB:cd:0F".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!(m.host(), Ok(m));
        for bad in ["", "52:54:00:ab:cd", "zz:54:00:ab:cd:0f"] {
            assert_eq!(bad.parse::<MacAddr>(), Err(AddrError::BadMac(bad.into())));
        }
        for not_host in [
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
        ] {
            let m: MacAddr = not_host.parse().unwrap();
            assert_eq!(m.host(), Err(AddrError::NotUnicastMac(m)));
        }
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, "\"52:54:00:ab:cd:0f\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), m);
        let err = serde_json::from_str::<MacAddr>("\"x\"").unwrap_err();
        assert!(err.to_string().contains("six hex bytes"), "{err}");
    }

    #[test]
    fn host_addresses_are_unicast() {
        for ok in ["192.0.2.10", "10.0.0.1", "2001:db8::10", "fe80::1"] {
            assert_eq!(host_ip(ok), Ok(ok.parse().unwrap()), "{ok}");
        }
        for special in [
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "ff02::1",
        ] {
            let ip: IpAddr = special.parse().unwrap();
            assert_eq!(host_ip(special), Err(AddrError::NotUnicastIp(ip)));
        }
        assert_eq!(host_ip("10.0.0"), Err(AddrError::BadIp("10.0.0".into())));
    }

    #[test]
    fn mappings_are_one_family_host_addresses() {
        let m: IpMapping = "192.0.2.10=10.0.0.5".parse().unwrap();
        assert_eq!(
            m.map(),
            IpMap::V4 {
                identity: "192.0.2.10".parse().unwrap(),
                guest: "10.0.0.5".parse().unwrap()
            }
        );
        assert_eq!(m.to_string(), "192.0.2.10=10.0.0.5");
        let m6: IpMapping = "2001:db8:0::10=fd00::5".parse().unwrap();
        assert_eq!(m6.to_string(), "2001:db8::10=fd00::5");
        assert_eq!(m6.identity(), "2001:db8::10".parse::<IpAddr>().unwrap());
        assert_eq!(m6.guest(), "fd00::5".parse::<IpAddr>().unwrap());
        let cases = [
            ("192.0.2.10", AddrError::BadMapping("192.0.2.10".into())),
            ("192.0.2.10=x", AddrError::BadMapping("192.0.2.10=x".into())),
            (
                "192.0.2.10=fd00::5",
                AddrError::MixedMapping("192.0.2.10=fd00::5".into()),
            ),
            (
                "192.0.2.10=192.0.2.10",
                AddrError::SelfMapping("192.0.2.10=192.0.2.10".into()),
            ),
            (
                "192.0.2.10=127.0.0.1",
                AddrError::NotUnicastIp("127.0.0.1".parse().unwrap()),
            ),
        ];
        for (text, err) in cases {
            assert_eq!(text.parse::<IpMapping>(), Err(err), "{text}");
        }
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<IpMapping>(&json).unwrap(), m);
    }

    #[test]
    fn a_port_s_mappings_are_one_to_one() {
        let maps =
            |l: &[&str]| -> Vec<IpMapping> { l.iter().map(|s| s.parse().unwrap()).collect() };
        assert_eq!(
            check_mappings(&maps(&["192.0.2.1=10.0.0.1", "192.0.2.2=10.0.0.2"])),
            Ok(())
        );
        assert_eq!(
            check_mappings(&maps(&["192.0.2.1=10.0.0.1", "192.0.2.1=10.0.0.2"])),
            Err(AddrError::MappedTwice("192.0.2.1".parse().unwrap()))
        );
        assert_eq!(
            check_mappings(&maps(&["192.0.2.1=10.0.0.1", "192.0.2.2=10.0.0.1"])),
            Err(AddrError::MappedTwice("10.0.0.1".parse().unwrap()))
        );
        let many: Vec<String> = (1..=17)
            .map(|i| format!("192.0.2.{i}=10.0.0.{i}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            check_mappings(&maps(&many)),
            Err(AddrError::TooManyMappings(17))
        );
    }
}
