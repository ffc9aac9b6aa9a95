//! The HBONE-style wire contract between two tunnel endpoints: the TLS server name that names
//! the destination, the HTTP/2 CONNECT request, and the response statuses.
//!
//! The client puts the destination (the address its workload asked for) in the TLS server
//! name, so the inbound side can present the SVID of the workload that owns it before any
//! HTTP/2 byte is exchanged: `p<port>.a<8 hex digits>.hbone.invalid` for IPv4,
//! `p<port>.b<32 hex digits>.hbone.invalid` for IPv6 (`.invalid` never resolves). The CONNECT
//! request's `:authority` must name the same destination as an IP literal and port; host
//! names are refused, so the inbound side is never a relay to arbitrary hosts.
#![forbid(unsafe_code)]

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use http::{
    HeaderMap, HeaderValue, Method, Request, StatusCode, header::HeaderName, request::Parts,
};
use rustls_pki_types::{DnsName, ServerName};

use super::record::Placement;

/// The ALPN protocol both ends require.
pub const ALPN_H2: &[u8] = b"h2";

/// The suffix of every destination server name.
const SNI_SUFFIX: &str = ".hbone.invalid";

/// The longest `:authority` accepted (`[` + 39-character IPv6 + `]:` + 5 digits, with room).
const MAX_AUTHORITY_LEN: usize = 64;

/// A malformed server name or CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum HboneError {
    /// The TLS server name is missing.
    #[error("the TLS client hello names no destination (no server name)")]
    NoServerName,
    /// The TLS server name is not a destination name of this protocol.
    #[error("TLS server name `{name}` is not a tunnel destination: {reason}")]
    ServerName {
        /// The name (truncated to 80 characters).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The request method is not CONNECT.
    #[error("method `{0}` is not CONNECT")]
    Method(String),
    /// The request carries a scheme or path (an extended or malformed CONNECT).
    #[error("a CONNECT request carries no scheme or path")]
    SchemeOrPath,
    /// The `:authority` is missing.
    #[error("the CONNECT request has no authority")]
    NoAuthority,
    /// The `:authority` is not an IP literal and port.
    #[error("authority `{authority}` is not an IP address and port: {reason}")]
    Authority {
        /// The authority (truncated to 80 characters).
        authority: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Why an inbound endpoint refused a CONNECT, one HTTP status each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The request was malformed (400).
    BadRequest,
    /// Policy denies the source identity this destination (403).
    Denied,
    /// No enrolled workload listens at the destination (404).
    NoSuchWorkload,
    /// The request names a different destination than the TLS handshake did (421).
    Misdirected,
    /// The request's header list is larger than the node accepts (431).
    HeadersTooLarge,
    /// The workload refused the connection or reset it (502).
    UpstreamRefused,
    /// The node cannot serve the destination now, e.g. it has no SVID for it (503).
    Unavailable,
    /// The workload did not accept within the connect timeout (504).
    UpstreamTimeout,
}

impl Refusal {
    /// Every refusal.
    pub const ALL: [Self; 8] = [
        Self::BadRequest,
        Self::Denied,
        Self::NoSuchWorkload,
        Self::Misdirected,
        Self::HeadersTooLarge,
        Self::UpstreamRefused,
        Self::Unavailable,
        Self::UpstreamTimeout,
    ];

    /// The HTTP status that carries this refusal.
    #[must_use]
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Denied => StatusCode::FORBIDDEN,
            Self::NoSuchWorkload => StatusCode::NOT_FOUND,
            Self::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UpstreamRefused => StatusCode::BAD_GATEWAY,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The refusal an HTTP status carries, `None` for a status this protocol never sends.
    #[must_use]
    pub fn from_status(status: StatusCode) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.status() == status)
    }

    /// A short name for records and metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::Denied => "denied",
            Self::NoSuchWorkload => "no-such-workload",
            Self::Misdirected => "misdirected",
            Self::HeadersTooLarge => "headers-too-large",
            Self::UpstreamRefused => "upstream-refused",
            Self::Unavailable => "unavailable",
            Self::UpstreamTimeout => "upstream-timeout",
        }
    }
}

/// The TLS server name that names `dst`.
#[must_use]
pub fn server_name(dst: SocketAddr) -> ServerName<'static> {
    let mut name = format!("p{}.", dst.port());
    match dst.ip() {
        IpAddr::V4(ip) => {
            name.push('a');
            push_hex(&mut name, &ip.octets());
        }
        IpAddr::V6(ip) => {
            name.push('b');
            push_hex(&mut name, &ip.octets());
        }
    }
    name.push_str(SNI_SUFFIX);
    let dns = DnsName::try_from(name).expect("a destination name is a valid DNS name");
    ServerName::DnsName(dns)
}

/// The destination a TLS server name names.
pub(super) fn parse_server_name(name: Option<&str>) -> Result<SocketAddr, HboneError> {
    let name = name.ok_or(HboneError::NoServerName)?;
    let bad = |reason| HboneError::ServerName {
        name: truncate(name),
        reason,
    };
    let rest = name
        .strip_suffix(SNI_SUFFIX)
        .ok_or_else(|| bad("it does not end in `.hbone.invalid`"))?;
    let (port, ip) = rest
        .split_once('.')
        .ok_or_else(|| bad("it has no address label"))?;
    let port = port
        .strip_prefix('p')
        .and_then(parse_port)
        .ok_or_else(|| bad("the first label is not `p` and a port from 1 to 65535"))?;
    let ip = if let Some(hex) = ip.strip_prefix('a') {
        IpAddr::V4(Ipv4Addr::from(
            parse_hex::<4>(hex).ok_or_else(|| bad("`a` is not followed by 8 hex digits"))?,
        ))
    } else if let Some(hex) = ip.strip_prefix('b') {
        IpAddr::V6(Ipv6Addr::from(
            parse_hex::<16>(hex).ok_or_else(|| bad("`b` is not followed by 32 hex digits"))?,
        ))
    } else {
        return Err(bad("the address label starts with neither `a` nor `b`"));
    };
    Ok(SocketAddr::new(ip, port))
}

/// The header in which each end tells the other where its workload runs (the client's in the
/// CONNECT request, the destination's in the `200`): `container=<id>; pod=<uid>`, either part
/// left out when unknown. Informational: what the other node says, for its records.
pub(super) const PLACEMENT: HeaderName = HeaderName::from_static("enforcer-placement");

/// Longest container id or pod uid accepted in [`PLACEMENT`].
const PLACEMENT_PART: usize = 64;

/// The CONNECT request for `dst`, from a client that runs at `placement`.
#[must_use]
pub(super) fn connect_request(dst: SocketAddr, placement: &Placement) -> Request<()> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(dst.to_string());
    if let Some(value) = placement_value(placement) {
        request = request.header(PLACEMENT, value);
    }
    request
        .body(())
        .expect("an IP literal and port is a valid authority")
}

/// The [`PLACEMENT`] value for `placement`; `None` when it names nothing.
#[must_use]
pub(super) fn placement_value(placement: &Placement) -> Option<HeaderValue> {
    let parts: Vec<String> = [
        ("container", &placement.container_id),
        ("pod", &placement.pod_uid),
    ]
    .into_iter()
    .filter_map(|(key, value)| {
        value
            .as_deref()
            .filter(|value| placement_part_ok(value))
            .map(|value| format!("{key}={value}"))
    })
    .collect();
    (!parts.is_empty()).then(|| {
        HeaderValue::from_str(&parts.join("; ")).expect("checked characters make a valid value")
    })
}

/// The placement the other end reported in `headers`; parts that are not well formed (ids are
/// hex digits, dashes and underscores, at most 64 characters) are left out.
#[must_use]
pub(super) fn parse_placement(headers: &HeaderMap) -> Placement {
    let mut placement = Placement::default();
    let Some(value) = headers.get(PLACEMENT).and_then(|v| v.to_str().ok()) else {
        return placement;
    };
    for part in value.split(';') {
        let Some((key, value)) = part.trim().split_once('=') else {
            continue;
        };
        if !placement_part_ok(value) {
            continue;
        }
        match key {
            "container" => placement.container_id = Some(value.to_owned()),
            "pod" => placement.pod_uid = Some(value.to_owned()),
            _ => {}
        }
    }
    placement
}

fn placement_part_ok(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= PLACEMENT_PART
        && value
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_')
}

/// The destination of a CONNECT request, checked strictly: method CONNECT, no scheme or path,
/// and an authority that is an IP literal (IPv6 in brackets) with a non-zero port.
pub(super) fn parse_connect(parts: &Parts) -> Result<SocketAddr, HboneError> {
    if parts.method != Method::CONNECT {
        return Err(HboneError::Method(truncate(parts.method.as_str())));
    }
    let uri = &parts.uri;
    if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| !p.as_str().is_empty()) {
        return Err(HboneError::SchemeOrPath);
    }
    let authority = uri.authority().ok_or(HboneError::NoAuthority)?.as_str();
    parse_authority(authority)
}

/// The size of a request's header list as HTTP/2 counts it (RFC 9113, 6.5.2): each field's
/// name and value plus 32 octets, pseudo-header fields included.
#[must_use]
pub(super) fn header_list_size(parts: &Parts) -> usize {
    const FIELD_OVERHEAD: usize = 32;
    let pseudo = [
        parts.method.as_str().len(),
        parts.uri.authority().map_or(0, |a| a.as_str().len()),
        parts.uri.scheme_str().map_or(0, str::len),
        parts.uri.path_and_query().map_or(0, |p| p.as_str().len()),
    ];
    let pseudo: usize = pseudo.iter().map(|len| len + FIELD_OVERHEAD + 8).sum();
    parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + FIELD_OVERHEAD)
        .sum::<usize>()
        + pseudo
}

/// An authority that must be `ip:port` or `[ipv6]:port`.
fn parse_authority(authority: &str) -> Result<SocketAddr, HboneError> {
    let bad = |reason| HboneError::Authority {
        authority: truncate(authority),
        reason,
    };
    if authority.len() > MAX_AUTHORITY_LEN {
        return Err(bad("it is too long"));
    }
    if authority.contains('@') {
        return Err(bad("it carries user information"));
    }
    let addr: SocketAddr = authority
        .parse()
        .map_err(|_| bad("expected `ip:port` or `[ipv6]:port`; host names are refused"))?;
    if addr.port() == 0 {
        return Err(bad("port 0"));
    }
    if let SocketAddr::V6(v6) = addr
        && (v6.scope_id() != 0 || v6.flowinfo() != 0)
    {
        return Err(bad("a scope id is not allowed"));
    }
    // `SocketAddr`'s parser accepts forms (like `%scope`) we do not print; only the canonical
    // spelling names a destination, so two spellings never reach two different checks.
    if addr.to_string() != authority {
        return Err(bad("it is not in canonical form"));
    }
    Ok(addr)
}

fn parse_port(digits: &str) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    digits.parse().ok().filter(|&p| p != 0)
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    for byte in bytes {
        write!(out, "{byte:02x}").expect("writing to a String cannot fail");
    }
}

fn parse_hex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    if hex.len() != 2 * N || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use http::Uri;

    use super::*;

    fn parts(method: Method, uri: &str) -> Parts {
        let uri: Uri = uri.parse().unwrap();
        Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn server_names_round_trip() {
        for dst in [
            "10.0.0.2:8080",
            "127.0.0.1:1",
            "[::1]:65535",
            "[fd00:1::2]:443",
        ] {
            let dst: SocketAddr = dst.parse().unwrap();
            let ServerName::DnsName(name) = server_name(dst) else {
                panic!("not a DNS name")
            };
            assert_eq!(parse_server_name(Some(name.as_ref())), Ok(dst), "{dst}");
        }
        let ServerName::DnsName(name) = server_name("10.0.0.2:8080".parse().unwrap()) else {
            panic!("not a DNS name")
        };
        assert_eq!(name.as_ref(), "p8080.a0a000002.hbone.invalid");
    }

    #[test]
    fn bad_server_names_are_refused() {
        assert_eq!(parse_server_name(None), Err(HboneError::NoServerName));
        for name in [
            "example.com",
            "p8080.hbone.invalid",
            "p0.a0a000002.hbone.invalid",
            "p65536.a0a000002.hbone.invalid",
            "p080.a0a000002.hbone.invalid",
            "q80.a0a000002.hbone.invalid",
            "p80.a0a00002.hbone.invalid",
            "p80.a0A000002.hbone.invalid",
            "p80.c0a000002.hbone.invalid",
            "p80.b0a000002.hbone.invalid",
            "p80.a0a000002.x.hbone.invalid",
        ] {
            assert!(
                matches!(
                    parse_server_name(Some(name)),
                    Err(HboneError::ServerName { .. })
                ),
                "{name} was accepted"
            );
        }
    }

    #[test]
    fn connect_requests_round_trip() {
        for dst in ["10.0.0.2:8080", "[fd00::2]:443"] {
            let dst: SocketAddr = dst.parse().unwrap();
            let (parts, ()) = connect_request(dst, &Placement::default()).into_parts();
            assert_eq!(parse_connect(&parts), Ok(dst));
            assert!(parts.headers.get(PLACEMENT).is_none());
        }
    }

    #[test]
    fn placements_round_trip_and_bad_parts_are_left_out() {
        let placement = Placement {
            container_id: Some("ab".repeat(32)),
            pod_uid: Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".to_owned()),
        };
        let (parts, ()) = connect_request("10.0.0.2:80".parse().unwrap(), &placement).into_parts();
        assert_eq!(parse_placement(&parts.headers), placement);
        let only_pod = Placement {
            container_id: None,
            ..placement.clone()
        };
        let value = placement_value(&only_pod).unwrap();
        assert_eq!(value, "pod=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
        let mut headers = HeaderMap::new();
        for bad in [
            "container=zz; pod=",
            "container=../../etc",
            "pod",
            &format!("container={}", "a".repeat(65)),
        ] {
            headers.insert(PLACEMENT, HeaderValue::from_str(bad).unwrap());
            assert_eq!(parse_placement(&headers), Placement::default(), "{bad}");
        }
        headers.insert(
            PLACEMENT,
            HeaderValue::from_static("container=abc; x=1; pod=zz"),
        );
        assert_eq!(
            parse_placement(&headers),
            Placement {
                container_id: Some("abc".to_owned()),
                pod_uid: None,
            }
        );
    }

    #[test]
    fn bad_connect_requests_are_refused() {
        assert!(matches!(
            parse_connect(&parts(Method::GET, "10.0.0.2:80")),
            Err(HboneError::Method(m)) if m == "GET"
        ));
        assert_eq!(
            parse_connect(&parts(Method::CONNECT, "https://10.0.0.2:80/x")),
            Err(HboneError::SchemeOrPath)
        );
        for authority in [
            "example.com:80",
            "10.0.0.2",
            "10.0.0.2:0",
            "10.0.0.2:99999",
            "[fe80::1%2]:80",
            "user@10.0.0.2:80",
            "010.0.0.2:80",
            "[::ffff:10.0.0.2]:08",
        ] {
            let result = authority
                .parse::<Uri>()
                .map(|uri| parse_connect(&parts(Method::CONNECT, &uri.to_string())));
            assert!(
                !matches!(result, Ok(Ok(_))),
                "{authority} was accepted: {result:?}"
            );
        }
    }

    #[test]
    fn refusals_map_to_distinct_statuses() {
        let statuses: std::collections::HashSet<_> =
            Refusal::ALL.iter().map(|r| r.status()).collect();
        assert_eq!(statuses.len(), Refusal::ALL.len());
        for refusal in Refusal::ALL {
            assert_eq!(Refusal::from_status(refusal.status()), Some(refusal));
        }
        assert_eq!(Refusal::from_status(StatusCode::OK), None);
    }
}
