//! The small things every nuwa crate shares and none owns: the seeded hash and RNG, atomic
//! writes and SHA-256, numbers with unit suffixes, proportional shares of a batch, each device
//! kind's peak FLOP/s, and SVG charts drawn alike. No Burn, no model: everything else depends on this crate.

pub mod comm;
pub mod files;
pub mod hardware;
pub mod plot;
pub mod rng;
pub mod shares;
pub mod units;

pub use comm::{Collective, SoloCollective};
pub use files::{atomic_write, sha256_hex, write_synced};
pub use shares::{micro_batch_shares, packed_micro_batch_shares, proportional_shares};
pub use units::parse_with_unit;
