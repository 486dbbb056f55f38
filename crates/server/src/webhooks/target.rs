//! Where a webhook may send: `http`/`https` URLs whose addresses are public. Loopback, private,
//! link-local (cloud metadata at 169.254.169.254), shared, multicast, documentation and other
//! reserved addresses are refused unless `serve --webhook-allow-private-targets`. The check runs
//! on the resolved address at creation and again on every attempt (the resolver hands the HTTP
//! client only allowed addresses), so a name that later resolves inward (DNS rebinding) is
//! refused too.

use ipnet::{Ipv4Net, Ipv6Net};
use keyplane_core::error::codes;
use keyplane_core::{FieldError, FieldPath};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

pub const MAX_URL_CHARS: usize = 2048;
/// How long the check at creation waits for DNS before accepting the name (each attempt checks
/// again anyway).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why an address may not be a webhook target; `None`: it may.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => {
            // Addresses that embed an IPv4 one are judged by it.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_reason(v4);
            }
            let segments = v6.segments();
            let octets = v6.octets();
            // NAT64's well-known prefix: the IPv4 address is the last 32 bits.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b, c, d] = octets[12..16] else {
                    unreachable!()
                };
                return v4_reason(Ipv4Addr::new(a, b, c, d));
            }
            // 6to4: the IPv4 address of the relay's far end follows the prefix.
            if segments[0] == 0x2002 {
                let [a, b, c, d] = octets[2..6] else {
                    unreachable!()
                };
                return v4_reason(Ipv4Addr::new(a, b, c, d));
            }
            ranges_v6()
                .iter()
                .find(|(net, _)| net.contains(&v6))
                .map(|(_, why)| *why)
        }
    }
}

fn v4_reason(v4: Ipv4Addr) -> Option<&'static str> {
    ranges_v4()
        .iter()
        .find(|(net, _)| net.contains(&v4))
        .map(|(_, why)| *why)
}

fn ranges_v4() -> &'static [(Ipv4Net, &'static str)] {
    static RANGES: OnceLock<Vec<(Ipv4Net, &'static str)>> = OnceLock::new();
    RANGES.get_or_init(|| {
        [
            ("0.0.0.0/8", "unspecified"),
            ("10.0.0.0/8", "private"),
            ("100.64.0.0/10", "shared (carrier-grade NAT)"),
            ("127.0.0.0/8", "loopback"),
            ("169.254.0.0/16", "link-local (cloud metadata)"),
            ("172.16.0.0/12", "private"),
            ("192.0.0.0/24", "reserved"),
            ("192.0.2.0/24", "reserved for documentation"),
            ("192.88.99.0/24", "reserved"),
            ("192.168.0.0/16", "private"),
            ("198.18.0.0/15", "reserved for benchmarks"),
            ("198.51.100.0/24", "reserved for documentation"),
            ("203.0.113.0/24", "reserved for documentation"),
            ("224.0.0.0/4", "multicast"),
            ("240.0.0.0/4", "reserved"),
        ]
        .into_iter()
        .map(|(net, why)| (net.parse().expect("a valid IPv4 range"), why))
        .collect()
    })
}

fn ranges_v6() -> &'static [(Ipv6Net, &'static str)] {
    static RANGES: OnceLock<Vec<(Ipv6Net, &'static str)>> = OnceLock::new();
    RANGES.get_or_init(|| {
        [
            ("::/128", "unspecified"),
            ("::1/128", "loopback"),
            ("::/96", "reserved"),
            ("100::/64", "reserved (discard)"),
            // Local-use NAT64 (RFC 8215): the embedded IPv4 address's place depends on the
            // prefix length the network chose, so none of it can be judged.
            ("64:ff9b:1::/48", "local-use NAT64 (embeds an IPv4 address)"),
            // Teredo embeds an obfuscated IPv4 address.
            ("2001::/32", "Teredo (embeds an IPv4 address)"),
            ("2001:db8::/32", "reserved for documentation"),
            ("fc00::/7", "private (unique local)"),
            ("fe80::/10", "link-local"),
            ("fec0::/10", "private (site-local)"),
            ("ff00::/8", "multicast"),
        ]
        .into_iter()
        .map(|(net, why)| (net.parse().expect("a valid IPv6 range"), why))
        .collect()
    })
}

/// A webhook URL as written: `http` or `https`, with a host, no user or password, no fragment,
/// at most 2048 characters. Returns it normalized.
pub fn parse_url(path: FieldPath, raw: &str) -> Result<Url, FieldError> {
    let bad = |message: &str| FieldError::new(path.clone(), codes::INVALID_FORMAT, message);
    if raw.len() > MAX_URL_CHARS {
        return Err(FieldError::new(
            path.clone(),
            codes::TOO_LONG,
            format!("must have at most {MAX_URL_CHARS} characters"),
        ));
    }
    let url = Url::parse(raw).map_err(|_| bad("must be an absolute http or https URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("must be an http or https URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "must not hold a user name or password: receivers authenticate deliveries by their signature",
        ));
    }
    if url.fragment().is_some() {
        return Err(bad("must not have a fragment"));
    }
    if url.as_str().len() > MAX_URL_CHARS {
        return Err(FieldError::new(
            path,
            codes::TOO_LONG,
            format!("must have at most {MAX_URL_CHARS} characters once normalized"),
        ));
    }
    Ok(url)
}

/// Why `url`'s host, as written, is not a target: an address literal in a forbidden range, or a
/// `localhost` name. Names are judged by [`FilteringResolver`] once resolved.
pub fn literal_refusal(url: &Url) -> Option<String> {
    let reason = match host_of(url)? {
        Host::Address(ip) => forbidden_reason(ip),
        Host::Name(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            (name == "localhost" || name.ends_with(".localhost")).then_some("loopback")
        }
    };
    reason.map(refusal)
}

enum Host<'a> {
    Address(IpAddr),
    Name(&'a str),
}

/// The URL's host: the parser has already turned every spelling of an address (`2130706433`,
/// `0x7f.1`) into its canonical form, bracketed for IPv6.
fn host_of(url: &Url) -> Option<Host<'_>> {
    let host = url.host_str()?;
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(match bare.parse::<IpAddr>() {
        Ok(ip) => Host::Address(ip),
        Err(_) => Host::Name(host),
    })
}

fn refusal(reason: &str) -> String {
    format!(
        "the target address is {reason}; only public addresses may receive webhooks \
         (unless the server runs with --webhook-allow-private-targets)"
    )
}

/// The check at creation and update: the host as written, then each address it resolves to now
/// (every attempt checks again). A name that does not resolve yet is accepted.
pub async fn check_target(
    path: FieldPath,
    url: &Url,
    allow_private: bool,
) -> Result<(), FieldError> {
    if allow_private {
        return Ok(());
    }
    let refused = |message: String| FieldError::new(path.clone(), codes::INVALID_FORMAT, message);
    if let Some(message) = literal_refusal(url) {
        return Err(refused(message));
    }
    let Some(Host::Name(name)) = host_of(url) else {
        return Ok(());
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let resolved =
        tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port))).await;
    if let Ok(Ok(addresses)) = resolved {
        for address in addresses {
            if let Some(reason) = forbidden_reason(address.ip()) {
                return Err(refused(refusal(reason)));
            }
        }
    }
    Ok(())
}

/// A resolution that left no allowed address.
#[derive(Debug)]
pub struct TargetRefused(pub String);

impl std::fmt::Display for TargetRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TargetRefused {}

/// The webhook client's resolver: the system's, minus the forbidden addresses.
pub struct FilteringResolver {
    pub allow_private: bool,
}

impl Resolve for FilteringResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|address| {
                    if allow_private {
                        return true;
                    }
                    match forbidden_reason(address.ip()) {
                        Some(reason) => {
                            first_refusal.get_or_insert(reason);
                            false
                        }
                        None => true,
                    }
                })
                .collect();
            if allowed.is_empty() {
                let error: Box<dyn std::error::Error + Send + Sync> = match first_refusal {
                    Some(reason) => Box::new(TargetRefused(refusal(reason))),
                    None => "the name resolves to no address".into(),
                };
                return Err(error);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inward_addresses_are_refused_and_public_ones_pass() {
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "64:ff9b:1:a9fe:a9:fe00::",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        ] {
            let ip: IpAddr = refused.parse().unwrap();
            assert!(forbidden_reason(ip).is_some(), "{refused} is allowed");
        }
        for allowed in [
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:4860:4860::8888",
        ] {
            let ip: IpAddr = allowed.parse().unwrap();
            assert_eq!(forbidden_reason(ip), None, "{allowed} is refused");
        }
    }

    #[test]
    fn literal_hosts_in_any_spelling_are_judged() {
        for url in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::1]:8080/",
            "http://localhost:9000/x",
            "http://LOCALHOST./",
            "http://api.localhost/",
            "http://169.254.169.254/latest/meta-data/",
        ] {
            let parsed = parse_url(FieldPath::body("url"), url).unwrap();
            assert!(literal_refusal(&parsed).is_some(), "{url} passes");
        }
        let public = parse_url(FieldPath::body("url"), "https://hooks.example.com/x").unwrap();
        assert_eq!(literal_refusal(&public), None);
    }

    #[test]
    fn urls_must_be_plain_http() {
        for bad in [
            "ftp://example.com/",
            "example.com",
            "https://user:pw@example.com/",
            "https://example.com/#x",
            "http://",
            "mailto:a@example.com",
        ] {
            assert!(
                parse_url(FieldPath::body("url"), bad).is_err(),
                "{bad} accepted"
            );
        }
    }
}
