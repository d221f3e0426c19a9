//! A command's `arguments`, checked as QEMU's input visitor checks them:
//! each member taken once with its type, then any member left over is
//! unexpected. The error texts are QEMU's.

use serde_json::{Map, Value};

use super::QmpError;

/// The members of `arguments` not taken yet.
pub(super) struct Args {
    members: Map<String, Value>,
}

impl Args {
    /// Wraps a command's `arguments`.
    pub(super) fn new(members: Map<String, Value>) -> Self {
        Self { members }
    }

    /// Takes member `key`, of any type.
    pub(super) fn take(&mut self, key: &str) -> Option<Value> {
        self.members.remove(key)
    }

    /// Takes an optional string member.
    pub(super) fn opt_str(&mut self, key: &str) -> Result<Option<String>, QmpError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(wrong_type(key, "string")),
        }
    }

    /// Takes a required string member.
    pub(super) fn str(&mut self, key: &str) -> Result<String, QmpError> {
        self.opt_str(key)?.ok_or_else(|| missing(key))
    }

    /// Takes an optional array member.
    pub(super) fn opt_array(&mut self, key: &str) -> Result<Option<Vec<Value>>, QmpError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(_) => Err(wrong_type(key, "array")),
        }
    }

    /// Takes an optional boolean member.
    pub(super) fn opt_bool(&mut self, key: &str) -> Result<Option<bool>, QmpError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(value)) => Ok(Some(value)),
            Some(_) => Err(wrong_type(key, "boolean")),
        }
    }

    /// Takes an optional non-negative integer member.
    pub(super) fn opt_u64(&mut self, key: &str) -> Result<Option<u64>, QmpError> {
        match self.take(key) {
            None => Ok(None),
            Some(value) => match value.as_u64() {
                Some(value) => Ok(Some(value)),
                None if value.is_i64() => Err(QmpError::generic(format!(
                    "Parameter '{key}' expects a non-negative value"
                ))),
                None => Err(wrong_type(key, "integer")),
            },
        }
    }

    /// Takes a required non-negative integer member.
    pub(super) fn u64(&mut self, key: &str) -> Result<u64, QmpError> {
        self.opt_u64(key)?.ok_or_else(|| missing(key))
    }

    /// Takes an optional enum member, one of `values`; returns its index.
    pub(super) fn opt_enum(
        &mut self,
        key: &str,
        values: &[&str],
    ) -> Result<Option<usize>, QmpError> {
        let Some(text) = self.opt_str(key)? else {
            return Ok(None);
        };
        match values.iter().position(|v| *v == text) {
            Some(index) => Ok(Some(index)),
            None => Err(QmpError::generic(format!(
                "Parameter '{key}' does not accept value '{text}'"
            ))),
        }
    }

    /// Fails on the first member nobody took.
    pub(super) fn finish(&mut self) -> Result<(), QmpError> {
        match self.members.keys().next() {
            Some(key) => Err(QmpError::generic(format!(
                "Parameter '{key}' is unexpected"
            ))),
            None => Ok(()),
        }
    }
}

/// QEMU's error for a required member left out.
fn missing(key: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{key}' is missing"))
}

/// QEMU's error for a member of the wrong type.
fn wrong_type(key: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{key}', expected: {expected}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(value: Value) -> Args {
        match value {
            Value::Object(members) => Args::new(members),
            _ => unreachable!("an object"),
        }
    }

    #[test]
    fn members_are_typed_and_taken_once() {
        let mut a = args(json!({"device": "top", "speed": 5, "force": true, "x": 1}));
        assert_eq!(a.str("device").unwrap(), "top");
        assert_eq!(a.u64("speed").unwrap(), 5);
        assert_eq!(a.opt_bool("force").unwrap(), Some(true));
        assert_eq!(a.opt_str("device").unwrap(), None, "taken already");
        let err = a.finish().unwrap_err();
        assert_eq!(err.desc, "Parameter 'x' is unexpected");
    }

    #[test]
    fn refusals_carry_qemu_texts() {
        let mut a = args(json!({"speed": -1, "id": 3, "on-error": "never"}));
        assert_eq!(
            a.u64("speed").unwrap_err().desc,
            "Parameter 'speed' expects a non-negative value"
        );
        assert_eq!(
            a.str("id").unwrap_err().desc,
            "Invalid parameter type for 'id', expected: string"
        );
        assert_eq!(
            a.opt_enum("on-error", &["report"]).unwrap_err().desc,
            "Parameter 'on-error' does not accept value 'never'"
        );
        assert_eq!(
            a.str("device").unwrap_err().desc,
            "Parameter 'device' is missing"
        );
        assert!(a.finish().is_ok());
    }
}
