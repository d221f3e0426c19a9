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
