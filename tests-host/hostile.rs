//! Hostile-input tests (being written).
