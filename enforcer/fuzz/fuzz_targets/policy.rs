//! Arbitrary bytes as a policy file: `policy::parse` returns a policy or diagnostics, and
//! never panics.

#![no_main]
#![forbid(unsafe_code)]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = enforcer::policy::parse("fuzz.toml", bytes);
});
