//! QMP tests.
