//! Parsing JSON documents (API bodies, swap requests) into typed values with errors that name
//! the offending field, so a caller can tell exactly what to fix.

use serde::de::DeserializeOwned;

/// A JSON document that does not fit the expected shape.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct FieldError {
    /// Dotted path of the field at fault (`verify.window_ms`, `backend.engine`), when known.
    pub field: Option<String>,
    /// What is wrong, without the field's name.
    pub message: String,
}

impl FieldError {
    /// An error about the field at dotted path `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: Some(field.into()), message: message.into() }
    }

    /// The same error for a document nested under `prefix`.
    pub fn nested_in(mut self, prefix: &str) -> Self {
        self.field = Some(match self.field {
            Some(f) => format!("{prefix}.{f}"),
            None => prefix.to_string(),
        });
        self
    }
}

/// Parses a JSON object from `bytes`.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FieldError> {
    // Parse to a value first: serde would accept an array for a struct, which no caller means.
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| FieldError { field: None, message: format!("body is not valid JSON: {e}") })?;
    from_value(value)
}

/// Converts a JSON object into `T`.
pub fn from_value<T: DeserializeOwned>(mut value: serde_json::Value) -> Result<T, FieldError> {
    if !value.is_object() {
        return Err(FieldError { field: None, message: format!("expected a JSON object, got {}", kind(&value)) });
    }
    whole_numbers_as_integers(&mut value);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let message = e.inner().to_string();
        let path = e.path().to_string();
        // serde names a missing field only in its message, with the parent as the path.
        let missing = message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next());
        let field = match (path.as_str(), missing) {
            (".", Some(name)) => Some(name.to_string()),
            (".", None) | ("?", _) => None,
            (parent, Some(name)) => Some(format!("{parent}.{name}")),
            (path, None) => Some(path.to_string()),
        };
        FieldError { field, message }
    })
}

/// `48.0` becomes `48`: JSON has one number type, and JSON Schema's `integer` (which the API
/// document uses) is any number with a zero fraction, which serde alone would refuse for an
/// integer field. Fractions, and whole numbers no integer type holds, stay as they are.
fn whole_numbers_as_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Bounds exactly representable in f64: 2^63 and 2^64.
            if f.fract() == 0.0 && (-9.223_372_036_854_776e18..1.844_674_407_370_955_2e19).contains(&f) {
                *value = if f < 0.0 { Value::from(f as i64) } else { Value::from(f as u64) };
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(whole_numbers_as_integers),
        _ => {}
    }
}

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        count: u32,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        #[serde(default)]
        inner: Option<Inner>,
    }

    fn field(body: &str) -> Option<String> {
        from_slice::<Outer>(body.as_bytes()).unwrap_err().field
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field(r#"{"name": 3}"#).as_deref(), Some("name"));
        assert_eq!(field(r#"{}"#).as_deref(), Some("name"));
        assert_eq!(field(r#"{"name": "a", "bogus": 1}"#).as_deref(), Some("bogus"));
        assert_eq!(field(r#"{"name": "a", "inner": {"count": -1}}"#).as_deref(), Some("inner.count"));
        assert_eq!(field(r#"{"name": "a", "inner": {}}"#).as_deref(), Some("inner.count"));
        assert_eq!(field(r#"["a"]"#), None);
        assert_eq!(field(r#"{"name": "#), None);
        let e = from_slice::<Outer>(b"[1]").unwrap_err();
        assert!(e.message.contains("expected a JSON object, got an array"), "{e}");
        let nested = FieldError::new("engine", "bad").nested_in("backend");
        assert_eq!(nested.to_string(), "backend.engine: bad");
    }

    /// JSON Schema's `integer` is any number with a zero fraction: `48.0` is one.
    #[test]
    fn whole_numbers_fill_integer_fields() {
        let outer: Outer = from_slice(br#"{"name": "a", "inner": {"count": 48.0}}"#).unwrap();
        assert_eq!(outer.inner.unwrap().count, 48);
        assert_eq!(field(r#"{"name": "a", "inner": {"count": 48.5}}"#).as_deref(), Some("inner.count"));
        assert_eq!(field(r#"{"name": "a", "inner": {"count": 1e30}}"#).as_deref(), Some("inner.count"));
        assert_eq!(field(r#"{"name": "a", "inner": {"count": -2.0}}"#).as_deref(), Some("inner.count"));
    }

    /// A RAM backing takes only its documented keys, whatever its kind.
    #[test]
    fn ram_backings_refuse_unknown_keys() {
        use crate::memory::RamBacking;
        let parse = |s: &str| serde_json::from_str::<RamBacking>(s).map_err(|e| e.to_string());
        assert_eq!(parse(r#"{"kind": "memfd"}"#), Ok(RamBacking::Memfd));
        assert_eq!(parse(r#"{"kind": "file", "path": "/x"}"#), Ok(RamBacking::File { path: "/x".into() }));
        assert!(parse(r#"{"kind": "memfd", "x": 42}"#).unwrap_err().contains("unknown field `x`"));
        assert!(parse(r#"{"kind": "memfd", "path": "/x"}"#).unwrap_err().contains("only kind file"));
        assert!(parse(r#"{"kind": "file"}"#).unwrap_err().contains("missing field `path`"));
        assert!(parse(r#"{"kind": "floppy"}"#).unwrap_err().contains("unknown variant"));
        let round_trip = serde_json::to_string(&RamBacking::File { path: "/x".into() }).unwrap();
        assert_eq!(round_trip, r#"{"kind":"file","path":"/x"}"#);
    }
}
