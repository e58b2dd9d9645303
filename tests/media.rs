//! Media uploads: see the helper's module docs (being written).

mod harness;
