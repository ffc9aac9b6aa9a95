//! Query strings in the `application/x-www-form-urlencoded` form: `+` is a space and `%XX` a
//! byte. Decoding is strict (a bad escape or non-UTF-8 result is an error the server answers
//! with 400), so a typo in a filter is reported instead of silently matching nothing.
#![forbid(unsafe_code)]

/// Why a query string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QueryError {
    /// A `%` is not followed by two hex digits.
    #[error("malformed query component `{component}`: `%` must be followed by two hex digits")]
    BadEscape {
        /// The component as it was sent.
        component: String,
    },
    /// The decoded bytes are not UTF-8.
    #[error("malformed query component `{component}`: it does not decode to UTF-8")]
    NotUtf8 {
        /// The component as it was sent.
        component: String,
    },
}

/// Splits `query` (without the `?`) into decoded `(key, value)` pairs, in order; a key without
/// `=` has an empty value and empty pieces (`a=1&&b=2`) are skipped.
pub(crate) fn parse_query(query: &str) -> Result<Vec<(String, String)>, QueryError> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(key)?, decode(value)?))
        })
        .collect()
}

fn decode(component: &str) -> Result<String, QueryError> {
    let bad_escape = || QueryError::BadEscape {
        component: component.to_owned(),
    };
    let mut bytes = Vec::with_capacity(component.len());
    let mut rest = component.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        match byte {
            b'+' => bytes.push(b' '),
            b'%' => {
                let [high, low, tail @ ..] = rest else {
                    return Err(bad_escape());
                };
                let high = hex_value(*high).ok_or_else(bad_escape)?;
                let low = hex_value(*low).ok_or_else(bad_escape)?;
                bytes.push(high << 4 | low);
                rest = tail;
            }
            _ => bytes.push(byte),
        }
    }
    String::from_utf8(bytes).map_err(|_| QueryError::NotUtf8 {
        component: component.to_owned(),
    })
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .map(|value| u8::try_from(value).expect("a hex digit fits in a byte"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &str) -> Vec<(String, String)> {
        parse_query(query).unwrap_or_else(|error| panic!("{query:?}: {error}"))
    }

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn splits_pairs_in_order() {
        assert_eq!(
            pairs("b=2&a=1&b=3"),
            owned(&[("b", "2"), ("a", "1"), ("b", "3")])
        );
    }

    #[test]
    fn empty_query_has_no_pairs() {
        assert_eq!(pairs(""), owned(&[]));
        assert_eq!(pairs("&&"), owned(&[]));
    }

    #[test]
    fn key_without_value_is_empty_and_empty_pieces_are_skipped() {
        assert_eq!(
            pairs("follow&&n=10&x="),
            owned(&[("follow", ""), ("n", "10"), ("x", "")])
        );
    }

    #[test]
    fn only_the_first_equals_splits() {
        assert_eq!(pairs("expr=a=b"), owned(&[("expr", "a=b")]));
    }

    #[test]
    fn decodes_percent_escapes_and_plus() {
        assert_eq!(
            pairs("id=spiffe%3A%2F%2Fexample.org%2fns%2Fweb&q=a+b%20c&k%C3%A9y=%E2%9C%93"),
            owned(&[
                ("id", "spiffe://example.org/ns/web"),
                ("q", "a b c"),
                ("kéy", "✓")
            ])
        );
    }

    #[test]
    fn literal_reserved_characters_pass_through() {
        assert_eq!(
            pairs("id=spiffe://example.org/ns/web"),
            owned(&[("id", "spiffe://example.org/ns/web")])
        );
    }

    #[test]
    fn bad_escapes_are_errors_naming_the_component() {
        for (query, component) in [("a=%zz", "%zz"), ("a=1%", "1%"), ("%4=b", "%4")] {
            assert_eq!(
                parse_query(query),
                Err(QueryError::BadEscape {
                    component: component.to_owned()
                }),
                "{query}"
            );
        }
    }

    #[test]
    fn non_utf8_is_an_error() {
        let error = parse_query("a=%FF").expect_err("0xFF alone is not UTF-8");
        assert_eq!(
            error,
            QueryError::NotUtf8 {
                component: "%FF".to_owned()
            }
        );
        assert!(error.to_string().contains("`%FF`"), "{error}");
    }
}
