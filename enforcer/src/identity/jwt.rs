//! JWT-SVIDs (SPIFFE `JWT-SVID.md`): the trust domain's ES256 signing key, minting, the JWT
//! bundle (the `jwt-svid` keys of a SPIFFE bundle, `SPIFFE_Trust_Domain_and_Bundle.md` 4)
//! and validation.
//!
//! Signing and the signature check are jsonwebtoken's (on ring); nothing else is, because
//! jsonwebtoken reads the system clock and accepts more than JWT-SVID.md allows. We parse the
//! token ourselves and only ask `jsonwebtoken::crypto::verify` whether the ES256 signature
//! holds. What we change or decide where the standards leave room:
//! - Only ES256 (P-256). JWT-SVID.md 2.1 also allows RSA, PSS, ES384 and ES512; every other
//!   `alg`, `none` and the HMAC family included, is refused by name before any key is used.
//! - `kid` is required (JWT-SVID.md 2.2 makes it optional): the key is looked up by `kid` in
//!   the bundle of the `sub`'s trust domain, never tried one by one.
//! - The header holds `alg`, `kid` and `typ` (`JWT` or `JOSE`) only; anything else (`jwk`,
//!   `jku`, `crit`, ...) is refused, as JWT-SVID.md 2 says it MUST NOT be there.
//! - `sub` must be a workload SPIFFE ID (with a path), as leaf X.509-SVIDs must.
//! - Time is the caller's `now`, with no leeway: expired when `exp <= now`, not yet valid when
//!   `nbf > now`. `exp` and `nbf` must be whole seconds (RFC 7519 allows fractions; we never
//!   mint them).
//! - `aud` (a string or a non-empty array, RFC 7519 4.1.3) must contain the audience asked for.
//! - Tokens over [`MAX_TOKEN_LEN`] bytes are refused unread.
//!
//! Checks run in this order, each failure its own [`JwtError`] variant: the caller's audience
//! (not empty), then the token's size, structure, `alg`, other header members, `kid`, `sub`,
//! bundle, `kid` in the bundle, signature, `exp`, `nbf`, `aud`.
//!
//! In bundles, keys whose `use` is `x509-svid` or a value unknown here are skipped (bundle
//! spec 4.2.2: unknown uses MUST be ignored); a key with no `use`, or a `jwt-svid` key we
//! cannot verify with (not EC P-256, no `kid`), is an error rather than silently dropped.

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use super::{
    pem::{self, PemError},
    spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain},
};

/// Default lifetime of a minted JWT-SVID: short, as JWT-SVID.md 6.1 recommends for bearer
/// tokens.
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_mins(5);
/// File name of the trust domain's JWT signing key (PKCS#8 PEM) in the CA directory.
pub const JWT_KEY_FILE: &str = "jwt.key";
/// Longest token accepted, in bytes; anything longer is refused before it is decoded.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The only signing algorithm minted and accepted.
const ES256: &str = "ES256";
/// The JWK `use` value of JWT-SVID authorities.
const JWT_SVID_USE: &str = "jwt-svid";
/// The only JWK key type and curve of our keys.
const KTY_EC: &str = "EC";
/// The curve of ES256 keys.
const CRV_P256: &str = "P-256";
/// Length of one P-256 coordinate in bytes.
const COORD_LEN: usize = 32;
/// What `exp` and `nbf` must be.
const WHOLE_SECONDS: &str = "whole seconds since 1970";
/// Last second humantime can print (9999-12-31T23:59:59Z).
const LAST_PRINTABLE_SECOND: u64 = 253_402_300_799;

/// Why a JWT signing key, a JWT bundle or a JWT-SVID could not be made, read or accepted.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// rcgen (ring) failed to generate a P-256 key.
    #[error("failed to generate the JWT signing key")]
    Generate {
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// The private key is not a PKCS#8 ECDSA P-256 key.
    #[error("{what}: private key is not a PKCS#8 ECDSA P-256 key")]
    Key {
        /// What was being loaded.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// Reading PEM input or reading/writing the key file failed.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// jsonwebtoken failed to sign the token.
    #[error("failed to sign the JWT-SVID")]
    Sign {
        /// jsonwebtoken's error.
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    /// The subject to mint for belongs to another trust domain than the signing key.
    #[error("`{id}` is outside the JWT signing key's trust domain `{trust_domain}`")]
    ForeignSubject {
        /// The requested subject.
        id: SpiffeId,
        /// The signing key's trust domain.
        trust_domain: TrustDomain,
    },
    /// The subject has no path: JWT-SVIDs name workloads, not trust domains.
    #[error("`{id}` has no path; only workload IDs get JWT-SVIDs")]
    NotAWorkload {
        /// The subject.
        id: SpiffeId,
    },
    /// The issue time and TTL do not give an expiry a whole second or more after the issue
    /// time, both after 1970.
    #[error(
        "cannot mint a JWT-SVID issued at {} for {ttl:?}: `exp` must fall at least one whole \
         second after `iat`, both after 1970",
        display_time(*issued_at)
    )]
    Lifetime {
        /// The requested issue time.
        issued_at: SystemTime,
        /// The requested lifetime.
        ttl: Duration,
    },
    /// An audience list (to mint) or an audience (to validate) is empty, or one audience is
    /// the empty string.
    #[error("empty audience: a JWT-SVID is minted and validated for named, non-empty audiences")]
    EmptyAudience,
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("JWT is {len} bytes long, more than the {MAX_TOKEN_LEN}-byte limit")]
    TooLong {
        /// Length of the token in bytes.
        len: usize,
    },
    /// The token is not three `.`-separated parts (JWS compact serialization).
    #[error("malformed JWT: {parts} `.`-separated parts, expected 3 (header.payload.signature)")]
    TokenParts {
        /// How many parts there were.
        parts: usize,
    },
    /// A part of the token is not unpadded base64url.
    #[error("malformed JWT: the {part} is not unpadded base64url")]
    TokenBase64 {
        /// `header`, `payload` or `signature`.
        part: &'static str,
        /// The decoder's error.
        #[source]
        source: base64::DecodeError,
    },
    /// The header or payload is not a JSON object.
    #[error("malformed JWT: the {part} is not a JSON object")]
    TokenJson {
        /// `header` or `payload`.
        part: &'static str,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The header's `alg` is not ES256 (shown as JSON, or `(missing)`).
    #[error("JWT `alg` is {alg}; only ES256 is accepted")]
    UnsupportedAlgorithm {
        /// The `alg` value as JSON, or `(missing)`.
        alg: String,
    },
    /// The header has a member JWT-SVID.md 2 does not allow, or a `typ` other than JWT/JOSE.
    #[error(
        "JWT header member `{member}` = {value} is not allowed: a JWT-SVID header holds only \
         `alg`, `kid` and `typ` (JWT or JOSE)"
    )]
    UnsupportedHeader {
        /// The header member's name.
        member: String,
        /// Its value as JSON.
        value: String,
    },
    /// The header has no `kid` (as a non-empty string).
    #[error("JWT header has no `kid`; the signing key is looked up by it")]
    MissingKeyId,
    /// A claim is missing or of the wrong type.
    #[error("JWT-SVID claim `{claim}` is missing or not {expected}")]
    BadClaim {
        /// The claim's name.
        claim: &'static str,
        /// What it should be.
        expected: &'static str,
    },
    /// The `sub` claim is not a valid SPIFFE ID.
    #[error("JWT-SVID `sub` {sub:?} is not a SPIFFE ID")]
    InvalidSubject {
        /// The claim as written.
        sub: String,
        /// Why it is not a SPIFFE ID.
        #[source]
        source: SpiffeIdError,
    },
    /// No JWT bundle is trusted for the subject's trust domain.
    #[error("no JWT bundle for trust domain `{trust_domain}` (JWT-SVID subject `{id}`)")]
    UnknownTrustDomain {
        /// The subject's trust domain.
        trust_domain: TrustDomain,
        /// The subject.
        id: SpiffeId,
    },
    /// The subject's trust domain has no JWT authority with the token's `kid`.
    #[error("JWT `kid` {kid:?} is not a JWT authority of trust domain `{trust_domain}`")]
    UnknownKeyId {
        /// The token's key ID.
        kid: String,
        /// The trust domain whose bundle was searched.
        trust_domain: TrustDomain,
    },
    /// The signature does not verify with the key the `kid` names.
    #[error("JWT signature does not verify with key {kid:?} of trust domain `{trust_domain}`")]
    BadSignature {
        /// The token's key ID.
        kid: String,
        /// The key's trust domain.
        trust_domain: TrustDomain,
    },
    /// The token expired (`exp <= now`).
    #[error("JWT-SVID expired at {} (now {})", display_time(*expiry), display_time(*now))]
    Expired {
        /// When it expired (`exp`).
        expiry: SystemTime,
        /// The time it was validated at.
        now: SystemTime,
    },
    /// The token is not valid yet (`nbf > now`).
    #[error(
        "JWT-SVID is not valid before {} (now {})",
        display_time(*not_before),
        display_time(*now)
    )]
    NotYetValid {
        /// When it becomes valid (`nbf`).
        not_before: SystemTime,
        /// The time it was validated at.
        now: SystemTime,
    },
    /// The `aud` claim does not contain the audience the validator identifies with.
    #[error("JWT-SVID is for audience {found:?}, not for {audience:?}")]
    WrongAudience {
        /// The audience asked for.
        audience: String,
        /// The token's audiences.
        found: Vec<String>,
    },
    /// A JWK set does not parse or has the wrong shape.
    #[error("{what}: invalid JWK set JSON at line {line}, column {column}")]
    JwksJson {
        /// What was being read.
        what: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A JWK has a bad or missing member; `field` is a path such as `keys[2].crv`.
    #[error("{what}: `{field}`: {reason}")]
    JwksField {
        /// What was being read.
        what: String,
        /// Where in the document.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A P-256 public key as its two coordinates.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PublicKey {
    x: [u8; COORD_LEN],
    y: [u8; COORD_LEN],
}

impl PublicKey {
    /// Reads an uncompressed SEC1 point (`04 || x || y`), the form ring hands out.
    fn from_point(point: &[u8]) -> Option<Self> {
        let (&tag, xy) = point.split_first()?;
        if tag != 4 || xy.len() != 2 * COORD_LEN {
            return None;
        }
        let (x, y) = xy.split_at(COORD_LEN);
        Some(Self {
            x: x.try_into().ok()?,
            y: y.try_into().ok()?,
        })
    }

    /// The RFC 7638 JWK thumbprint: base64url(SHA-256) of the required members in
    /// lexicographic order, no whitespace. Every holder of the key derives the same value.
    fn thumbprint(&self) -> String {
        let canonical = format!(
            r#"{{"crv":"{CRV_P256}","kty":"{KTY_EC}","x":"{}","y":"{}"}}"#,
            URL_SAFE_NO_PAD.encode(self.x),
            URL_SAFE_NO_PAD.encode(self.y)
        );
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    }

    /// Whether `signature` (base64url) is a valid ES256 signature of `message` by this key.
    fn verifies(&self, message: &str, signature: &str) -> bool {
        let mut point = Vec::with_capacity(1 + 2 * COORD_LEN);
        point.push(4);
        point.extend_from_slice(&self.x);
        point.extend_from_slice(&self.y);
        // `from_ec_der` takes the raw uncompressed point ring verifies with (the same bytes
        // `from_ec_components` assembles from a JWK's `x` and `y`).
        let key = DecodingKey::from_ec_der(&point);
        // An error only means the signature is not base64url, and `split` checked that.
        matches!(
            jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key, Algorithm::ES256),
            Ok(true)
        )
    }
}

/// The trust domain's JWT signing key (ECDSA P-256, ES256), which mints its JWT-SVIDs.
pub struct JwtAuthority {
    trust_domain: TrustDomain,
    pkcs8: PrivatePkcs8KeyDer<'static>,
    signing_key: EncodingKey,
    public: PublicKey,
    kid: String,
}

impl fmt::Debug for JwtAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl JwtAuthority {
    /// Generates a new signing key for `trust_domain`.
    pub fn generate(trust_domain: TrustDomain) -> Result<Self, JwtError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|source| JwtError::Generate { source })?;
        Ok(Self::from_key_pair(trust_domain, &key))
    }

    /// Reads the signing key of `trust_domain` from PKCS#8 PEM; `what` names the source.
    pub fn from_pem(trust_domain: TrustDomain, pem: &str, what: &str) -> Result<Self, JwtError> {
        let der = pem::parse_private_key(pem, what)?;
        let key = KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ECDSA_P256_SHA256).map_err(
            |source| JwtError::Key {
                what: what.to_owned(),
                source,
            },
        )?;
        Ok(Self::from_key_pair(trust_domain, &key))
    }

    /// Builds the authority from a P-256 key pair ring has accepted.
    fn from_key_pair(trust_domain: TrustDomain, key: &KeyPair) -> Self {
        let public = PublicKey::from_point(key.public_key_raw())
            .expect("ring's P-256 public keys are uncompressed 65-byte points");
        let pkcs8 = PrivatePkcs8KeyDer::from(key.serialize_der());
        Self {
            trust_domain,
            signing_key: EncodingKey::from_ec_der(pkcs8.secret_pkcs8_der()),
            pkcs8,
            kid: public.thumbprint(),
            public,
        }
    }

    /// The key as PKCS#8 PEM (a `PRIVATE KEY` section).
    #[must_use]
    pub fn to_pem(&self) -> String {
        pem::encode_private_key(&self.pkcs8)
    }

    /// Loads `dir/jwt.key`, or generates a key and writes it there (0600) if there is none;
    /// also says whether it was created. `dir` must exist.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &TrustDomain,
    ) -> Result<(Self, bool), JwtError> {
        let path = dir.join(JWT_KEY_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => Ok((
                Self::from_pem(trust_domain.clone(), &text, &path.display().to_string())?,
                false,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let authority = Self::generate(trust_domain.clone())?;
                pem::write_private(&path, &authority.to_pem())?;
                Ok((authority, true))
            }
            Err(source) => Err(PemError::Io {
                action: "read",
                path,
                source,
            }
            .into()),
        }
    }

    /// The trust domain whose JWT-SVIDs this key signs.
    #[must_use]
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The key ID: the RFC 7638 thumbprint of the public key, so every node holding the same
    /// key names it the same way.
    #[must_use]
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Mints a JWT-SVID for `subject` (a workload of this trust domain) and `audience` (one or
    /// more non-empty values), issued at `issued_at` and valid for `ttl`, in whole seconds.
    pub fn mint(
        &self,
        subject: &SpiffeId,
        audience: &[String],
        issued_at: SystemTime,
        ttl: Duration,
    ) -> Result<JwtSvid, JwtError> {
        if subject.trust_domain_str() != self.trust_domain.as_str() {
            return Err(JwtError::ForeignSubject {
                id: subject.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if !subject.is_workload() {
            return Err(JwtError::NotAWorkload {
                id: subject.clone(),
            });
        }
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(JwtError::EmptyAudience);
        }
        let lifetime = || JwtError::Lifetime { issued_at, ttl };
        let seconds = |t: SystemTime| t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs());
        let iat = seconds(issued_at).ok_or_else(lifetime)?;
        let exp = issued_at
            .checked_add(ttl)
            .and_then(seconds)
            .ok_or_else(lifetime)?;
        if exp <= iat {
            return Err(lifetime());
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let claims = MintedClaims {
            sub: subject.as_str(),
            aud: audience,
            exp,
            iat,
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.signing_key)
            .map_err(|source| JwtError::Sign { source })?;
        // A token its own validators would refuse is not worth handing out.
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::TooLong { len: token.len() });
        }
        Ok(JwtSvid {
            token,
            spiffe_id: subject.clone(),
            expiry: UNIX_EPOCH + Duration::from_secs(exp),
        })
    }

    /// The public key as this trust domain's JWT bundle, for validators.
    #[must_use]
    pub fn bundle(&self) -> JwtBundle {
        JwtBundle {
            trust_domain: self.trust_domain.clone(),
            keys: BTreeMap::from([(self.kid.clone(), self.public.clone())]),
        }
    }
}

/// The claims of a minted JWT-SVID.
#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    aud: &'a [String],
    exp: u64,
    iat: u64,
}

/// A minted JWT-SVID: the compact token and what it asserts.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSvid {
    /// The token (JWS compact serialization), a bearer credential.
    pub token: String,
    /// Its subject.
    pub spiffe_id: SpiffeId,
    /// Its `exp`.
    pub expiry: SystemTime,
}

impl fmt::Debug for JwtSvid {
    /// Leaves the token out: it is a bearer credential and must not reach logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

/// One trust domain's JWT authorities: the public keys its JWT-SVIDs are signed with, by
/// `kid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtBundle {
    trust_domain: TrustDomain,
    keys: BTreeMap<String, PublicKey>,
}

/// A JWK set as read; unknown members are ignored.
#[derive(Deserialize)]
struct JwksIn {
    keys: Vec<JwkIn>,
}

/// One JWK as read; every member is checked by [`JwtBundle::from_jwks`].
#[derive(Deserialize)]
struct JwkIn {
    #[serde(rename = "use")]
    usage: Option<String>,
    kty: Option<String>,
    crv: Option<String>,
    kid: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// A JWK set as written.
#[derive(Serialize)]
struct JwksOut<'a> {
    keys: Vec<JwkOut<'a>>,
}

/// One JWT authority as written.
#[derive(Serialize)]
struct JwkOut<'a> {
    kty: &'static str,
    crv: &'static str,
    x: String,
    y: String,
    kid: &'a str,
    #[serde(rename = "use")]
    usage: &'static str,
}

impl JwtBundle {
    /// The trust domain whose JWT authorities these are.
    #[must_use]
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The bundle as a JWK set of `jwt-svid` keys, ordered by `kid`: the JWT part of a SPIFFE
    /// bundle document.
    #[must_use]
    pub fn to_jwks(&self) -> Vec<u8> {
        let keys = self
            .keys
            .iter()
            .map(|(kid, key)| JwkOut {
                kty: KTY_EC,
                crv: CRV_P256,
                x: URL_SAFE_NO_PAD.encode(key.x),
                y: URL_SAFE_NO_PAD.encode(key.y),
                kid,
                usage: JWT_SVID_USE,
            })
            .collect();
        serde_json::to_vec(&JwksOut { keys }).expect("a JWK set of strings always serializes")
    }

    /// Reads the JWT authorities of `trust_domain` from a JWK set (a SPIFFE bundle document);
    /// `what` names the source. `x509-svid` keys and keys of unknown `use` are skipped; a key
    /// with no `use`, or a `jwt-svid` key that is not EC P-256 with a `kid`, is an error.
    pub fn from_jwks(trust_domain: TrustDomain, json: &[u8], what: &str) -> Result<Self, JwtError> {
        let doc: JwksIn = serde_json::from_slice(json).map_err(|source| JwtError::JwksJson {
            what: what.to_owned(),
            line: source.line(),
            column: source.column(),
            source,
        })?;
        let mut keys = BTreeMap::new();
        for (index, jwk) in doc.keys.into_iter().enumerate() {
            let field_error = |member: &str, reason: String| JwtError::JwksField {
                what: what.to_owned(),
                field: format!("keys[{index}].{member}"),
                reason,
            };
            match jwk.usage.as_deref() {
                Some(JWT_SVID_USE) => {}
                // `x509-svid` keys, and uses unknown here (bundle spec 4.2.2: ignore them).
                Some(_) => continue,
                None => {
                    return Err(field_error(
                        "use",
                        "missing; a SPIFFE bundle labels every key `jwt-svid` or `x509-svid`"
                            .to_owned(),
                    ));
                }
            }
            let (kid, key) = read_jwk(jwk, &field_error)?;
            if keys.contains_key(&kid) {
                return Err(field_error("kid", format!("{kid:?} names two keys")));
            }
            keys.insert(kid, key);
        }
        Ok(Self { trust_domain, keys })
    }
}

/// Checks a `jwt-svid` JWK and returns its `kid` and key; `error` builds a field error.
fn read_jwk(
    jwk: JwkIn,
    error: &dyn Fn(&str, String) -> JwtError,
) -> Result<(String, PublicKey), JwtError> {
    let expect = |member: &str, found: Option<&str>, wanted: &str| {
        if found == Some(wanted) {
            Ok(())
        } else {
            Err(error(
                member,
                format!(
                    "is {}; JWT authorities here are `{wanted}` (ES256 only)",
                    found.map_or_else(|| "missing".to_owned(), |v| format!("`{v}`"))
                ),
            ))
        }
    };
    expect("kty", jwk.kty.as_deref(), KTY_EC)?;
    expect("crv", jwk.crv.as_deref(), CRV_P256)?;
    let kid = jwk.kid.filter(|kid| !kid.is_empty()).ok_or_else(|| {
        error(
            "kid",
            "missing; JWT-SVIDs name their key by `kid`".to_owned(),
        )
    })?;
    let coordinate = |member: &str, value: Option<String>| {
        let bytes = URL_SAFE_NO_PAD
            .decode(value.unwrap_or_default())
            .map_err(|e| error(member, format!("not unpadded base64url: {e}")))?;
        <[u8; COORD_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
            error(
                member,
                format!("{} bytes, a P-256 coordinate is {COORD_LEN}", bytes.len()),
            )
        })
    };
    let x = coordinate("x", jwk.x)?;
    let y = coordinate("y", jwk.y)?;
    // A point off the curve is not refused here (ring checks it on every verification), so
    // such a key makes every token naming it fail with `BadSignature`.
    Ok((kid, PublicKey { x, y }))
}

/// The JWT bundles of every trust domain a validator trusts, by trust domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwtBundleSet {
    bundles: BTreeMap<TrustDomain, JwtBundle>,
}

impl JwtBundleSet {
    /// An empty set (trusts no JWT-SVID).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the bundle of its trust domain.
    pub fn insert(&mut self, bundle: JwtBundle) {
        self.bundles.insert(bundle.trust_domain.clone(), bundle);
    }

    /// The bundle of `trust_domain`, if trusted.
    #[must_use]
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&JwtBundle> {
        self.bundles.get(trust_domain)
    }

    /// All bundles, ordered by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &JwtBundle> {
        self.bundles.values()
    }
}

/// A JWT-SVID that passed every check: its subject and all of its claims.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedJwt {
    /// The `sub` claim, a workload SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Every claim of the payload, as sent.
    pub claims: Map<String, Value>,
}

/// Validates `token` as a JWT-SVID for `audience` at `now` against `bundles`; see the module
/// documentation for the checks and their order.
pub fn validate_jwt_svid(
    token: &str,
    audience: &str,
    bundles: &JwtBundleSet,
    now: SystemTime,
) -> Result<ValidatedJwt, JwtError> {
    if audience.is_empty() {
        return Err(JwtError::EmptyAudience);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLong { len: token.len() });
    }
    let parts = Parts::split(token)?;
    let kid = check_header(&parts.header)?;
    let spiffe_id = subject(&parts.claims)?;
    let trust_domain = spiffe_id.trust_domain();
    let Some(bundle) = bundles.get(&trust_domain) else {
        return Err(JwtError::UnknownTrustDomain {
            trust_domain,
            id: spiffe_id,
        });
    };
    let Some(key) = bundle.keys.get(kid) else {
        return Err(JwtError::UnknownKeyId {
            kid: kid.to_owned(),
            trust_domain,
        });
    };
    if !key.verifies(parts.signing_input, parts.signature) {
        return Err(JwtError::BadSignature {
            kid: kid.to_owned(),
            trust_domain,
        });
    }
    check_times(&parts.claims, now)?;
    check_audience(&parts.claims, audience)?;
    Ok(ValidatedJwt {
        spiffe_id,
        claims: parts.claims,
    })
}

/// A token split into its decoded header and claims and its signed and signature parts.
struct Parts<'a> {
    header: Map<String, Value>,
    claims: Map<String, Value>,
    /// `header.payload` as sent: what the signature covers.
    signing_input: &'a str,
    /// The signature as sent (base64url).
    signature: &'a str,
}

impl<'a> Parts<'a> {
    /// Splits and decodes a JWS compact serialization (RFC 7515 7.1).
    fn split(token: &'a str) -> Result<Self, JwtError> {
        let pieces: Vec<&str> = token.split('.').collect();
        let [header, payload, signature] = pieces[..] else {
            return Err(JwtError::TokenParts {
                parts: pieces.len(),
            });
        };
        let decode = |part: &'static str, text: &str| {
            URL_SAFE_NO_PAD
                .decode(text)
                .map_err(|source| JwtError::TokenBase64 { part, source })
        };
        let json = |part: &'static str, bytes: &[u8]| {
            serde_json::from_slice::<Map<String, Value>>(bytes)
                .map_err(|source| JwtError::TokenJson { part, source })
        };
        let header_bytes = decode("header", header)?;
        let payload_bytes = decode("payload", payload)?;
        decode("signature", signature)?;
        Ok(Self {
            header: json("header", &header_bytes)?,
            claims: json("payload", &payload_bytes)?,
            signing_input: &token[..header.len() + 1 + payload.len()],
            signature,
        })
    }
}

/// Checks `alg`, then that nothing but `kid` and a JWT/JOSE `typ` is beside it, then returns
/// the `kid`.
fn check_header(header: &Map<String, Value>) -> Result<&str, JwtError> {
    match header.get("alg") {
        Some(Value::String(alg)) if alg == ES256 => {}
        other => {
            return Err(JwtError::UnsupportedAlgorithm {
                alg: other.map_or_else(|| "(missing)".to_owned(), Value::to_string),
            });
        }
    }
    for (member, value) in header {
        let allowed = match member.as_str() {
            "alg" | "kid" => true,
            "typ" => matches!(value.as_str(), Some("JWT" | "JOSE")),
            _ => false,
        };
        if !allowed {
            return Err(JwtError::UnsupportedHeader {
                member: member.clone(),
                value: value.to_string(),
            });
        }
    }
    match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => Ok(kid),
        _ => Err(JwtError::MissingKeyId),
    }
}

/// The `sub` claim as a workload SPIFFE ID.
fn subject(claims: &Map<String, Value>) -> Result<SpiffeId, JwtError> {
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::BadClaim {
            claim: "sub",
            expected: "a string",
        })?;
    let id: SpiffeId = sub.parse().map_err(|source| JwtError::InvalidSubject {
        sub: sub.to_owned(),
        source,
    })?;
    if !id.is_workload() {
        return Err(JwtError::NotAWorkload { id });
    }
    Ok(id)
}

/// Checks `exp` (required) and `nbf` (when present) against `now`.
fn check_times(claims: &Map<String, Value>, now: SystemTime) -> Result<(), JwtError> {
    let exp = numeric_date(claims, "exp")?.ok_or(JwtError::BadClaim {
        claim: "exp",
        expected: WHOLE_SECONDS,
    })?;
    if exp <= now {
        return Err(JwtError::Expired { expiry: exp, now });
    }
    match numeric_date(claims, "nbf")? {
        Some(not_before) if not_before > now => Err(JwtError::NotYetValid { not_before, now }),
        _ => Ok(()),
    }
}

/// The time a `NumericDate` claim names, if present. Seconds past the year 9999 are read as its
/// last second: later than any `now` a validator runs at, and still printable in errors.
fn numeric_date(
    claims: &Map<String, Value>,
    claim: &'static str,
) -> Result<Option<SystemTime>, JwtError> {
    claims
        .get(claim)
        .map(|value| {
            let secs = value.as_u64().ok_or(JwtError::BadClaim {
                claim,
                expected: WHOLE_SECONDS,
            })?;
            Ok(UNIX_EPOCH + Duration::from_secs(secs.min(LAST_PRINTABLE_SECOND)))
        })
        .transpose()
}

/// Checks that `aud` (a string or a non-empty array of strings) contains `audience`.
fn check_audience(claims: &Map<String, Value>, audience: &str) -> Result<(), JwtError> {
    let bad = || JwtError::BadClaim {
        claim: "aud",
        expected: "a string or a non-empty array of strings",
    };
    let found: Vec<&str> = match claims.get("aud") {
        Some(Value::String(one)) => vec![one.as_str()],
        Some(Value::Array(many)) if !many.is_empty() => many
            .iter()
            .map(|v| v.as_str().ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    if found.contains(&audience) {
        Ok(())
    } else {
        Err(JwtError::WrongAudience {
            audience: audience.to_owned(),
            found: found.into_iter().map(str::to_owned).collect(),
        })
    }
}

/// A time as RFC 3339 (UTC, seconds) for messages; outside 1970..=9999 as its debug form.
fn display_time(time: SystemTime) -> String {
    let last = UNIX_EPOCH + Duration::from_secs(LAST_PRINTABLE_SECOND);
    if (UNIX_EPOCH..=last).contains(&time) {
        humantime::format_rfc3339_seconds(time).to_string()
    } else {
        format!("{time:?}")
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use serde_json::json;

    use super::*;

    const TD: &str = "example.org";
    const AUDIENCE: &str = "spiffe://example.org/reports";

    fn td(name: &str) -> TrustDomain {
        name.parse().expect("trust domain")
    }

    fn web() -> SpiffeId {
        "spiffe://example.org/ns/prod/web".parse().expect("id")
    }

    fn authority() -> JwtAuthority {
        JwtAuthority::generate(td(TD)).expect("generate")
    }

    fn bundles(authority: &JwtAuthority) -> JwtBundleSet {
        let mut set = JwtBundleSet::new();
        set.insert(authority.bundle());
        set
    }

    /// Seconds since 1970 of [`issued`]: 2027-01-15T08:00:00Z.
    const ISSUED: u64 = 1_800_000_000;

    /// `secs` seconds since 1970.
    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A fixed issue time, so expiry is exact.
    fn issued() -> SystemTime {
        at(ISSUED)
    }

    /// One second after [`issued`]: well inside the default TTL.
    fn soon() -> SystemTime {
        issued() + Duration::from_secs(1)
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The header a minted token carries.
    fn header_for(authority: &JwtAuthority) -> Value {
        json!({"alg": "ES256", "kid": authority.kid(), "typ": "JWT"})
    }

    /// Valid claims for `web()` and `AUDIENCE`, expiring five minutes after [`issued`].
    fn good_claims() -> Value {
        json!({
            "sub": web().as_str(),
            "aud": [AUDIENCE],
            "iat": ISSUED,
            "exp": ISSUED + 300,
        })
    }

    /// `header.payload.signature` from raw JSON and signature bytes, signed by no one.
    fn forge(header: &Value, claims: &Value, signature: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes()),
            b64(signature)
        )
    }

    /// A token with any header and claims, properly ES256-signed by `authority`'s key.
    fn sign(authority: &JwtAuthority, header: &Value, claims: &Value) -> String {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &authority.signing_key,
            Algorithm::ES256,
        )
        .expect("sign");
        format!("{message}.{signature}")
    }

    fn validate(token: &str, authority: &JwtAuthority) -> Result<ValidatedJwt, JwtError> {
        validate_jwt_svid(token, AUDIENCE, &bundles(authority), soon())
    }

    /// What `authority` mints for `web`, for [`AUDIENCE`], at [`issued`], for the default TTL.
    fn mint_web(authority: &JwtAuthority) -> JwtSvid {
        authority
            .mint(
                &web(),
                &[AUDIENCE.to_owned()],
                issued(),
                DEFAULT_JWT_SVID_TTL,
            )
            .expect("mint")
    }

    fn decode_part(token: &str, index: usize) -> Value {
        let part = token.split('.').nth(index).expect("part");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64")).expect("json")
    }

    #[test]
    fn minted_tokens_validate_with_their_claims() {
        let a = authority();
        let svid = mint_web(&a);
        assert_eq!(svid.spiffe_id, web());
        assert_eq!(svid.expiry, issued() + DEFAULT_JWT_SVID_TTL);
        assert_eq!(decode_part(&svid.token, 0), header_for(&a));
        assert_eq!(decode_part(&svid.token, 1), good_claims());
        assert!(
            !format!("{svid:?}").contains(&svid.token),
            "Debug shows the token"
        );

        let valid = validate(&svid.token, &a).expect("valid");
        assert_eq!(valid.spiffe_id, web());
        assert_eq!(Value::Object(valid.claims), good_claims());

        // Several audiences: each of them validates; whole seconds only.
        let two = [AUDIENCE.to_owned(), "other".to_owned()];
        let svid = a
            .mint(
                &web(),
                &two,
                issued() + Duration::from_millis(700),
                Duration::from_secs(90),
            )
            .expect("mint");
        assert_eq!(svid.expiry, issued() + Duration::from_secs(90));
        for audience in &two {
            validate_jwt_svid(&svid.token, audience, &bundles(&a), soon()).expect(audience);
        }
    }

    #[test]
    fn aud_may_be_a_single_string() {
        let a = authority();
        let mut claims = good_claims();
        claims["aud"] = json!(AUDIENCE);
        claims["custom"] = json!({"k": [1, 2]});
        let valid = validate(&sign(&a, &header_for(&a), &claims), &a).expect("valid");
        assert_eq!(valid.claims["custom"], json!({"k": [1, 2]}));
    }

    #[test]
    fn mint_refuses_empty_audiences_foreign_or_non_workload_subjects_and_bad_lifetimes() {
        let a = authority();
        let aud = [AUDIENCE.to_owned()];
        let ttl = DEFAULT_JWT_SVID_TTL;
        for audience in [
            &[][..],
            &[String::new()],
            &[AUDIENCE.to_owned(), String::new()],
        ] {
            let err = a.mint(&web(), audience, issued(), ttl).expect_err("empty");
            assert!(matches!(err, JwtError::EmptyAudience), "{err:?}");
        }
        let foreign: SpiffeId = "spiffe://other.org/w".parse().expect("id");
        let err = a.mint(&foreign, &aud, issued(), ttl).expect_err("foreign");
        assert!(matches!(err, JwtError::ForeignSubject { .. }), "{err:?}");
        let err = a
            .mint(&td(TD).id(), &aud, issued(), ttl)
            .expect_err("no path");
        assert!(matches!(err, JwtError::NotAWorkload { .. }), "{err:?}");
        for (at, ttl) in [
            (issued(), Duration::ZERO),
            (issued(), Duration::from_millis(999)),
            (UNIX_EPOCH - Duration::from_secs(1), ttl),
        ] {
            let err = a.mint(&web(), &aud, at, ttl).expect_err("lifetime");
            assert!(matches!(err, JwtError::Lifetime { .. }), "{err:?}");
        }
        let huge = vec!["a".repeat(MAX_TOKEN_LEN)];
        let err = a.mint(&web(), &huge, issued(), ttl).expect_err("too long");
        assert!(matches!(err, JwtError::TooLong { .. }), "{err:?}");
    }

    #[test]
    fn jwks_round_trips_as_spiffe_jwt_svid_keys() {
        let a = authority();
        let bundle = a.bundle();
        let jwks = bundle.to_jwks();
        let value: Value = serde_json::from_slice(&jwks).expect("json");
        let keys = value["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 1);
        let key = keys[0].as_object().expect("key");
        let mut members: Vec<&str> = key.keys().map(String::as_str).collect();
        members.sort_unstable();
        assert_eq!(members, ["crv", "kid", "kty", "use", "x", "y"]);
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], "P-256");
        assert_eq!(key["kid"], a.kid());
        assert_eq!(key["use"], "jwt-svid");
        let back = JwtBundle::from_jwks(td(TD), &jwks, "jwks").expect("reads");
        assert_eq!(back, bundle);
        assert_eq!(back.trust_domain(), &td(TD));

        // A whole SPIFFE bundle: X.509 authorities and unknown uses are skipped.
        let mut doc = value.clone();
        doc["spiffe_sequence"] = json!(3);
        let keys = doc["keys"].as_array_mut().expect("keys");
        keys.push(json!({"use": "x509-svid", "kty": "EC", "crv": "P-256", "x5c": ["AAAA"]}));
        keys.push(json!({"use": "x509-svid", "kty": "RSA", "n": "AQAB", "e": "AQAB"}));
        keys.push(json!({"use": "wit-svid", "kty": "OKP", "crv": "Ed25519", "x": "AA"}));
        let read =
            JwtBundle::from_jwks(td(TD), doc.to_string().as_bytes(), "bundle.json").expect("reads");
        assert_eq!(read, bundle);

        let mut set = JwtBundleSet::new();
        set.insert(read);
        set.insert(authority().bundle());
        assert_eq!(set.iter().count(), 1, "one bundle per trust domain");
        assert_ne!(set.get(&td(TD)), Some(&bundle), "insert replaces");
        assert_eq!(set.get(&td("other.org")), None);
    }

    #[test]
    fn jwks_refuses_keys_it_cannot_verify_with_and_names_them() {
        let a = authority();
        let jwks: Value = serde_json::from_slice(&a.bundle().to_jwks()).expect("json");
        let good = jwks["keys"][0].clone();
        let with = |member: &str, value: Value| {
            let mut key = good.clone();
            if value.is_null() {
                key.as_object_mut().expect("object").remove(member);
            } else {
                key[member] = value;
            }
            json!({"keys": [json!({"use": "x509-svid", "kty": "EC"}), key]})
        };
        for (doc, field, reason) in [
            (with("use", Value::Null), "keys[1].use", "missing"),
            (with("kty", json!("RSA")), "keys[1].kty", "`RSA`"),
            (with("crv", json!("P-384")), "keys[1].crv", "`P-384`"),
            (with("kid", Value::Null), "keys[1].kid", "missing"),
            (with("kid", json!("")), "keys[1].kid", "missing"),
            (with("x", json!("AAAA")), "keys[1].x", "3 bytes"),
            (with("y", Value::Null), "keys[1].y", "0 bytes"),
            (with("y", json!("a+b/")), "keys[1].y", "base64url"),
            (
                json!({"keys": [good.clone(), good.clone()]}),
                "keys[1].kid",
                "two keys",
            ),
        ] {
            let err = JwtBundle::from_jwks(td(TD), doc.to_string().as_bytes(), "b.json")
                .expect_err(field);
            let JwtError::JwksField { what, field: f, .. } = &err else {
                panic!("{field}: {err:?}");
            };
            assert_eq!((what.as_str(), f.as_str()), ("b.json", field), "{err}");
            assert!(err.to_string().contains(reason), "{field}: {err}");
        }
        let err = JwtBundle::from_jwks(td(TD), b"{\"keys\": 3}", "b.json").expect_err("shape");
        assert!(
            matches!(
                err,
                JwtError::JwksJson {
                    line: 1,
                    column: 10,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("b.json: "), "{err}");
    }

    #[test]
    fn kid_is_the_rfc7638_thumbprint_stable_per_key_and_distinct_between_keys() {
        // RFC 7517 appendix A.1's P-256 key; thumbprint computed independently (Python:
        // base64url(sha256(canonical JSON))).
        let rfc = PublicKey {
            x: URL_SAFE_NO_PAD
                .decode("MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4")
                .expect("x")
                .try_into()
                .expect("32"),
            y: URL_SAFE_NO_PAD
                .decode("4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM")
                .expect("y")
                .try_into()
                .expect("32"),
        };
        assert_eq!(
            rfc.thumbprint(),
            "cn-I_WNMClehiVp51i_0VpOENW1upEerA8sEam5hn-s"
        );

        let a = authority();
        assert_eq!(a.kid(), a.public.thumbprint());
        let reloaded = JwtAuthority::from_pem(td(TD), &a.to_pem(), "a").expect("reload");
        assert_eq!(reloaded.kid(), a.kid());
        let other_domain = JwtAuthority::from_pem(td("other.org"), &a.to_pem(), "a").expect("td");
        assert_eq!(
            other_domain.kid(),
            a.kid(),
            "the kid depends on the key alone"
        );
        assert_ne!(authority().kid(), a.kid());
    }

    #[test]
    fn pem_round_trips_and_bad_keys_are_named() {
        let a = authority();
        let pem = a.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        let b = JwtAuthority::from_pem(td(TD), &pem, "jwt.key").expect("reads");
        assert_eq!(b.to_pem(), pem);
        assert_eq!(b.bundle(), a.bundle());
        assert_eq!(b.trust_domain(), &td(TD));
        // Tokens of one verify with the bundle of the other.
        let svid = mint_web(&b);
        validate(&svid.token, &a).expect("same key");
        assert!(!format!("{a:?}").contains("PRIVATE"), "{a:?}");

        let err = JwtAuthority::from_pem(td(TD), "nothing", "jwt.key").expect_err("no pem");
        assert!(
            matches!(err, JwtError::Pem(PemError::NoPrivateKey { .. })),
            "{err:?}"
        );
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384");
        let err =
            JwtAuthority::from_pem(td(TD), &p384.serialize_pem(), "jwt.key").expect_err("p384");
        assert!(matches!(err, JwtError::Key { .. }), "{err:?}");
        assert!(err.to_string().starts_with("jwt.key: "), "{err}");
    }

    #[test]
    fn load_or_create_writes_a_0600_key_once_then_loads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(JWT_KEY_FILE);
        let (first, created) = JwtAuthority::load_or_create(dir.path(), &td(TD)).expect("create");
        assert!(created);
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, created) = JwtAuthority::load_or_create(dir.path(), &td(TD)).expect("load");
        assert!(!created);
        assert_eq!(again.kid(), first.kid());
        assert_eq!(again.to_pem(), first.to_pem());

        fs::write(&path, "garbage").expect("write");
        let err = JwtAuthority::load_or_create(dir.path(), &td(TD)).expect_err("garbage");
        assert!(err.to_string().contains(JWT_KEY_FILE), "{err}");
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            "garbage",
            "replaced"
        );
        let err =
            JwtAuthority::load_or_create(&dir.path().join("missing"), &td(TD)).expect_err("no dir");
        assert!(matches!(err, JwtError::Pem(PemError::Io { .. })), "{err:?}");
    }

    #[test]
    fn refuses_oversized_tokens_unread() {
        let a = authority();
        let token = "a".repeat(MAX_TOKEN_LEN + 1);
        let err = validate(&token, &a).expect_err("too long");
        assert!(
            matches!(err, JwtError::TooLong { len } if len == MAX_TOKEN_LEN + 1),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_malformed_tokens() {
        let authority = authority();
        let good = sign(&authority, &header_for(&authority), &good_claims());
        let [head, body, sig] = good.split('.').collect::<Vec<_>>()[..] else {
            panic!("three parts");
        };
        for (token, expected) in [
            (String::new(), 1),
            (format!("{head}.{body}"), 2),
            (format!("{good}.{sig}"), 4),
        ] {
            let err = validate(&token, &authority).expect_err("parts");
            assert!(
                matches!(err, JwtError::TokenParts { parts } if parts == expected),
                "{err:?}"
            );
        }
        for (token, expected) in [
            (format!("{head}=.{body}.{sig}"), "header"),
            (format!("{head}.{body}+.{sig}"), "payload"),
            (format!("{head}.{body}.{sig}!"), "signature"),
        ] {
            let err = validate(&token, &authority).expect_err("base64");
            assert!(
                matches!(err, JwtError::TokenBase64 { part, .. } if part == expected),
                "{err:?}"
            );
        }
        for (token, expected) in [
            (format!("{}.{body}.{sig}", b64(b"[1]")), "header"),
            (format!("{head}.{}.{sig}", b64(b"{\"sub\":")), "payload"),
            (format!("{head}.{}.{sig}", b64(b"\"string\"")), "payload"),
        ] {
            let err = validate(&token, &authority).expect_err("json");
            assert!(
                matches!(err, JwtError::TokenJson { part, .. } if part == expected),
                "{err:?}"
            );
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    #[test]
    fn refuses_every_alg_but_es256_and_names_it() {
        let a = authority();
        let claims = good_claims();
        let header = |alg: &str| json!({"alg": alg, "kid": a.kid(), "typ": "JWT"});
        // HS256 keyed with the public key: the classic algorithm-confusion forgery.
        let public_point = [&[4][..], &a.public.x, &a.public.y].concat();
        let mut hs256 = Header::new(Algorithm::HS256);
        hs256.kid = Some(a.kid().to_owned());
        let hs256 = jsonwebtoken::encode(&hs256, &claims, &EncodingKey::from_secret(&public_point))
            .expect("hmac");
        let es384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384");
        let mut es384_header = Header::new(Algorithm::ES384);
        es384_header.kid = Some(a.kid().to_owned());
        let es384 = jsonwebtoken::encode(
            &es384_header,
            &claims,
            &EncodingKey::from_ec_der(&es384.serialize_der()),
        )
        .expect("es384");
        for (token, named) in [
            (forge(&header("none"), &claims, b""), "\"none\""),
            (forge(&header("None"), &claims, b""), "\"None\""),
            (hs256, "\"HS256\""),
            (es384, "\"ES384\""),
            (forge(&header("RS256"), &claims, &[7; 256]), "\"RS256\""),
            (forge(&header("es256"), &claims, &[7; 64]), "\"es256\""),
            (
                forge(&json!({"alg": 256, "kid": a.kid()}), &claims, &[7; 64]),
                "256",
            ),
            (
                forge(&json!({"kid": a.kid()}), &claims, &[7; 64]),
                "(missing)",
            ),
        ] {
            let err = validate(&token, &a).expect_err(named);
            assert!(
                matches!(&err, JwtError::UnsupportedAlgorithm { alg } if alg == named),
                "{named}: {err:?}"
            );
            assert!(err.to_string().contains(named), "{err}");
        }
    }

    #[test]
    fn refuses_header_members_jwt_svid_does_not_allow() {
        let a = authority();
        let base = header_for(&a);
        let with = |member: &str, value: Value| {
            let mut header = base.clone();
            header[member] = value;
            header
        };
        // Allowed: no typ, or typ JOSE.
        let mut no_typ = base.clone();
        no_typ.as_object_mut().expect("object").remove("typ");
        for header in [no_typ, with("typ", json!("JOSE"))] {
            validate(&sign(&a, &header, &good_claims()), &a).expect("allowed header");
        }
        for (member, value) in [
            ("typ", json!("at+jwt")),
            ("typ", json!(1)),
            ("jwk", json!({"kty": "EC"})),
            ("jku", json!("https://attacker.example/jwks")),
            ("crit", json!(["exp"])),
            ("x5c", json!(["AAAA"])),
            ("cty", json!("JWT")),
        ] {
            let token = sign(&a, &with(member, value), &good_claims());
            let err = validate(&token, &a).expect_err(member);
            assert!(
                matches!(&err, JwtError::UnsupportedHeader { member: m, .. } if m == member),
                "{member}: {err:?}"
            );
        }
    }

    #[test]
    fn refuses_a_token_without_kid() {
        let a = authority();
        for header in [
            json!({"alg": "ES256", "typ": "JWT"}),
            json!({"alg": "ES256", "kid": ""}),
            json!({"alg": "ES256", "kid": 5}),
        ] {
            let err = validate(&sign(&a, &header, &good_claims()), &a).expect_err("kid");
            assert!(matches!(err, JwtError::MissingKeyId), "{header}: {err:?}");
        }
    }

    #[test]
    fn refuses_subjects_that_are_not_workload_spiffe_ids() {
        let a = authority();
        let with_sub = |sub: Value| {
            let mut claims = good_claims();
            claims["sub"] = sub;
            sign(&a, &header_for(&a), &claims)
        };
        let mut no_sub = good_claims();
        no_sub.as_object_mut().expect("object").remove("sub");
        for token in [sign(&a, &header_for(&a), &no_sub), with_sub(json!(42))] {
            let err = validate(&token, &a).expect_err("no sub");
            assert!(
                matches!(err, JwtError::BadClaim { claim: "sub", .. }),
                "{err:?}"
            );
        }
        for sub in [
            "https://x",
            "spiffe://UPPER/w",
            "spiffe://example.org/a/../b",
            "",
        ] {
            let err = validate(&with_sub(json!(sub)), &a).expect_err(sub);
            assert!(
                matches!(&err, JwtError::InvalidSubject { sub: s, .. } if s == sub),
                "{sub}: {err:?}"
            );
        }
        let err = validate(&with_sub(json!("spiffe://example.org")), &a).expect_err("no path");
        assert!(matches!(err, JwtError::NotAWorkload { .. }), "{err:?}");
    }

    #[test]
    fn refuses_subjects_of_trust_domains_without_a_bundle() {
        let a = authority();
        let mut claims = good_claims();
        claims["sub"] = json!("spiffe://other.org/w");
        let err = validate(&sign(&a, &header_for(&a), &claims), &a).expect_err("other td");
        let JwtError::UnknownTrustDomain { trust_domain, id } = err else {
            panic!("{err:?}");
        };
        assert_eq!(
            (trust_domain.as_str(), id.as_str()),
            ("other.org", "spiffe://other.org/w")
        );
        let err = validate_jwt_svid(
            &sign(&a, &header_for(&a), &good_claims()),
            AUDIENCE,
            &JwtBundleSet::new(),
            soon(),
        )
        .expect_err("no bundles");
        assert!(
            matches!(err, JwtError::UnknownTrustDomain { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_kids_the_bundle_does_not_hold() {
        let a = authority();
        let other = authority();
        // Properly signed by a key the trust domain's bundle does not list.
        let svid = mint_web(&other);
        let err = validate(&svid.token, &a).expect_err("unknown kid");
        assert!(
            matches!(&err, JwtError::UnknownKeyId { kid, .. } if kid == other.kid()),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_bad_signatures() {
        let a = authority();
        let other = authority();
        // Another key signs under the trusted key's kid.
        let impostor = sign(&other, &header_for(&a), &good_claims());
        // A real signature spliced onto other claims.
        let real = sign(&a, &header_for(&a), &good_claims());
        let (_, signature) = real.rsplit_once('.').expect("signature");
        let mut claims = good_claims();
        claims["sub"] = json!("spiffe://example.org/ns/prod/admin");
        let unsigned = forge(&header_for(&a), &claims, b"");
        let spliced = format!("{unsigned}{signature}");
        for token in [
            impostor,
            spliced,
            forge(&header_for(&a), &good_claims(), &[0; 64]),
            forge(&header_for(&a), &good_claims(), b""),
        ] {
            let err = validate(&token, &a).expect_err("bad signature");
            assert!(
                matches!(&err, JwtError::BadSignature { kid, .. } if kid == a.kid()),
                "{err:?}"
            );
        }
    }

    #[test]
    fn refuses_expired_tokens_and_says_when() {
        let a = authority();
        let svid = mint_web(&a);
        let bundles = bundles(&a);
        let just_before = svid.expiry - Duration::from_millis(1);
        validate_jwt_svid(&svid.token, AUDIENCE, &bundles, just_before).expect("still valid");
        for now in [svid.expiry, svid.expiry + DEFAULT_JWT_SVID_TTL] {
            let err = validate_jwt_svid(&svid.token, AUDIENCE, &bundles, now).expect_err("expired");
            assert!(
                matches!(
                    err,
                    JwtError::Expired { expiry, now: at } if expiry == svid.expiry && at == now
                ),
                "{err:?}"
            );
            assert!(
                err.to_string().contains("expired at 2027-01-15T08:05:00Z"),
                "{err}"
            );
        }
        let mut no_exp = good_claims();
        no_exp.as_object_mut().expect("object").remove("exp");
        let mut fractional = good_claims();
        fractional["exp"] = json!(1_800_000_300.5);
        let mut negative = good_claims();
        negative["exp"] = json!(-1);
        let mut text = good_claims();
        text["exp"] = json!("1800000300");
        for claims in [no_exp, fractional, negative, text] {
            let err = validate(&sign(&a, &header_for(&a), &claims), &a).expect_err("exp");
            assert!(
                matches!(err, JwtError::BadClaim { claim: "exp", .. }),
                "{claims}: {err:?}"
            );
        }
        // Beyond the year 9999: far in the future, not an error.
        let mut far = good_claims();
        far["exp"] = json!(u64::MAX);
        validate(&sign(&a, &header_for(&a), &far), &a).expect("far future");
    }

    #[test]
    fn refuses_tokens_before_their_nbf() {
        let a = authority();
        let mut claims = good_claims();
        claims["nbf"] = json!(ISSUED + 60);
        let token = sign(&a, &header_for(&a), &claims);
        let err = validate(&token, &a).expect_err("early");
        assert!(matches!(err, JwtError::NotYetValid { .. }), "{err:?}");
        let at_nbf = at(ISSUED + 60);
        validate_jwt_svid(&token, AUDIENCE, &bundles(&a), at_nbf).expect("valid from nbf");
        claims["nbf"] = json!("soon");
        let err = validate(&sign(&a, &header_for(&a), &claims), &a).expect_err("bad nbf");
        assert!(
            matches!(err, JwtError::BadClaim { claim: "nbf", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_missing_or_wrong_audiences() {
        let a = authority();
        let svid = a
            .mint(
                &web(),
                &["a".to_owned(), "b".to_owned()],
                issued(),
                DEFAULT_JWT_SVID_TTL,
            )
            .expect("mint");
        let err = validate(&svid.token, &a).expect_err("wrong audience");
        let JwtError::WrongAudience { audience, found } = err else {
            panic!("{err:?}");
        };
        assert_eq!(audience, AUDIENCE);
        assert_eq!(found, ["a", "b"]);
        let err = validate_jwt_svid(&svid.token, "", &bundles(&a), soon()).expect_err("empty");
        assert!(matches!(err, JwtError::EmptyAudience), "{err:?}");

        let with_aud = |aud: Option<Value>| {
            let mut claims = good_claims();
            match aud {
                Some(aud) => claims["aud"] = aud,
                None => {
                    claims.as_object_mut().expect("object").remove("aud");
                }
            }
            sign(&a, &header_for(&a), &claims)
        };
        for aud in [
            None,
            Some(json!([])),
            Some(json!([AUDIENCE, 1])),
            Some(json!(7)),
        ] {
            let err = validate(&with_aud(aud.clone()), &a).expect_err("bad aud");
            assert!(
                matches!(err, JwtError::BadClaim { claim: "aud", .. }),
                "{aud:?}: {err:?}"
            );
        }
        let err =
            validate(&with_aud(Some(json!("spiffe://example.org/other"))), &a).expect_err("other");
        assert!(matches!(err, JwtError::WrongAudience { .. }), "{err:?}");
    }

    #[test]
    fn checks_run_in_the_documented_order() {
        let a = authority();
        let expired_wrong_aud = {
            let mut claims = good_claims();
            claims["exp"] = json!(1);
            claims["aud"] = json!("nobody");
            claims
        };
        let cases = [
            // alg before kid and sub.
            (
                forge(&json!({"alg": "none"}), &json!({"sub": "x"}), b""),
                "UnsupportedAlgorithm",
            ),
            // kid before sub.
            (
                forge(&json!({"alg": "ES256"}), &json!({"sub": "x"}), b""),
                "MissingKeyId",
            ),
            // sub before the bundle and the signature.
            (
                forge(&header_for(&a), &json!({"sub": "x"}), b""),
                "InvalidSubject",
            ),
            // signature before exp and aud.
            (
                forge(&header_for(&a), &expired_wrong_aud, &[1; 64]),
                "BadSignature",
            ),
            // exp before aud.
            (sign(&a, &header_for(&a), &expired_wrong_aud), "Expired"),
        ];
        for (token, variant) in cases {
            let err = validate(&token, &a).expect_err(variant);
            assert!(
                format!("{err:?}").starts_with(variant),
                "{variant}: {err:?}"
            );
        }
    }
}
