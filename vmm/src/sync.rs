//! Locking that survives a panicked holder (see `migration::sync`, the one implementation).

pub use migration::sync::{into_inner, lock, read, wait, write};
