//! Whole operations over tensor files and adapters. Each is a pure library function returning a
//! report; rendering belongs to the command layer.

pub mod convert;
pub mod extract;
pub mod inspect;
pub mod inspect_model;
pub mod merge;
pub mod merge_loras;
pub mod meta;
pub mod patch_plan;
pub mod progress;
pub mod resize;
