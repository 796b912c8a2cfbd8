//! The one source of truth for everything the operator writes and the broker
//! reads. Kept free of tokio, networking and Kubernetes so both sides (and
//! tests) can depend on it cheaply and the two can never drift.

pub mod acl;
pub mod bundle;
pub mod bundle_edit;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod token;
pub mod topic;
