//! Small certificate helpers shared by the CA, SVID issuance, bundles and verification:
//! serial numbers, SPIFFE ID SANs, X.509 times and the crypto provider. They sit below those
//! modules so that none of them imports another for a helper.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{SanType, SerialNumber};
use rustls::crypto::{CryptoProvider, ring};

use super::spiffe_id::SpiffeId;

/// The crypto provider for all identity TLS: ring, TLS 1.3 suites only.
#[must_use]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// A random positive 128-bit serial number (RFC 5280 allows up to 20 octets).
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero octet, so the DER INTEGER keeps all 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// A URI SAN holding a SPIFFE ID (ASCII by construction, so rcgen's IA5 check passes).
pub(crate) fn uri_san(id: &SpiffeId) -> Result<SanType, rcgen::Error> {
    Ok(SanType::URI(id.as_str().to_owned().try_into()?))
}

/// Converts an X.509 time (seconds since the epoch) to `SystemTime`.
pub(crate) fn asn1_to_system_time(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(after) => SystemTime::UNIX_EPOCH + Duration::from_secs(after),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

/// Truncates to whole seconds, the precision X.509 times are encoded with.
pub(crate) fn to_whole_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}
