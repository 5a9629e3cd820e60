//! Experiments built from the other parts: [`compare`] runs synthesis methods and the
//! classifier under one protocol and reports whether the synthetic images help; [`quality`]
//! judges a synthetic set (faithfulness, diversity, novelty) with a real-data classifier, and
//! [`filter`] drops the images that classifier does not recognise;
//! [`report`] shows a comparison as one self-contained HTML page (chart, table, image grids);
//! [`sweep`] varies generation and mixing settings and selects them on validation accuracy;
//! [`demo`] runs the whole method on the shipped real images and model.
pub mod compare;
pub mod demo;
pub mod filter;
pub mod quality;
pub mod report;
pub mod sweep;
