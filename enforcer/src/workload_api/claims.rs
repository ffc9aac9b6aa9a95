//! JWT claims (JSON) as the `google.protobuf.Struct` that `ValidateJWTSVIDResponse` carries.
#![forbid(unsafe_code)]

use prost_types::{ListValue, Struct, Value, value::Kind};

/// The claims object as a `Struct`.
pub(crate) fn to_struct(claims: serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: claims
            .into_iter()
            .map(|(name, value)| (name, to_value(value)))
            .collect(),
    }
}

/// One JSON value as a protobuf `Value` (numbers become doubles, as in `Struct`'s JSON mapping).
fn to_value(value: serde_json::Value) -> Value {
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(flag) => Kind::BoolValue(flag),
        serde_json::Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(text) => Kind::StringValue(text),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(fields) => Kind::StructValue(to_struct(fields)),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_keep_their_names_types_and_nesting() {
        let claims = serde_json::json!({
            "sub": "spiffe://example.org/web",
            "aud": ["a", "b"],
            "exp": 1_700_000_000,
            "extra": {"flag": true, "none": null},
        });
        let serde_json::Value::Object(claims) = claims else {
            unreachable!("an object literal")
        };
        let converted = to_struct(claims);
        let field = |name: &str| converted.fields[name].kind.clone().expect("kind");
        assert_eq!(
            field("sub"),
            Kind::StringValue("spiffe://example.org/web".into())
        );
        assert_eq!(field("exp"), Kind::NumberValue(1_700_000_000.0));
        let Kind::ListValue(aud) = field("aud") else {
            panic!("aud is a list")
        };
        assert_eq!(aud.values.len(), 2);
        let Kind::StructValue(extra) = field("extra") else {
            panic!("extra is a struct")
        };
        assert_eq!(extra.fields["flag"].kind, Some(Kind::BoolValue(true)));
        assert_eq!(extra.fields["none"].kind, Some(Kind::NullValue(0)));
    }
}
