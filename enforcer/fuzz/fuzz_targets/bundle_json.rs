//! Arbitrary bytes as SPIFFE bundle JSON, both forms: one trust domain's document
//! (`TrustBundle::from_json`) and the federated map of them (`TrustBundleSet::from_json`).
//! Parsing never panics, and a bundle that parses and writes back reads as an equal bundle.

#![no_main]
#![forbid(unsafe_code)]

use enforcer::identity::{TrustBundle, TrustBundleSet, TrustDomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    // Bundles are read from files and HTTP bodies as UTF-8 text; other bytes never reach JSON.
    let Ok(input) = std::str::from_utf8(bytes) else {
        return;
    };
    let td: TrustDomain = "example.org".parse().expect("a valid trust domain");
    if let Ok(bundle) = TrustBundle::from_json(td.clone(), input, "fuzz.json")
        && let Ok(json) = bundle.to_json()
    {
        let reread = TrustBundle::from_json(td, &json, "written bundle")
            .unwrap_or_else(|e| panic!("written bundle fails to parse: {e}\n{json}"));
        assert_eq!(reread, bundle, "bundle does not round-trip through\n{json}");
    }
    if let Ok(set) = TrustBundleSet::from_json(input, "fuzz.json")
        && let Ok(json) = set.to_json()
    {
        let reread = TrustBundleSet::from_json(&json, "written bundle set")
            .unwrap_or_else(|e| panic!("written bundle set fails to parse: {e}\n{json}"));
        assert_eq!(
            reread, set,
            "bundle set does not round-trip through\n{json}"
        );
    }
});
