//! Experiments built from the other parts: [`compare`] runs synthesis methods and the
//! classifier under one protocol and reports whether the synthetic images help; [`quality`]
//! judges a synthetic set (faithfulness, diversity, novelty) with a real-data classifier.
pub mod compare;
pub mod quality;
