//! The address of the client a request comes from, worked out once per request in
//! the connection (`connection.rs`) and stored in the request's extensions as a [`ClientAddr`].
//!
//! Behind a reverse proxy every TCP peer is the proxy, so the client's own address is taken from
//! the forwarding header, but only when the TCP peer is one of `serve --trusted-proxies`: anyone
//! else could write any address there. The header's list is read right to left (each proxy
//! appends the address it received the request from), past every trusted hop; the first
//! untrusted address is the client. Everything that needs the client's address (the
//! failed-authentication limit, the request log's `client.ip`, the audit trail) reads
//! [`ClientAddr`] and never the headers, so there is one rule. The one exception is the cap on
//! connections per address (`connection.rs`), counted at accept, before any header: it counts the
//! TCP peer, and does not cap trusted proxies, whose connections carry many clients.

use axum::http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// The client's address: the TCP peer, or what trusted proxies say the client was.
///
/// Present in the extensions of every request served through `serve` (absent only when a router
/// is driven without a connection, as in-process tests may do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientAddr(pub IpAddr);

impl ClientAddr {
    /// What per-address limits count against: an IPv4 address, or an IPv6 address's /64. A /64
    /// is what one subscriber gets (RFC 6177), and its owner can take a new address from it for
    /// every request: counted one by one, they would never reach a limit.
    pub(crate) fn limit_key(self) -> IpAddr {
        match self.0 {
            IpAddr::V4(_) => self.0,
            IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !u128::from(u64::MAX),
            )),
        }
    }
}

/// Which forwarding header trusted proxies maintain. Only that one is read: a client may send the
/// other one, and a proxy that does not manage it passes it through unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx `$proxy_add_x_forwarded_for`).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for="[2001:db8::1]:4711"`.
    Forwarded,
}

/// The proxies whose forwarding header is believed. Empty (the default): the TCP peer is the
/// client.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    ranges: Vec<IpNet>,
    header: ForwardedHeader,
}

/// A forwarding list longer than this is read only this far (from the right): walking it costs
/// time per request, and no real chain of proxies is this long.
const MAX_HOPS: usize = 32;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

impl TrustedProxies {
    /// `ranges` are CIDRs (`10.0.0.0/8`, `::1/128`) or single addresses.
    pub fn parse(ranges: &[String], header: ForwardedHeader) -> Result<Self, String> {
        let ranges = ranges
            .iter()
            .map(|range| {
                let range = range.trim();
                range
                    .parse::<IpNet>()
                    .or_else(|_| range.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| format!("`{range}` is not an IP address or CIDR range"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { ranges, header })
    }

    /// Whether `ip` is one of the trusted proxies.
    pub(crate) fn trusts(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|range| range.contains(&ip))
    }

    /// The client of a request that arrived from `peer` with `headers`.
    pub(crate) fn client_of(&self, peer: SocketAddr, headers: &HeaderMap) -> ClientAddr {
        // A dual-stack listener sees IPv4 peers as `::ffff:a.b.c.d`.
        let peer = peer.ip().to_canonical();
        if self.ranges.is_empty() || !self.trusts(peer) {
            return ClientAddr(peer);
        }
        let name = match self.header {
            ForwardedHeader::XForwardedFor => X_FORWARDED_FOR,
            ForwardedHeader::Forwarded => FORWARDED,
        };
        let mut client = peer;
        // Split as bytes: a value a client began with bytes that are not text (which proxies
        // pass on, appending the address they saw) must still yield that appended address. An
        // element that is not text is garbage, where the walk stops.
        let elements = headers
            .get_all(name)
            .iter()
            .rev()
            .flat_map(|value| value.as_bytes().rsplit(|&b| b == b','))
            .map(|element| std::str::from_utf8(element).unwrap_or("\u{0}"))
            .take(MAX_HOPS);
        for element in elements {
            let hop = match self.header {
                ForwardedHeader::XForwardedFor => parse_node(element),
                ForwardedHeader::Forwarded => forwarded_for(element).and_then(parse_node),
            };
            // A hop a trusted proxy could not name (`unknown`, an obfuscated name, garbage): the
            // client is behind that proxy, and the proxy is as far as the chain can be followed.
            let Some(hop) = hop else { break };
            client = hop;
            if !self.trusts(hop) {
                break;
            }
        }
        ClientAddr(client)
    }
}

/// An address as forwarding headers write it: `192.0.2.1`, `192.0.2.1:443`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:443`.
fn parse_node(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(socket) = text.parse::<SocketAddr>() {
        return Some(socket.ip().to_canonical());
    }
    text.strip_prefix('[')?
        .strip_suffix(']')?
        .parse::<IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
}

/// The `for=` value of one RFC 7239 element (`for=192.0.2.60;proto=http;by=203.0.113.43`).
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim().eq_ignore_ascii_case("for").then(|| {
            let value = value.trim();
            value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    fn headers(name: &str, values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    fn proxies(ranges: &[&str], header: ForwardedHeader) -> TrustedProxies {
        let ranges: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
        TrustedProxies::parse(&ranges, header).unwrap()
    }

    fn client(proxies: &TrustedProxies, from: &str, headers: &HeaderMap) -> String {
        proxies.client_of(peer(from), headers).0.to_string()
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client_whatever_the_headers_say() {
        let none = TrustedProxies::default();
        let forged = headers("x-forwarded-for", &["203.0.113.9"]);
        assert_eq!(client(&none, "127.0.0.1", &forged), "127.0.0.1");
        let trusted = proxies(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        assert_eq!(client(&trusted, "192.0.2.7", &forged), "192.0.2.7");
    }

    #[test]
    fn x_forwarded_for_is_walked_right_to_left_past_trusted_hops() {
        let trusted = proxies(&["10.0.0.0/8", "127.0.0.1"], ForwardedHeader::XForwardedFor);
        // The client forged the leftmost entry; the first untrusted one from the right is real.
        let chain = headers("x-forwarded-for", &["6.6.6.6, 198.51.100.4", "10.1.2.3"]);
        assert_eq!(client(&trusted, "127.0.0.1", &chain), "198.51.100.4");
        let ports = headers("x-forwarded-for", &["[2001:db8::7]:5555, 192.0.2.1:80"]);
        assert_eq!(client(&trusted, "10.0.0.1", &ports), "192.0.2.1");
        let only_proxies = headers("x-forwarded-for", &["10.9.9.9"]);
        assert_eq!(client(&trusted, "127.0.0.1", &only_proxies), "10.9.9.9");
        assert_eq!(
            client(&trusted, "127.0.0.1", &HeaderMap::new()),
            "127.0.0.1"
        );
        let garbage = headers("x-forwarded-for", &["198.51.100.4, nonsense"]);
        assert_eq!(client(&trusted, "127.0.0.1", &garbage), "127.0.0.1");
        assert_eq!(client(&trusted, "::ffff:127.0.0.1", &chain), "198.51.100.4");
    }

    /// A client's bytes that are not text, to which the proxy appended the address it saw, do
    /// not hide that address (the client would be the proxy, sharing its limits).
    #[test]
    fn bytes_a_client_sent_do_not_hide_the_address_a_proxy_appended() {
        let raw = |name: &str, value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
            headers
        };
        let xff = proxies(&["127.0.0.1"], ForwardedHeader::XForwardedFor);
        let appended = raw("x-forwarded-for", b"\xff\xfe, 198.51.100.4");
        assert_eq!(client(&xff, "127.0.0.1", &appended), "198.51.100.4");
        // Where the walk reaches them, they are garbage: it stops at the proxy that passed them.
        let reached = raw("x-forwarded-for", b"198.51.100.4, \xff, 127.0.0.1");
        assert_eq!(client(&xff, "127.0.0.1", &reached), "127.0.0.1");
        let forwarded = proxies(&["127.0.0.1"], ForwardedHeader::Forwarded);
        let appended = raw("forwarded", b"for=\xff, for=198.51.100.4");
        assert_eq!(client(&forwarded, "127.0.0.1", &appended), "198.51.100.4");
    }

    #[test]
    fn forwarded_is_read_only_when_chosen() {
        let trusted = proxies(&["127.0.0.0/8"], ForwardedHeader::Forwarded);
        let mut both = headers(
            "forwarded",
            &[r#"for=6.6.6.6, for="[2001:db8:cafe::17]:4711";proto=https"#],
        );
        both.append(X_FORWARDED_FOR, HeaderValue::from_static("192.0.2.1"));
        assert_eq!(client(&trusted, "127.0.0.1", &both), "2001:db8:cafe::17");
        let hidden = headers("forwarded", &["for=192.0.2.1, for=_hidden"]);
        assert_eq!(client(&trusted, "127.0.0.1", &hidden), "127.0.0.1");
        let xff = proxies(&["127.0.0.0/8"], ForwardedHeader::XForwardedFor);
        assert_eq!(client(&xff, "127.0.0.1", &both), "192.0.2.1");
    }

    #[test]
    fn ranges_are_checked() {
        assert!(
            TrustedProxies::parse(&["10.0.0.0/33".into()], ForwardedHeader::default()).is_err()
        );
        assert!(TrustedProxies::parse(&["proxy".into()], ForwardedHeader::default()).is_err());
        assert!(TrustedProxies::parse(&["::1".into()], ForwardedHeader::default()).is_ok());
    }
}
