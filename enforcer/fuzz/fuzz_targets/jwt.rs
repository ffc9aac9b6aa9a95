//! JWT-SVID validation, fed arbitrary tokens (and the bytes after a valid token's header, so
//! the claims and signature parts are reached): it must never panic, and never accept a token
//! the fuzzer could make without the key.

#![no_main]
#![forbid(unsafe_code)]

use std::{
    sync::LazyLock,
    time::{Duration, SystemTime},
};

use enforcer::identity::{JwtAuthority, JwtBundleSet, validate_jwt_svid};
use libfuzzer_sys::fuzz_target;

static BUNDLES: LazyLock<(JwtBundleSet, String)> = LazyLock::new(|| {
    let authority = JwtAuthority::generate("fuzz.org".parse().unwrap()).unwrap();
    let mut bundles = JwtBundleSet::new();
    bundles.insert(authority.bundle());
    let token = authority
        .mint(
            &"spiffe://fuzz.org/web".parse().unwrap(),
            &["aud".to_owned()],
            SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap()
        .token;
    let header = token.split('.').next().unwrap().to_owned();
    (bundles, header)
});

fuzz_target!(|data: &[u8]| {
    let (bundles, header) = &*BUNDLES;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let now = SystemTime::now();
    assert!(validate_jwt_svid(text, "aud", bundles, now).is_err());
    let with_header = format!("{header}.{text}");
    assert!(validate_jwt_svid(&with_header, "aud", bundles, now).is_err());
});
