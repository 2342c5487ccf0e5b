//! Shared code of percpu-alloc's benchmark programs (`src/bin/`) and
//! criterion benches (`benches/`). Not published; nothing here is part of
//! the library.

pub mod host;
pub mod micro;
pub mod rng;
