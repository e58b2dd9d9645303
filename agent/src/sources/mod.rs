//! Where events come from. Each source commits through [`crate::transform::Ingest`]
//! and acknowledges only after the commit.

pub mod http;
pub mod mqtt;
