//! Experiments built from the other parts: [`compare`] runs synthesis methods and the
//! classifier under one protocol and reports whether the synthetic images help.
pub mod compare;
