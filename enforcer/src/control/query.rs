//! The [`Query`] extractor: a query string decoded with `serde_urlencoded` into a `v1` query
//! struct, errors answered as JSON 400s.
//!
//! It differs from axum's `Query` in one way: the string is first checked strictly. Both
//! decode `application/x-www-form-urlencoded` (`+` is a space, `%XX` a byte), but axum's (like
//! `serde_urlencoded`) passes a bad escape such as `%zz` through as text and replaces bytes
//! that are not UTF-8; here either is a 400 naming the component, so a typo in a filter is
//! reported instead of silently matching nothing.
#![forbid(unsafe_code)]

use axum::extract::FromRequestParts;
use http::{StatusCode, request::Parts};
use serde::de::DeserializeOwned;

use super::Reply;

/// A query string decoded into `T`; a malformed one is answered with a JSON 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = Reply;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Reply> {
        let query = parts.uri.query().unwrap_or_default();
        check(query).map_err(|error| Reply::error(StatusCode::BAD_REQUEST, error))?;
        serde_urlencoded::from_str(query)
            .map(Self)
            .map_err(|error| {
                Reply::error(
                    StatusCode::BAD_REQUEST,
                    format_args!("bad query `{query}`: {error}"),
                )
            })
    }
}

/// Why a query string was refused before decoding.
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

/// Checks that every key and value of `query` (without the `?`) decodes to UTF-8.
pub(super) fn check(query: &str) -> Result<(), QueryError> {
    query.split(['&', '=']).try_for_each(check_component)
}

fn check_component(component: &str) -> Result<(), QueryError> {
    let bad_escape = || QueryError::BadEscape {
        component: component.to_owned(),
    };
    let mut bytes = Vec::with_capacity(component.len());
    let mut rest = component.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        if byte == b'%' {
            let [high, low, tail @ ..] = rest else {
                return Err(bad_escape());
            };
            let high = hex_value(*high).ok_or_else(bad_escape)?;
            let low = hex_value(*low).ok_or_else(bad_escape)?;
            bytes.push(high << 4 | low);
            rest = tail;
        } else {
            bytes.push(byte);
        }
    }
    std::str::from_utf8(&bytes)
        .map(drop)
        .map_err(|_| QueryError::NotUtf8 {
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
    use axum::response::IntoResponse as _;
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::{audit::Verdict, control::v1};

    async fn extract<T: DeserializeOwned>(query: &str) -> Result<T, (StatusCode, String)> {
        let (mut parts, ()) = http::Request::builder()
            .uri(format!("/v1/flows?{query}"))
            .body(())
            .unwrap()
            .into_parts();
        match Query::<T>::from_request_parts(&mut parts, &()).await {
            Ok(Query(value)) => Ok(value),
            Err(reply) => {
                let response = reply.into_response();
                let status = response.status();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                Err((status, String::from_utf8(body.to_vec()).unwrap()))
            }
        }
    }

    async fn pairs(query: &str) -> Vec<(String, String)> {
        extract(query)
            .await
            .unwrap_or_else(|error| panic!("{query:?}: {error:?}"))
    }

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[tokio::test]
    async fn decodes_pairs_in_order_with_escapes_and_plus() {
        assert_eq!(
            pairs("b=2&a=1&b=3&flag").await,
            owned(&[("b", "2"), ("a", "1"), ("b", "3"), ("flag", "")])
        );
        assert_eq!(
            pairs("id=spiffe%3A%2F%2Fexample.org%2fns%2Fweb&q=a+b%20c&k%C3%A9y=%E2%9C%93").await,
            owned(&[
                ("id", "spiffe://example.org/ns/web"),
                ("q", "a b c"),
                ("kéy", "✓")
            ])
        );
        assert_eq!(pairs("expr=a=b").await, owned(&[("expr", "a=b")]));
    }

    #[tokio::test]
    async fn decodes_into_the_v1_structs() {
        let query: v1::FlowsQuery = extract("verdict=deny&limit=5&follow=1").await.unwrap();
        assert_eq!(query.verdict, Some(Verdict::Deny));
        assert_eq!(query.limit, Some(5));
        assert!(query.follow);
        let (status, body) = extract::<v1::FlowsQuery>("limit=many").await.unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body.starts_with("{\"error\":\"bad query `limit=many`: "),
            "{body}"
        );
    }

    #[tokio::test]
    async fn bad_escapes_are_400s_naming_the_component() {
        for (query, component) in [("a=%zz", "%zz"), ("a=1%", "1%"), ("%4=b", "%4")] {
            assert_eq!(
                check(query),
                Err(QueryError::BadEscape {
                    component: component.to_owned()
                }),
                "{query}"
            );
        }
        let (status, body) = extract::<Vec<(String, String)>>("bad=%zz")
            .await
            .unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("`%zz`"), "{body}");
    }

    #[test]
    fn non_utf8_is_an_error() {
        let error = check("a=%FF").expect_err("0xFF alone is not UTF-8");
        assert_eq!(
            error,
            QueryError::NotUtf8 {
                component: "%FF".to_owned()
            }
        );
        assert!(error.to_string().contains("`%FF`"), "{error}");
    }
}
