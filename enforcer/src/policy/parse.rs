//! Parsing and validation of a policy file (TOML), reporting every problem with its location.
//!
//! ```toml
//! trust_domain = "example.org"
//! mode = "enforce"                      # or "audit" (dry run)
//! enroll = ["/system.slice/web.service"] # cgroup v2 paths
//!
//! [[workload]]
//! id = "spiffe://example.org/web"
//! selectors = ["unix:uid:1000", "cgroup:path:/system.slice/web.service"]
//!
//! [[allow]]
//! from = "spiffe://example.org/web"
//! to = "spiffe://example.org/db/*"      # exact ID, path prefix (/*) or whole trust domain
//! ports = [5432]                        # omitted: every port
//!
//! [[deny]]
//! from = "spiffe://example.org/*"
//! to = "spiffe://example.org/admin"
//! audit = true                          # report instead of refusing
//!
//! [[egress]]                            # plaintext outside the mesh; never to a peer
//! cidr = "10.0.0.0/8"
//! protocol = "udp"                      # "tcp" (the default), "udp" or "icmp" (no ports)
//! ports = [53]
//!
//! [[peer]]
//! address = "192.0.2.10"
//! port = 15008
//! cidrs = ["10.88.2.0/24"]             # its workloads' addresses (containers, pods)
//! ```
#![forbid(unsafe_code)]

use std::{collections::HashMap, net::IpAddr, ops::Range, path::Path, str::FromStr};

use toml::{
    Spanned,
    de::{DeArray, DeTable, DeValue},
};

use super::{
    diagnostic::{Diagnostic, Diagnostics},
    model::{
        Action, DEFAULT_PEER_PORT, Egress, IdPattern, Mode, Network, Peer, Policy, Ports, Protocol,
        Rule, Workload,
    },
};
use crate::{
    attest::{Selector, cgroup_path_problem},
    identity::{SpiffeId, TrustDomain},
};

/// Largest policy file accepted.
pub const MAX_POLICY_BYTES: usize = 8 * 1024 * 1024;

/// Read and validate the policy at `path`: the policy, or every problem found.
pub fn load(path: &Path) -> Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>> {
    let name = path.display().to_string();
    let bytes = match read_capped(path) {
        Ok(bytes) => bytes,
        Err(message) => return Err(vec![whole_file(&name, message)]),
    };
    parse(&name, &bytes)
}

fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|error| format!("cannot read: {error}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_POLICY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| format!("cannot read: {error}"))?;
    if bytes.len() > MAX_POLICY_BYTES {
        return Err(format!("larger than the {MAX_POLICY_BYTES} byte limit"));
    }
    Ok(bytes)
}

fn whole_file(name: &str, message: String) -> Diagnostic {
    Diagnostic {
        severity: super::diagnostic::Severity::Error,
        file: name.to_owned(),
        line: 1,
        col: 1,
        message,
    }
}

/// Validate the policy text `bytes` read from `file`. On success the warnings come along.
pub fn parse(file: &str, bytes: &[u8]) -> Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>> {
    if bytes.len() > MAX_POLICY_BYTES {
        return Err(vec![whole_file(
            file,
            format!("larger than the {MAX_POLICY_BYTES} byte limit"),
        )]);
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => {
            let valid = std::str::from_utf8(&bytes[..error.valid_up_to()]).unwrap_or_default();
            let mut diagnostics = Diagnostics::new(file, valid);
            diagnostics.error(
                &(valid.len()..valid.len()),
                "invalid UTF-8 (a policy file is UTF-8 text)",
            );
            return Err(diagnostics.into_sorted());
        }
    };
    let mut diagnostics = Diagnostics::new(file, text);
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(error) => {
            let span = error.span().unwrap_or(0..0);
            diagnostics.error(&span, format!("invalid TOML: {}", error.message().trim()));
            return Err(diagnostics.into_sorted());
        }
    };
    let policy = Parser {
        diagnostics: &mut diagnostics,
    }
    .policy(root.get_ref(), &root.span());
    match policy {
        Some(policy) if !diagnostics.has_errors() => Ok((policy, diagnostics.into_sorted())),
        _ => Err(diagnostics.into_sorted()),
    }
}

struct Parser<'d, 's> {
    diagnostics: &'d mut Diagnostics<'s>,
}

type Value<'i> = Spanned<DeValue<'i>>;

impl Parser<'_, '_> {
    fn policy(&mut self, root: &DeTable<'_>, span: &Range<usize>) -> Option<Policy> {
        self.keys(
            root,
            "the top level",
            &[
                "trust_domain",
                "mode",
                "enroll",
                "workload",
                "allow",
                "deny",
                "egress",
                "peer",
            ],
        );
        let trust_domain = if let Some(value) = root.get("trust_domain") {
            self.parsed::<TrustDomain>(value, "trust domain")
        } else {
            self.diagnostics
                .error(&(span.start..span.start), "missing `trust_domain`");
            None
        };
        let mode = root
            .get("mode")
            .map_or(Some(Mode::Enforce), |v| self.mode(v));
        let enroll = self.enroll(root.get("enroll"));
        let workloads = self.workloads(root.get("workload"), trust_domain.as_ref());
        let rules = self.rules(root);
        let egress = self.each(root.get("egress"), "egress", |parser, table, span| {
            parser.egress(table, span)
        });
        let peers = self.each(root.get("peer"), "peer", |parser, table, span| {
            parser.peer(table, span)
        });
        self.duplicate_peers(&peers);
        let peers: Vec<Peer> = peers.into_iter().map(|(peer, _)| peer).collect();
        let workloads: Vec<Workload> = workloads.into_iter().map(|(w, _)| w).collect();
        if let Some(domain) = &trust_domain {
            self.cross_checks(domain, &workloads, &rules);
        }
        self.egress_covering_peers(&egress, &peers);
        Some(Policy {
            trust_domain: trust_domain?,
            mode: mode?,
            enroll,
            workloads,
            rules: rules.into_iter().map(|(rule, _)| rule).collect(),
            egress: egress.into_iter().map(|(egress, _)| egress).collect(),
            peers,
        })
    }

    /// Report every key of `table` not in `allowed`.
    fn keys(&mut self, table: &DeTable<'_>, context: &str, allowed: &[&str]) {
        for key in table.keys() {
            if !allowed.contains(&key.get_ref().as_ref()) {
                self.diagnostics.error(
                    &key.span(),
                    format!(
                        "unknown key `{}` in {context}; expected one of: {}",
                        key.get_ref(),
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    fn string<'v>(&mut self, value: &'v Value<'_>, what: &str) -> Option<&'v str> {
        if let DeValue::String(text) = value.get_ref() {
            Some(text.as_ref())
        } else {
            self.diagnostics
                .error(&value.span(), format!("{what}: expected a string"));
            None
        }
    }

    fn parsed<T: FromStr>(&mut self, value: &Value<'_>, what: &str) -> Option<T>
    where
        T::Err: std::fmt::Display,
    {
        let text = self.string(value, what)?;
        match text.parse() {
            Ok(parsed) => Some(parsed),
            Err(error) => {
                self.diagnostics
                    .error(&value.span(), format!("invalid {what} `{text}`: {error}"));
                None
            }
        }
    }

    fn array<'v, 'i>(&mut self, value: &'v Value<'i>, what: &str) -> Option<&'v DeArray<'i>> {
        if let DeValue::Array(array) = value.get_ref() {
            Some(array)
        } else {
            self.diagnostics
                .error(&value.span(), format!("{what}: expected an array"));
            None
        }
    }

    fn mode(&mut self, value: &Value<'_>) -> Option<Mode> {
        match self.string(value, "mode")? {
            "enforce" => Some(Mode::Enforce),
            "audit" => Some(Mode::Audit),
            other => {
                self.diagnostics.error(
                    &value.span(),
                    format!("invalid mode `{other}`: expected \"enforce\" or \"audit\""),
                );
                None
            }
        }
    }

    fn enroll(&mut self, value: Option<&Value<'_>>) -> Vec<String> {
        let Some(array) = value.and_then(|value| self.array(value, "enroll")) else {
            return Vec::new();
        };
        let mut paths = Vec::new();
        for item in array {
            let Some(path) = self.string(item, "enroll entry") else {
                continue;
            };
            if path == "/" {
                self.diagnostics.error(
                    &item.span(),
                    "refusing to enroll the root cgroup: it would enroll every process",
                );
            } else if let Some(problem) = cgroup_path_problem(path) {
                // The kernel enrolls a cgroup created later by the hash of its path as it
                // writes it: any other spelling would silently enroll nothing.
                self.diagnostics.error(
                    &item.span(),
                    format!(
                        "enroll entry `{path}` is not a cgroup path as the kernel writes one \
                         (`/a/b`: no `//`, `.`, `..` or trailing `/`): {problem}"
                    ),
                );
            } else {
                paths.push(path.to_owned());
            }
        }
        paths
    }

    /// Call `each` for every table of the array of tables `value` (e.g. `[[egress]]`).
    fn each<T>(
        &mut self,
        value: Option<&Value<'_>>,
        what: &str,
        mut each: impl FnMut(&mut Self, &DeTable<'_>, &Range<usize>) -> Option<T>,
    ) -> Vec<T> {
        let Some(array) = value.and_then(|value| self.array(value, what)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in array {
            if let DeValue::Table(table) = item.get_ref() {
                out.extend(each(self, table, &item.span()));
            } else {
                self.diagnostics.error(
                    &item.span(),
                    format!("{what}: expected a table (write it as [[{what}]])"),
                );
            }
        }
        out
    }

    fn required<'v, 'i>(
        &mut self,
        table: &'v DeTable<'i>,
        key: &str,
        context: &str,
        span: &Range<usize>,
    ) -> Option<&'v Value<'i>> {
        let value = table.get(key);
        if value.is_none() {
            self.diagnostics
                .error(span, format!("{context} is missing `{key}`"));
        }
        value
    }

    fn workloads(
        &mut self,
        value: Option<&Value<'_>>,
        trust_domain: Option<&TrustDomain>,
    ) -> Vec<(Workload, Range<usize>)> {
        let workloads = self.each(value, "workload", |parser, table, span| {
            parser.keys(table, "[[workload]]", &["id", "selectors"]);
            let id_value = parser.required(table, "id", "[[workload]]", span)?;
            let id: Option<SpiffeId> = parser.parsed(id_value, "SPIFFE ID");
            if let (Some(id), Some(domain)) = (&id, trust_domain)
                && id.trust_domain_str() != domain.as_str()
            {
                parser.diagnostics.error(
                    &id_value.span(),
                    format!("workload {id} is not in this node's trust domain {domain}"),
                );
            }
            let selectors = parser.selectors(table, span);
            Some((
                Workload {
                    id: id?,
                    selectors: selectors?,
                },
                id_value.span(),
            ))
        });
        let mut first_line: HashMap<&SpiffeId, usize> = HashMap::new();
        for (workload, span) in &workloads {
            let line = super::diagnostic::line_col(self.diagnostics.source(), span.start).0;
            if let Some(first) = first_line.get(&workload.id) {
                self.diagnostics.error(
                    span,
                    format!("duplicate workload {} (first at line {first})", workload.id),
                );
            } else {
                first_line.insert(&workload.id, line);
            }
        }
        workloads
    }

    fn selectors(&mut self, table: &DeTable<'_>, span: &Range<usize>) -> Option<Vec<Selector>> {
        let value = self.required(table, "selectors", "[[workload]]", span)?;
        let array = self.array(value, "selectors")?;
        if array.is_empty() {
            self.diagnostics.error(
                &value.span(),
                "a workload needs at least one selector (an empty list would match every process)",
            );
            return None;
        }
        let mut selectors = Vec::new();
        let mut ok = true;
        for item in array {
            match self.parsed::<Selector>(item, "selector") {
                Some(selector) => selectors.push(selector),
                None => ok = false,
            }
        }
        ok.then_some(selectors)
    }

    fn rules(&mut self, root: &DeTable<'_>) -> Vec<(Rule, Range<usize>)> {
        let mut rules = Vec::new();
        for (key, action) in [("allow", Action::Allow), ("deny", Action::Deny)] {
            let parsed = self.each(root.get(key), key, |parser, table, span| {
                let context = format!("[[{key}]]");
                parser.keys(table, &context, &["from", "to", "ports", "audit"]);
                let from = parser
                    .required(table, "from", &context, span)
                    .and_then(|value| parser.pattern(value));
                let to = parser
                    .required(table, "to", &context, span)
                    .and_then(|value| parser.pattern(value));
                let ports = parser.ports(table.get("ports"));
                let audit = match table.get("audit") {
                    None => Some(false),
                    Some(value) => {
                        if let DeValue::Boolean(audit) = value.get_ref() {
                            if *audit && action == Action::Allow {
                                parser.diagnostics.warning(
                                    &value.span(),
                                    "`audit` has no effect on an allow rule",
                                );
                            }
                            Some(*audit)
                        } else {
                            parser
                                .diagnostics
                                .error(&value.span(), "audit: expected true or false");
                            None
                        }
                    }
                };
                Some((
                    Rule {
                        number: 0,
                        action,
                        from: from?,
                        to: to?,
                        ports: ports?,
                        audit: audit?,
                    },
                    span.clone(),
                ))
            });
            rules.extend(parsed);
        }
        // Number rules in file order, allow and deny together.
        rules.sort_by_key(|(_, span)| span.start);
        for (number, (rule, _)) in (1..).zip(rules.iter_mut()) {
            rule.number = number;
        }
        rules
    }

    fn pattern(&mut self, value: &Value<'_>) -> Option<IdPattern> {
        let text = self.string(value, "SPIFFE ID pattern")?;
        match parse_pattern(text) {
            Ok(pattern) => Some(pattern),
            Err(error) => {
                self.diagnostics.error(
                    &value.span(),
                    format!("invalid SPIFFE ID pattern `{text}`: {error}"),
                );
                None
            }
        }
    }

    fn ports(&mut self, value: Option<&Value<'_>>) -> Option<Ports> {
        let Some(value) = value else {
            return Some(Ports::Any);
        };
        let array = self.array(value, "ports")?;
        if array.is_empty() {
            self.diagnostics.error(
                &value.span(),
                "ports: an empty list covers nothing; omit `ports` to cover every port",
            );
            return None;
        }
        let mut ports = Vec::new();
        let mut ok = true;
        for item in array {
            if let Some(port) = port_value(item) {
                ports.push(port);
            } else {
                ok = false;
                self.diagnostics
                    .error(&item.span(), "port: expected an integer from 1 to 65535");
            }
        }
        ports.sort_unstable();
        ports.dedup();
        ok.then_some(Ports::List(ports))
    }

    /// An `[[egress]]` entry, with the span of its `cidr` (where warnings about it point).
    fn egress(
        &mut self,
        table: &DeTable<'_>,
        span: &Range<usize>,
    ) -> Option<(Egress, Range<usize>)> {
        self.keys(table, "[[egress]]", &["cidr", "protocol", "ports"]);
        let protocol = table
            .get("protocol")
            .map_or(Some(Protocol::Tcp), |value| self.protocol(value));
        let ports = match (protocol, table.get("ports")) {
            (Some(Protocol::Icmp), Some(value)) => {
                self.diagnostics.error(
                    &value.span(),
                    "icmp has no ports; omit `ports` from an icmp egress entry",
                );
                None
            }
            (_, value) => self.ports(value),
        };
        let value = self.required(table, "cidr", "[[egress]]", span)?;
        let text = self.string(value, "cidr")?;
        match parse_cidr(text) {
            Ok((network, prefix_len)) => Some((
                Egress {
                    network,
                    prefix_len,
                    protocol: protocol?,
                    ports: ports?,
                },
                value.span(),
            )),
            Err(reason) => {
                self.diagnostics
                    .error(&value.span(), format!("invalid CIDR `{text}`: {reason}"));
                None
            }
        }
    }

    fn protocol(&mut self, value: &Value<'_>) -> Option<Protocol> {
        match self.string(value, "protocol")? {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "icmp" => Some(Protocol::Icmp),
            other => {
                self.diagnostics.error(
                    &value.span(),
                    format!("invalid protocol `{other}`: expected \"tcp\", \"udp\" or \"icmp\""),
                );
                None
            }
        }
    }

    /// A `[[peer]]` entry, with the span of its `address` (where errors about it point).
    fn peer(&mut self, table: &DeTable<'_>, span: &Range<usize>) -> Option<(Peer, Range<usize>)> {
        self.keys(table, "[[peer]]", &["address", "port", "cidrs"]);
        let value = self.required(table, "address", "[[peer]]", span)?;
        let address: Option<IpAddr> = self.parsed(value, "peer address");
        let port = match table.get("port") {
            None => Some(DEFAULT_PEER_PORT),
            Some(value) => {
                let port = port_value(value);
                if port.is_none() {
                    self.diagnostics
                        .error(&value.span(), "port: expected an integer from 1 to 65535");
                }
                port
            }
        };
        let cidrs = self.networks(table.get("cidrs"), "cidrs");
        Some((
            Peer {
                address: address?,
                port: port?,
                cidrs: cidrs?,
            },
            value.span(),
        ))
    }

    /// An optional array of networks (`["10.88.2.0/24", "fd88:2::/64"]`); `None` when an
    /// entry is invalid (each is reported).
    fn networks(&mut self, value: Option<&Value<'_>>, what: &str) -> Option<Vec<Network>> {
        let Some(value) = value else {
            return Some(Vec::new());
        };
        let array = self.array(value, what)?;
        let mut networks = Vec::new();
        let mut valid = true;
        for item in array {
            let Some(text) = self.string(item, what) else {
                valid = false;
                continue;
            };
            match parse_cidr(text) {
                Ok((network, prefix_len)) => networks.push(Network {
                    network,
                    prefix_len,
                }),
                Err(error) => {
                    self.diagnostics.error(
                        &item.span(),
                        format!("invalid {what} entry `{text}`: {error}"),
                    );
                    valid = false;
                }
            }
        }
        valid.then_some(networks)
    }

    /// Report each `[[peer]]` whose address an earlier one already names (IPv4-mapped IPv6
    /// addresses count as the IPv4 ones): the tunnel routes a destination to one node by its
    /// address, so a second entry would be silently ignored.
    fn duplicate_peers(&mut self, peers: &[(Peer, Range<usize>)]) {
        let mut first: HashMap<IpAddr, (IpAddr, usize)> = HashMap::new();
        let mut networks: Vec<(Network, usize)> = Vec::new();
        for (peer, span) in peers {
            let line = super::diagnostic::line_col(self.diagnostics.source(), span.start).0;
            for net in &peer.cidrs {
                // A destination must lead to one node: no two peers' networks may overlap.
                if let Some((other, other_line)) = networks
                    .iter()
                    .find(|(other, _)| other.contains(net.network) || net.contains(other.network))
                {
                    self.diagnostics.error(
                        span,
                        format!(
                            "peer networks overlap: {}/{} and {}/{} of the [[peer]] at line \
                             {other_line} (a destination must lead to one node)",
                            net.network, net.prefix_len, other.network, other.prefix_len
                        ),
                    );
                }
            }
            networks.extend(peer.cidrs.iter().map(|&net| (net, line)));
            if let Some(&(address, first_line)) = first.get(&peer.address.to_canonical()) {
                self.diagnostics.error(
                    span,
                    format!(
                        "duplicate peer: address `{}` names the same node as address `{address}` \
                         of the [[peer]] at line {first_line}",
                        peer.address
                    ),
                );
            } else {
                first.insert(peer.address.to_canonical(), (peer.address, line));
            }
        }
    }

    /// Checks across entries: contradictions, and rules that name no workload.
    fn cross_checks(
        &mut self,
        trust_domain: &TrustDomain,
        workloads: &[Workload],
        rules: &[(Rule, Range<usize>)],
    ) {
        let mut seen: HashMap<(&IdPattern, &IdPattern, &Ports), (Action, usize)> = HashMap::new();
        for (rule, span) in rules {
            let key = (&rule.from, &rule.to, &rule.ports);
            if let Some(&(action, line)) = seen.get(&key)
                && action != rule.action
            {
                self.diagnostics.error(
                    span,
                    format!(
                        "contradicts the rule at line {line} (same from, to and ports, opposite action; deny would always win)"
                    ),
                );
            }
            let line = super::diagnostic::line_col(self.diagnostics.source(), span.start).0;
            seen.entry(key).or_insert((rule.action, line));
            for (side, pattern) in [("from", &rule.from), ("to", &rule.to)] {
                let local = pattern.trust_domain() == trust_domain.as_str();
                if local && !workloads.iter().any(|w| pattern.matches(&w.id)) {
                    self.diagnostics.warning(
                        span,
                        format!("`{side}` = {pattern} names no workload of this policy"),
                    );
                }
            }
        }
    }

    /// Warn about each TCP egress entry that covers a mesh peer's address: peers win, so
    /// flows to a peer always go through the tunnel and the entry never applies to it. (UDP and
    /// ICMP do not go through the tunnel, so those entries conflict with nothing.)
    fn egress_covering_peers(&mut self, egress: &[(Egress, Range<usize>)], peers: &[Peer]) {
        for (entry, span) in egress {
            if entry.protocol != Protocol::Tcp {
                continue;
            }
            let covered: Vec<IpAddr> = peers
                .iter()
                .map(|peer| peer.address)
                .filter(|&address| entry.contains(address))
                .collect();
            let (noun, whom) = match covered.len() {
                0 => continue,
                1 => ("peer", "the peer"),
                _ => ("peers", "the peers"),
            };
            let covered: Vec<String> = covered.iter().map(ToString::to_string).collect();
            self.diagnostics.warning(
                span,
                format!(
                    "egress {}/{} covers {noun} {}: flows to {whom} go through the tunnel, never as plaintext",
                    entry.network,
                    entry.prefix_len,
                    covered.join(", ")
                ),
            );
        }
    }
}

/// A port (1 to 65535) written as a TOML integer.
fn port_value(value: &Value<'_>) -> Option<u16> {
    let DeValue::Integer(integer) = value.get_ref() else {
        return None;
    };
    i64::from_str_radix(integer.as_str(), integer.radix())
        .ok()
        .and_then(|n| u16::try_from(n).ok())
        .filter(|&port| port != 0)
}

/// Parse a rule side: `spiffe://td/path` (exact), `spiffe://td/path/*` (prefix),
/// `spiffe://td` or `spiffe://td/*` (whole trust domain).
pub(super) fn parse_pattern(text: &str) -> Result<IdPattern, String> {
    let (base, wildcard) = match text.strip_suffix("/*") {
        Some(base) => (base, true),
        None => (text, false),
    };
    let id: SpiffeId = base.parse().map_err(|error| format!("{error}"))?;
    Ok(if id.path().is_empty() {
        IdPattern::TrustDomain(id.trust_domain())
    } else if wildcard {
        IdPattern::Prefix(id)
    } else {
        IdPattern::Exact(id)
    })
}

/// Parse `address/prefix` (a bare address is a host route), rejecting host bits.
pub(super) fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let address: IpAddr = address
        .parse()
        .map_err(|_| format!("`{address}` is not an IP address"))?;
    let max: u8 = if address.is_ipv4() { 32 } else { 128 };
    let prefix_len = match prefix {
        None => max,
        Some(prefix) => prefix
            .parse::<u8>()
            .ok()
            .filter(|&len| len <= max)
            .ok_or_else(|| format!("prefix length `{prefix}` is not 0 to {max}"))?,
    };
    let bits = match address {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
        IpAddr::V6(v6) => u128::from(v6),
    };
    if prefix_len < max && bits.checked_shl(u32::from(prefix_len)).unwrap_or(0) != 0 {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(prefix_len))
            .unwrap_or(0);
        let network = match address {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(
                u32::try_from((bits & mask) >> 96).unwrap_or(0),
            )),
            IpAddr::V6(_) => IpAddr::V6((bits & mask).into()),
        };
        return Err(format!(
            "host bits are set; the network is {network}/{prefix_len}"
        ));
    }
    Ok((address, prefix_len))
}

#[cfg(test)]
mod tests {
    use super::parse;
    use crate::policy::{Egress, Ports, Protocol, Severity, diagnostic::render};

    const HEAD: &str = "trust_domain = \"example.org\"\n";

    /// The egress entries and warnings of `HEAD` + `text`, which must check.
    fn checked(text: &str) -> (Vec<Egress>, Vec<String>) {
        let text = format!("{HEAD}{text}");
        let (policy, warnings) = parse("p.toml", text.as_bytes())
            .unwrap_or_else(|diagnostics| panic!("{text}\n{}", render(&diagnostics)));
        assert!(warnings.iter().all(|w| w.severity == Severity::Warning));
        (
            policy.egress,
            warnings.iter().map(ToString::to_string).collect(),
        )
    }

    /// Every diagnostic of `HEAD` + `text`, which must not check.
    fn errors(text: &str) -> Vec<String> {
        let text = format!("{HEAD}{text}");
        match parse("p.toml", text.as_bytes()) {
            Ok(_) => panic!("expected errors in:\n{text}"),
            Err(diagnostics) => diagnostics.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn peer_networks_are_checked_and_must_not_overlap() {
        let bad = errors("[[peer]]\naddress = \"10.0.0.2\"\ncidrs = [\"10.88.2.1/24\", 7]\n");
        assert!(
            bad.iter().any(|e| e.contains("p.toml:")
                && e.contains("invalid cidrs entry `10.88.2.1/24`: host bits are set")),
            "{bad:?}"
        );
        assert!(
            bad.iter().any(|e| e.contains("cidrs: expected a string")),
            "{bad:?}"
        );
        let overlap = errors(
            "[[peer]]\naddress = \"10.0.0.2\"\ncidrs = [\"10.88.0.0/16\"]\n\
             [[peer]]\naddress = \"10.0.0.3\"\ncidrs = [\"10.88.3.0/24\"]\n",
        );
        assert!(
            overlap.iter().any(|e| e.contains(
                "peer networks overlap: 10.88.3.0/24 and 10.88.0.0/16 of the [[peer]] at line"
            )),
            "{overlap:?}"
        );
    }

    #[test]
    fn egress_protocol_defaults_to_tcp() {
        let (egress, warnings) = checked("[[egress]]\ncidr = \"10.0.0.0/8\"\nports = [443]\n");
        assert_eq!(
            egress,
            [Egress {
                network: "10.0.0.0".parse().unwrap(),
                prefix_len: 8,
                protocol: Protocol::Tcp,
                ports: Ports::List(vec![443]),
            }]
        );
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn egress_protocol_takes_each_value() {
        let (egress, _) = checked(
            "[[egress]]\ncidr = \"10.0.0.0/8\"\nprotocol = \"tcp\"\nports = [443]\n\
             [[egress]]\ncidr = \"10.0.0.53\"\nprotocol = \"udp\"\nports = [53]\n\
             [[egress]]\ncidr = \"fd00::/8\"\nprotocol = \"icmp\"\n",
        );
        let got: Vec<(Protocol, String)> =
            egress.iter().map(|e| (e.protocol, e.to_string())).collect();
        assert_eq!(
            got,
            [
                (
                    Protocol::Tcp,
                    "egress tcp 10.0.0.0/8 on ports 443".to_owned()
                ),
                (
                    Protocol::Udp,
                    "egress udp 10.0.0.53/32 on ports 53".to_owned()
                ),
                (Protocol::Icmp, "egress icmp fd00::/8".to_owned()),
            ]
        );
        assert_eq!(egress[2].ports, Ports::Any);
    }

    #[test]
    fn a_bad_protocol_is_located() {
        assert_eq!(
            errors("[[egress]]\ncidr = \"10.0.0.0/8\"\nprotocol = \"sctp\"\n"),
            ["p.toml:4:12: error: invalid protocol `sctp`: expected \"tcp\", \"udp\" or \"icmp\""]
        );
        assert_eq!(
            errors("[[egress]]\ncidr = \"10.0.0.0/8\"\nprotocol = \"TCP\"\n"),
            ["p.toml:4:12: error: invalid protocol `TCP`: expected \"tcp\", \"udp\" or \"icmp\""]
        );
        assert_eq!(
            errors("[[egress]]\ncidr = \"10.0.0.0/8\"\nprotocol = 6\n"),
            ["p.toml:4:12: error: protocol: expected a string"]
        );
    }

    #[test]
    fn icmp_with_ports_is_located() {
        assert_eq!(
            errors("[[egress]]\ncidr = \"10.0.0.0/8\"\nprotocol = \"icmp\"\nports = [7]\n"),
            ["p.toml:5:9: error: icmp has no ports; omit `ports` from an icmp egress entry"]
        );
    }

    #[test]
    fn every_egress_problem_is_reported_with_a_protocol() {
        assert_eq!(
            errors(
                "[[egress]]\nprotocol = \"udp\"\nports = []\nttl = 1\n\
                 [[egress]]\ncidr = \"10.0.0.1/8\"\nprotocol = \"udp\"\nports = [0]\n"
            ),
            [
                "p.toml:2:1: error: [[egress]] is missing `cidr`",
                "p.toml:4:9: error: ports: an empty list covers nothing; omit `ports` to cover every port",
                "p.toml:5:1: error: unknown key `ttl` in [[egress]]; expected one of: cidr, protocol, ports",
                "p.toml:7:8: error: invalid CIDR `10.0.0.1/8`: host bits are set; the network is 10.0.0.0/8",
                "p.toml:9:10: error: port: expected an integer from 1 to 65535",
            ]
        );
    }

    const PEERS: &str = "[[peer]]\naddress = \"10.0.0.2\"\n[[peer]]\naddress = \"fd00::2\"\n";

    #[test]
    fn tcp_egress_covering_a_peer_warns_at_the_entry() {
        let (egress, warnings) = checked(&format!(
            "{PEERS}[[egress]]\ncidr = \"10.0.0.0/8\"\n[[egress]]\ncidr = \"fd00::/8\"\nports = [443]\n"
        ));
        assert_eq!(egress.len(), 2, "a warning keeps the entry");
        assert_eq!(
            warnings,
            [
                "p.toml:7:8: warning: egress 10.0.0.0/8 covers peer 10.0.0.2: flows to the peer go through the tunnel, never as plaintext",
                "p.toml:9:8: warning: egress fd00::/8 covers peer fd00::2: flows to the peer go through the tunnel, never as plaintext",
            ]
        );
    }

    #[test]
    fn egress_covering_several_peers_names_each() {
        let (_, warnings) = checked(&format!(
            "{PEERS}[[peer]]\naddress = \"10.9.0.1\"\nport = 16000\n\
             [[egress]]\ncidr = \"0.0.0.0/0\"\nprotocol = \"tcp\"\n"
        ));
        assert_eq!(
            warnings,
            [
                "p.toml:10:8: warning: egress 0.0.0.0/0 covers peers 10.0.0.2, 10.9.0.1: flows to the peers go through the tunnel, never as plaintext"
            ]
        );
    }

    #[test]
    fn egress_not_covering_a_peer_does_not_warn() {
        let (_, warnings) = checked(&format!(
            "{PEERS}[[egress]]\ncidr = \"10.0.0.3\"\n[[egress]]\ncidr = \"192.168.0.0/16\"\n\
             [[egress]]\ncidr = \"fd01::/16\"\nports = [53]\n"
        ));
        assert!(warnings.is_empty(), "{warnings:?}");
        // A network of the other family, even the whole of it, covers no peer.
        let (_, warnings) =
            checked("[[peer]]\naddress = \"fd00::2\"\n[[egress]]\ncidr = \"0.0.0.0/0\"\n");
        assert!(warnings.is_empty(), "{warnings:?}");
        let (_, warnings) =
            checked("[[peer]]\naddress = \"10.0.0.2\"\n[[egress]]\ncidr = \"::/0\"\n");
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4_for_peer_coverage() {
        let (_, warnings) = checked(
            "[[peer]]\naddress = \"::ffff:10.0.0.2\"\n[[egress]]\ncidr = \"10.0.0.0/24\"\n",
        );
        assert_eq!(
            warnings,
            [
                "p.toml:5:8: warning: egress 10.0.0.0/24 covers peer ::ffff:10.0.0.2: flows to the peer go through the tunnel, never as plaintext"
            ]
        );
        let (_, warnings) = checked(
            "[[peer]]\naddress = \"10.0.0.2\"\n[[egress]]\ncidr = \"::ffff:10.0.0.0/120\"\n",
        );
        assert_eq!(
            warnings,
            [
                "p.toml:5:8: warning: egress ::ffff:10.0.0.0/120 covers peer 10.0.0.2: flows to the peer go through the tunnel, never as plaintext"
            ]
        );
    }

    #[test]
    fn udp_and_icmp_egress_may_cover_a_peer() {
        let (egress, warnings) = checked(&format!(
            "{PEERS}[[egress]]\ncidr = \"10.0.0.0/8\"\nprotocol = \"udp\"\nports = [53]\n\
             [[egress]]\ncidr = \"fd00::/8\"\nprotocol = \"icmp\"\n"
        ));
        assert_eq!(egress.len(), 2);
        assert!(warnings.is_empty(), "{warnings:?}");
    }
}
