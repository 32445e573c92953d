//! One file per subcommand: its flags and what it does with them.

pub mod bench;
pub mod data;
pub mod export;
pub mod import;
pub mod inspect;
pub mod launch;
pub mod merge;
pub mod parity;
pub mod plan;
pub mod plan_run;
pub mod sample;
pub mod serve;
pub mod train;
