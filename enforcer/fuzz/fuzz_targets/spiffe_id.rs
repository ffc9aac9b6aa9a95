//! Arbitrary UTF-8 as a SPIFFE ID and as a trust domain name: parsing never panics, and
//! whatever parses prints back to a string that parses to an equal value.

#![no_main]
#![forbid(unsafe_code)]

use enforcer::identity::{SpiffeId, TrustDomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Ok(id) = input.parse::<SpiffeId>() {
        let printed = id.to_string();
        let reparsed: SpiffeId = printed
            .parse()
            .unwrap_or_else(|e| panic!("{id:?} prints as {printed:?}, which fails to parse: {e}"));
        assert_eq!(reparsed, id, "{printed:?} does not round-trip");
        // The parts of an accepted ID are themselves valid.
        let td = id.trust_domain();
        assert_eq!(td.as_str().parse::<TrustDomain>().as_ref(), Ok(&td));
    }
    if let Ok(td) = input.parse::<TrustDomain>() {
        let printed = td.to_string();
        let reparsed: TrustDomain = printed
            .parse()
            .unwrap_or_else(|e| panic!("{td:?} prints as {printed:?}, which fails to parse: {e}"));
        assert_eq!(reparsed, td, "{printed:?} does not round-trip");
        assert_eq!(td.id().trust_domain(), td);
    }
});
