//! Shared helpers for the end-to-end tests.

pub mod power_cut;
