//! Tools for plugin authors that run plugins outside a rule: calling one
//! stage on JSON cases ([`harness`], behind `ganglion call`).

pub mod harness;
