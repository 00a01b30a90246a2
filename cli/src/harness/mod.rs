//! One child-process harness and one report table for `stress` and `soak`.

pub mod children;
pub mod interrupt;
pub mod table;
