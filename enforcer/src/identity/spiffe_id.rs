//! SPIFFE IDs and trust domain names, parsed strictly per SPIFFE-ID.md (sections 2.1 to 2.3).
//!
//! Decisions where the standard leaves room:
//! - The scheme must be written `spiffe` and the trust domain in lowercase. Section 2.4 calls
//!   both case-insensitive, but section 2.1 requires a lowercase host; like the reference
//!   libraries we reject other spellings instead of normalising them, so one identity has one
//!   spelling in policy, audit records and certificates.
//! - A trailing `/` is rejected (the standard says MUST NOT in 2.2).
//! - Positions in errors are byte offsets into the input, starting at 0.

use std::{fmt, str::FromStr};

/// The scheme and separator every SPIFFE ID starts with.
const PREFIX: &str = "spiffe://";
/// Longest SPIFFE ID accepted, in bytes (SPIFFE-ID.md 2.3).
pub(super) const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name accepted, in bytes (the URI host limit of RFC 3986).
pub(super) const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a SPIFFE ID or trust domain name was rejected, with the byte position where it applies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("empty SPIFFE ID")]
    Empty,
    /// The input is longer than the standard's limit.
    #[error("SPIFFE ID is {len} bytes long, more than the {MAX_SPIFFE_ID_LEN}-byte limit")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
    },
    /// The input does not start with the lowercase scheme and separator `spiffe://`.
    #[error("SPIFFE ID must start with `spiffe://` (lowercase scheme)")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("trust domain is empty (at byte {position})")]
    EmptyTrustDomain {
        /// Where the trust domain should have started.
        position: usize,
    },
    /// The trust domain name is longer than a URI host may be.
    #[error("trust domain is {len} bytes long, more than the {MAX_TRUST_DOMAIN_LEN}-byte limit")]
    TrustDomainTooLong {
        /// Length of the trust domain name in bytes.
        len: usize,
    },
    /// A `:` in the authority: a port (or its delimiter) is not allowed.
    #[error("port not allowed in the trust domain (`:` at byte {position})")]
    Port {
        /// Byte position of the `:`.
        position: usize,
    },
    /// An `@` in the authority: userinfo is not allowed.
    #[error("userinfo not allowed in the trust domain (`@` at byte {position})")]
    UserInfo {
        /// Byte position of the `@`.
        position: usize,
    },
    /// A `%`: percent-encoding is not allowed anywhere.
    #[error("percent-encoding not allowed (`%` at byte {position})")]
    PercentEncoded {
        /// Byte position of the `%`.
        position: usize,
    },
    /// A `?`: SPIFFE IDs have no query component.
    #[error("query not allowed (`?` at byte {position})")]
    Query {
        /// Byte position of the `?`.
        position: usize,
    },
    /// A `#`: SPIFFE IDs have no fragment component.
    #[error("fragment not allowed (`#` at byte {position})")]
    Fragment {
        /// Byte position of the `#`.
        position: usize,
    },
    /// A character outside `[a-z0-9._-]` in the trust domain name.
    #[error(
        "character {character:?} at byte {position} not allowed in a trust domain \
         (only lowercase letters, digits, `.`, `-`, `_`)"
    )]
    TrustDomainChar {
        /// Byte position of the character.
        position: usize,
        /// The offending character.
        character: char,
    },
    /// A character outside `[a-zA-Z0-9._-]` in a path segment.
    #[error(
        "character {character:?} at byte {position} not allowed in a path segment \
         (only letters, digits, `.`, `-`, `_`)"
    )]
    PathChar {
        /// Byte position of the character.
        position: usize,
        /// The offending character.
        character: char,
    },
    /// Two consecutive `/` make an empty path segment.
    #[error("empty path segment at byte {position}")]
    EmptySegment {
        /// Byte position where the empty segment starts.
        position: usize,
    },
    /// A `.` or `..` path segment.
    #[error("relative path segment `{segment}` at byte {position}")]
    DotSegment {
        /// Byte position where the segment starts.
        position: usize,
        /// The segment, `.` or `..`.
        segment: &'static str,
    },
    /// The path ends with `/`.
    #[error("trailing `/` at byte {position}")]
    TrailingSlash {
        /// Byte position of the final `/`.
        position: usize,
    },
}

/// The name of a trust domain (the authority of a SPIFFE ID), e.g. `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The trust domain's name, without scheme.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself (`spiffe://name`, no path), as carried by
    /// signing certificates.
    #[must_use]
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            td_len: self.0.len(),
            id: format!("{PREFIX}{}", self.0),
        }
    }

    /// The SPIFFE ID of a workload in this trust domain; `path` must start with `/`.
    pub fn workload(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        format!("{PREFIX}{}{path}", self.0).parse()
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    /// Parses a bare trust domain name (`example.org`, not `spiffe://example.org`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check_trust_domain(s, 0)?;
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE ID such as `spiffe://example.org/ns/prod/sa/web`; the path may be empty for the
/// ID of a trust domain's signing authority.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    id: String,
    td_len: usize,
}

impl SpiffeId {
    /// The whole ID as a URI string.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain the ID belongs to.
    #[must_use]
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// The trust domain name as a borrowed string.
    #[must_use]
    pub fn trust_domain_str(&self) -> &str {
        &self.id[PREFIX.len()..PREFIX.len() + self.td_len]
    }

    /// The path, starting with `/`, or empty for a trust domain's own ID.
    #[must_use]
    pub fn path(&self) -> &str {
        &self.id[PREFIX.len() + self.td_len..]
    }

    /// Whether the ID names a workload (has a path), as leaf SVIDs must (X509-SVID.md 3.1).
    #[must_use]
    pub fn is_workload(&self) -> bool {
        !self.path().is_empty()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let rest = s.strip_prefix(PREFIX).ok_or(SpiffeIdError::WrongScheme)?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        check_trust_domain(&rest[..td_len], PREFIX.len())?;
        check_path(&rest[td_len..], PREFIX.len() + td_len)?;
        Ok(Self {
            id: s.to_owned(),
            td_len,
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.id
    }
}

/// Maps a URI delimiter that must not appear to the error naming it, if `c` is one.
fn delimiter_error(c: char, position: usize) -> Option<SpiffeIdError> {
    match c {
        '%' => Some(SpiffeIdError::PercentEncoded { position }),
        '?' => Some(SpiffeIdError::Query { position }),
        '#' => Some(SpiffeIdError::Fragment { position }),
        _ => None,
    }
}

/// Checks a trust domain name that starts at byte `offset` of the original input.
fn check_trust_domain(td: &str, offset: usize) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain { position: offset });
    }
    for (i, c) in td.char_indices() {
        let position = offset + i;
        if matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_') {
            continue;
        }
        return Err(match c {
            ':' => SpiffeIdError::Port { position },
            '@' => SpiffeIdError::UserInfo { position },
            _ => delimiter_error(c, position).unwrap_or(SpiffeIdError::TrustDomainChar {
                position,
                character: c,
            }),
        });
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: td.len() });
    }
    Ok(())
}

/// Checks a path (empty, or starting with `/`) that starts at byte `offset` of the input.
fn check_path(path: &str, offset: usize) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // Each segment follows a `/`; `start` is the byte position of the segment's first byte.
    let mut start = offset + 1;
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() {
            return Err(if segments.peek().is_none() {
                SpiffeIdError::TrailingSlash {
                    position: start - 1,
                }
            } else {
                SpiffeIdError::EmptySegment { position: start }
            });
        }
        for (i, c) in segment.char_indices() {
            let position = start + i;
            if !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) {
                return Err(
                    delimiter_error(c, position).unwrap_or(SpiffeIdError::PathChar {
                        position,
                        character: c,
                    }),
                );
            }
        }
        if let dots @ ("." | "..") = segment {
            return Err(SpiffeIdError::DotSegment {
                position: start,
                segment: if dots == "." { "." } else { ".." },
            });
        }
        start += segment.len() + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_round_trip() {
        let long_path = format!("spiffe://example.org/{}", "a".repeat(2048 - 21));
        let long_td = format!("spiffe://{}/w", "t".repeat(255));
        let cases: &[(&str, &str, &str)] = &[
            ("spiffe://example.org", "example.org", ""),
            ("spiffe://example.org/web", "example.org", "/web"),
            (
                "spiffe://k8s-west.example.com/ns/staging/sa/default",
                "k8s-west.example.com",
                "/ns/staging/sa/default",
            ),
            (
                "spiffe://a_b.c-d.0/A-Z_a.z-0.9",
                "a_b.c-d.0",
                "/A-Z_a.z-0.9",
            ),
            ("spiffe://10.0.0.1/ip-looking", "10.0.0.1", "/ip-looking"),
            ("spiffe://td/...", "td", "/..."),
            ("spiffe://td/.hidden/..x", "td", "/.hidden/..x"),
            (&long_path, "example.org", &long_path[20..]),
            (&long_td, &long_td[9..264], "/w"),
        ];
        for &(input, td, path) in cases {
            let id: SpiffeId = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.to_string(), input);
            assert_eq!(id.trust_domain_str(), td, "{input}");
            assert_eq!(id.trust_domain().as_str(), td, "{input}");
            assert_eq!(id.path(), path, "{input}");
            assert_eq!(id.is_workload(), !path.is_empty(), "{input}");
            assert_eq!(id.to_string().parse::<SpiffeId>().as_ref(), Ok(&id));
        }
    }

    /// Asserts that every input is rejected with exactly the expected error.
    fn assert_rejected(cases: &[(&str, SpiffeIdError)]) {
        for (input, expected) in cases {
            assert_eq!(
                input.parse::<SpiffeId>().as_ref(),
                Err(expected),
                "{input:?}"
            );
            assert!(!expected.to_string().is_empty());
        }
    }

    #[test]
    fn invalid_scheme_length_and_trust_domain_name_the_rule_and_position() {
        use SpiffeIdError as E;
        let too_long = format!("spiffe://example.org/{}", "a".repeat(2048 - 20));
        let td_too_long = format!("spiffe://{}", "t".repeat(256));
        assert_rejected(&[
            ("", E::Empty),
            (&too_long, E::TooLong { len: 2049 }),
            ("http://example.org/web", E::WrongScheme),
            ("SPIFFE://example.org/web", E::WrongScheme),
            ("spiffe:/example.org/web", E::WrongScheme),
            ("spiffe//example.org", E::WrongScheme),
            ("example.org/web", E::WrongScheme),
            ("spiffe://", E::EmptyTrustDomain { position: 9 }),
            ("spiffe:///web", E::EmptyTrustDomain { position: 9 }),
            (&td_too_long, E::TrustDomainTooLong { len: 256 }),
            ("spiffe://example.org:8080/web", E::Port { position: 20 }),
            ("spiffe://example.org:/web", E::Port { position: 20 }),
            (
                "spiffe://user@example.org/web",
                E::UserInfo { position: 13 },
            ),
            (
                "spiffe://exa%6dple.org/web",
                E::PercentEncoded { position: 12 },
            ),
            (
                "spiffe://example.org/w%20b",
                E::PercentEncoded { position: 22 },
            ),
            ("spiffe://example.org/web?x=1", E::Query { position: 24 }),
            ("spiffe://example.org?x=1", E::Query { position: 20 }),
            (
                "spiffe://example.org/web#frag",
                E::Fragment { position: 24 },
            ),
            ("spiffe://example.org#frag", E::Fragment { position: 20 }),
            (
                "spiffe://Example.org/web",
                E::TrustDomainChar {
                    position: 9,
                    character: 'E',
                },
            ),
            (
                "spiffe://exa mple.org",
                E::TrustDomainChar {
                    position: 12,
                    character: ' ',
                },
            ),
            (
                "spiffe://[::1]/web",
                E::TrustDomainChar {
                    position: 9,
                    character: '[',
                },
            ),
            (
                "spiffe://exämple.org",
                E::TrustDomainChar {
                    position: 11,
                    character: 'ä',
                },
            ),
        ]);
    }

    #[test]
    fn invalid_paths_name_the_rule_and_position() {
        use SpiffeIdError as E;
        assert_rejected(&[
            (
                "spiffe://example.org/we b",
                E::PathChar {
                    position: 23,
                    character: ' ',
                },
            ),
            (
                "spiffe://example.org/a/b:c",
                E::PathChar {
                    position: 24,
                    character: ':',
                },
            ),
            (
                "spiffe://example.org/ä",
                E::PathChar {
                    position: 21,
                    character: 'ä',
                },
            ),
            (
                "spiffe://example.org/a+b",
                E::PathChar {
                    position: 22,
                    character: '+',
                },
            ),
            (
                "spiffe://example.org//web",
                E::EmptySegment { position: 21 },
            ),
            (
                "spiffe://example.org/a//b",
                E::EmptySegment { position: 23 },
            ),
            (
                "spiffe://example.org/.",
                E::DotSegment {
                    position: 21,
                    segment: ".",
                },
            ),
            (
                "spiffe://example.org/a/../b",
                E::DotSegment {
                    position: 23,
                    segment: "..",
                },
            ),
            ("spiffe://example.org/", E::TrailingSlash { position: 20 }),
            (
                "spiffe://example.org/web/",
                E::TrailingSlash { position: 24 },
            ),
        ]);
    }

    #[test]
    fn trust_domains_parse_bare_names_only() {
        let td: TrustDomain = "prod.example.org".parse().expect("valid");
        assert_eq!(td.to_string(), "prod.example.org");
        assert_eq!(td.id().to_string(), "spiffe://prod.example.org");
        assert!(!td.id().is_workload());
        assert_eq!(
            td.workload("/web").expect("valid").to_string(),
            "spiffe://prod.example.org/web"
        );
        assert_eq!(
            td.workload("/web/"),
            Err(SpiffeIdError::TrailingSlash { position: 29 })
        );
        for (input, expected) in [
            ("", SpiffeIdError::EmptyTrustDomain { position: 0 }),
            ("spiffe://x", SpiffeIdError::Port { position: 6 }),
            (
                "Prod",
                SpiffeIdError::TrustDomainChar {
                    position: 0,
                    character: 'P',
                },
            ),
            (
                "a/b",
                SpiffeIdError::TrustDomainChar {
                    position: 1,
                    character: '/',
                },
            ),
        ] {
            assert_eq!(input.parse::<TrustDomain>(), Err(expected), "{input:?}");
        }
    }
}
