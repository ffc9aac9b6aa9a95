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
//! [[egress]]
//! cidr = "10.0.0.0/8"
//! ports = [53]
//!
//! [[peer]]
//! address = "192.0.2.10"
//! port = 15008
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
        Action, DEFAULT_PEER_PORT, Egress, IdPattern, Mode, Peer, Policy, Ports, Rule, Workload,
    },
};
use crate::{
    attest::Selector,
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
        let workloads: Vec<Workload> = workloads.into_iter().map(|(w, _)| w).collect();
        if let Some(domain) = &trust_domain {
            self.cross_checks(domain, &workloads, &rules);
        }
        Some(Policy {
            trust_domain: trust_domain?,
            mode: mode?,
            enroll,
            workloads,
            rules: rules.into_iter().map(|(rule, _)| rule).collect(),
            egress,
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
            if !path.starts_with('/') || path.split('/').any(|part| part == "..") {
                self.diagnostics.error(
                    &item.span(),
                    format!("enroll entry `{path}`: expected an absolute cgroup path without `..`"),
                );
            } else if path.trim_end_matches('/').is_empty() {
                self.diagnostics.error(
                    &item.span(),
                    "refusing to enroll the root cgroup: it would enroll every process",
                );
            } else {
                paths.push(path.trim_end_matches('/').to_owned());
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

    fn egress(&mut self, table: &DeTable<'_>, span: &Range<usize>) -> Option<Egress> {
        self.keys(table, "[[egress]]", &["cidr", "ports"]);
        let value = self.required(table, "cidr", "[[egress]]", span)?;
        let text = self.string(value, "cidr")?;
        let ports = self.ports(table.get("ports"));
        match parse_cidr(text) {
            Ok((network, prefix_len)) => Some(Egress {
                network,
                prefix_len,
                ports: ports?,
            }),
            Err(reason) => {
                self.diagnostics
                    .error(&value.span(), format!("invalid CIDR `{text}`: {reason}"));
                None
            }
        }
    }

    fn peer(&mut self, table: &DeTable<'_>, span: &Range<usize>) -> Option<Peer> {
        self.keys(table, "[[peer]]", &["address", "port"]);
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
        Some(Peer {
            address: address?,
            port: port?,
        })
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
}

/// A TCP port (1 to 65535) written as a TOML integer.
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
pub fn parse_pattern(text: &str) -> Result<IdPattern, String> {
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
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
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
