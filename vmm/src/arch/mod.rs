//! Architecture code. minivmm is x86_64-only; everything arch-specific lives below `x86_64`.

pub mod x86_64;
